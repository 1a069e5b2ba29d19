"""Which share of a cache pass each process encodes when `accelerate launch` runs several (`trainer.cache`).

Every rank checks every manifest row against its cache file (reads only), then all wait, so they all
decide from the same files. The stale rows are cut into chunks in one order that depends on the
manifest alone (the VAE's chunks are the batches it encodes), and chunk j goes to rank j % world: each
rank writes its own files, no file is written twice, and the chunks (so the batches, and every value
in them) are the same for any number of processes. Rank 0 waits for the others, then prunes.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CacheRanks:
    rank: int = 0
    world: int = 1
    device: torch.device | None = None  # where collectives run (NCCL needs a CUDA tensor)

    @classmethod
    def from_accelerate(cls) -> "CacheRanks":
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())  # without a GPU: CPU processes over gloo
        return cls(state.process_index, state.num_processes, state.device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, index: int) -> bool:
        return index % self.world == self.rank

    def wait(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def gather(self, value: int) -> list[int]:
        """`value` of every rank, by rank (a tensor collective: nothing is pickled)."""
        if self.world == 1:
            return [value]
        mine = torch.tensor([value], dtype=torch.long, device=self.device)
        every = [torch.zeros_like(mine) for _ in range(self.world)]
        torch.distributed.all_gather(every, mine)
        return [int(t.item()) for t in every]
