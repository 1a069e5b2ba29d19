"""FSDP2 shards: full tensors out for saving, shards back in for resuming.

Under FSDP2 (`accelerate launch --config_file config/accelerate/fsdp.yaml`) each parameter and
its optimiser state is a DTensor holding this rank's shard. The LoRA file and checkpoints hold
full tensors, exactly as without FSDP, so a run can be saved, loaded and resumed either way.
Without FSDP every function here leaves tensors as they are.
"""

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor all-gathered to the whole tensor (a collective: every rank calls it, in the same order)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()` with every sharded state tensor gathered (a collective)."""
    state = optimizer.state_dict()
    slots = {index: {key: full_tensor(value) for key, value in slot.items()} for index, slot in state["state"].items()}
    return {**state, "state": slots}


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full optimiser state; a sharded parameter's state is cut to that parameter's shard."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for param in group["params"]:
            if isinstance(param, DTensor):
                slot = optimizer.state.get(param, {})
                for key, value in slot.items():
                    if torch.is_tensor(value) and not isinstance(value, DTensor) and value.shape == param.shape:
                        # every rank read the same full tensor: each keeps its own shard, nothing is sent
                        slot[key] = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
