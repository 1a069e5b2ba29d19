"""GPU-memory savers for a LoRA step on a quantised base: pure data movement, same numbers.

With gradient checkpointing the 20B transformer keeps, until backward, only each block's inputs
(~56 MiB per block for 1 reference and 1300 text tokens, 60 blocks: 3.3 GiB), and AdamW keeps
two float32 moments per LoRA weight (0.7 GiB at rank 32). Neither is needed on the GPU while the
rest of the step runs:

- `OffloadActivations` moves what autograd saves during the forward (with checkpointing: the
  block inputs) to pinned CPU memory on a side stream, and brings each back when backward needs
  it. Tensors saved inside a checkpointed block are not saved at all (checkpoint's own hooks win),
  so the recomputed block stays on the GPU.
- `offload_optimizer_state` keeps the optimizer's state tensors in pinned CPU memory between
  steps and moves them to the GPU just for `optimizer.step()` (~1.4 GB of copies per step).

Both copy bits, so training computes exactly what it would without them. Measured on an H100
(benchmarks/README.md, int8 base, 1 reference x 1300 text tokens): peak 25.5 -> 21.9 GiB
allocated, 2.22 -> 2.31-2.42 s per step. `use_expandable_segments` brought the reserved peak
from 23.9 to 23.3 GiB there.
"""

import os

import torch
from torch.utils.hooks import RemovableHandle

MIN_OFFLOAD_BYTES = 1 << 20  # smaller saved tensors are not worth a copy


class OffloadActivations(torch.autograd.graph.saved_tensors_hooks):
    """Context manager around the forward (the backward needs none):

        with OffloadActivations():
            loss = flow_matching_loss(...)
        loss.backward()

    Parameters and tensor subclasses (quanto's quantised weights) stay where they are; only plain
    accelerator tensors of at least `min_bytes` move. With `use_stream` the copies to the CPU run on
    a side stream, overlapping the next block's compute.
    """

    def __init__(self, min_bytes: int = MIN_OFFLOAD_BYTES, use_stream: bool = True):
        self.min_bytes = min_bytes
        self.offloaded_bytes = 0
        self._stream = torch.cuda.Stream() if use_stream and torch.cuda.is_available() else None
        super().__init__(self._pack, self._unpack)

    def offloadable(self, tensor: torch.Tensor) -> bool:
        return (
            tensor.device.type == "cuda"
            and type(tensor) is torch.Tensor  # not a Parameter, not a quanto QTensor
            and not tensor.is_sparse
            and tensor.numel() * tensor.element_size() >= self.min_bytes
        )

    def _pack(self, tensor: torch.Tensor):
        if not self.offloadable(tensor):
            return tensor
        host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=torch.cuda.is_available())
        event = None
        if self._stream is not None and tensor.device.type == "cuda":
            self._stream.wait_stream(torch.cuda.current_stream(tensor.device))
            with torch.cuda.stream(self._stream):
                host.copy_(tensor, non_blocking=True)
            tensor.record_stream(self._stream)  # its memory is not reused before the copy is done
            event = self._stream.record_event()
        else:
            host.copy_(tensor, non_blocking=True)
        self.offloaded_bytes += host.numel() * host.element_size()
        return _Offloaded(tensor.device, host, event)

    @staticmethod
    def _unpack(packed):
        if not isinstance(packed, _Offloaded):
            return packed
        if packed.event is not None:
            torch.cuda.current_stream(packed.device).wait_event(packed.event)
        return packed.host.to(packed.device, non_blocking=True)


class _Offloaded:
    __slots__ = ("device", "host", "event")

    def __init__(self, device, host, event):
        self.device, self.host, self.event = device, host, event


def offload_optimizer_state(optimizer: torch.optim.Optimizer) -> list[RemovableHandle]:
    """Keep `optimizer`'s accelerator state tensors in pinned CPU memory outside `step()`.

    Register on the plain torch optimizer (before `accelerator.prepare`). For `step()` the state
    comes back as views of one buffer per device and dtype, so that the memory it frees afterwards
    is one large block the next forward and backward reuse. The copies are queued on the current
    stream: `step()` does not wait for them; `state_dict()` does.
    """
    host_buffers: dict[tuple[int, str], torch.Tensor] = {}
    devices: dict[tuple[int, str], torch.device] = {}
    pending: list = []

    def to_device(opt, args, kwargs):
        groups: dict[tuple, list] = {}
        for param, state in opt.state.items():
            for key, value in state.items():
                slot = (id(param), key)
                if isinstance(value, torch.Tensor) and value.device.type == "cpu" and slot in devices:
                    groups.setdefault((devices[slot], value.dtype), []).append((state, key, value))
        for (device, dtype), items in groups.items():
            offsets, total = [], 0
            for _, _, host in items:
                offsets.append(total)
                total += -(-host.numel() // 16) * 16  # 16-element aligned views
            flat = torch.empty(total, dtype=dtype, device=device)
            for (state, key, host), offset in zip(items, offsets):
                view = flat[offset : offset + host.numel()].view(host.shape)
                view.copy_(host, non_blocking=True)
                state[key] = view

    def to_host(opt, args, kwargs):
        first = not host_buffers
        for param, state in opt.state.items():
            for key, value in state.items():
                if not isinstance(value, torch.Tensor) or value.device.type == "cpu":
                    continue
                slot = (id(param), key)
                host = host_buffers.get(slot)
                if host is None or host.shape != value.shape or host.dtype != value.dtype:
                    host = host_buffers[slot] = torch.empty(
                        value.shape, dtype=value.dtype, device="cpu", pin_memory=value.device.type == "cuda"
                    )
                host.copy_(value, non_blocking=True)
                devices[slot] = value.device
                state[key] = host
        if torch.cuda.is_available() and host_buffers:
            pending[:] = [torch.cuda.current_stream().record_event()]
            if first:  # the optimizer's lazily created state sat in many small cached blocks
                torch.cuda.empty_cache()

    def wait_for_copies(opt):
        for event in pending:
            event.synchronize()

    return [
        optimizer.register_step_pre_hook(to_device),
        optimizer.register_step_post_hook(to_host),
        optimizer.register_state_dict_pre_hook(wait_for_copies),
    ]


def use_expandable_segments() -> bool:
    """Ask PyTorch's CUDA allocator for expandable segments (less fragmentation, so the reserved
    peak stays near the allocated one) unless the user set PYTORCH_CUDA_ALLOC_CONF. Effective only
    before CUDA is first used; returns whether it will apply."""
    if "PYTORCH_CUDA_ALLOC_CONF" in os.environ or torch.cuda.is_initialized():
        return False
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    return True
