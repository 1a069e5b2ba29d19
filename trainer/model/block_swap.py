"""Block swap (`blocks_to_swap: N`): N transformer blocks keep their frozen weights in pinned CPU memory.

Each swapped block's weights are copied onto the accelerator just before the block runs, on a side
stream while the previous block computes, into one of a few fixed "slots" (block-sized device
buffers), and the slot is handed to the next swapped block once the block is done. Per step the
forward, the gradient-checkpoint recompute and the backward of a swapped block each see its weights
on the device; nothing is copied back (the weights are frozen).

What moves: the plain tensors under the frozen parameters of a swapped block, found through tensor
subclasses (optimum-quanto's QTensor inner data and scales) and bitsandbytes' Params4bit with its
quant_state. The LoRA parameters (trainable) stay on the device, so the optimizer and autograd see
the same Parameter objects as without swap. A tensor is re-pointed with `tensor.data = view`: the
Python objects never change, only where their bytes live.

Why gradient checkpointing is required for training: without it autograd keeps views of the weights
(e.g. `weight.t()` saved by matmul) from the forward until the backward, and those views would read
a slot that another block has since been copied into. With checkpointing the forward saves nothing
inside a block, and the recompute (under the backward, weights loaded) makes fresh views that are used
before the slot is handed on. bitsandbytes' 4-bit matmul keeps such a view outside autograd's saved
tensors even with checkpointing, so swapped 4-bit layers run through `_FrozenMatmul4bit`, which
dequantises the current weights in the backward exactly as bitsandbytes does.

When a block is done: in the forward, after its forward hook; in the backward, when the gradient for
a lower block's output arrives (every higher block's backward has then run: autograd's ready queue
runs later-created nodes first). After the backward the lowest swapped blocks stay loaded, since
the next forward needs them first.
"""

from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from trainer.errors import ConfigError
from trainer.model.quantization import repeated_blocks

ALIGN = 512  # bytes: every tensor in a slot starts on this boundary (vectorised kernel loads)
DEFAULT_SLOTS = 2  # the block in use and the next one in flight


def swapped_block_indices(num_blocks: int, blocks_to_swap: int) -> list[int]:
    """Which blocks to swap: spread evenly, so each copy can hide behind resident blocks' compute too."""
    if blocks_to_swap > num_blocks:
        raise ConfigError(
            f"blocks_to_swap {blocks_to_swap}: the transformer has {num_blocks} blocks; set blocks_to_swap "
            f"between 0 and {num_blocks}"
        )
    return sorted({k * num_blocks // blocks_to_swap for k in range(blocks_to_swap)}) if blocks_to_swap else []


def move_to_device_except(model: torch.nn.Module, device: torch.device, keep: set[int]) -> None:
    """`model.to(device)`, except the repeated blocks numbered in `keep` (block swap owns those)."""
    if not keep:
        model.to(device)
        return
    blocks = {id(block): index for index, (_, block) in enumerate(repeated_blocks(model))}
    for child in model.children():
        if isinstance(child, torch.nn.ModuleList) and any(id(b) in blocks for b in child):
            for block in child:
                if blocks[id(block)] not in keep:
                    block.to(device)
        else:
            child.to(device)
    for name, tensor in [*model.named_parameters(recurse=False), *model.named_buffers(recurse=False)]:
        tensor.data = tensor.data.to(device)


def park_frozen_on_cpu(block: torch.nn.Module) -> None:
    """Move a block's frozen bytes to CPU memory as they are. Unlike `block.to("cpu")`, which lets quanto
    convert device-specific packings (int4's GPU layouts) to CPU ones, this keeps the layout the GPU
    kernels will read when BlockSwap copies the bytes back."""
    for t in frozen_leaf_tensors(block):
        t.data = t.data.to("cpu")


def frozen_leaf_tensors(block: torch.nn.Module, recurse: bool = True) -> list[torch.Tensor]:
    """The plain tensors holding the bytes of `block`'s frozen parameters and buffers, each once."""
    found: dict[int, torch.Tensor] = {}

    def leaves(t: torch.Tensor):
        if is_traceable_wrapper_subclass(t):  # quanto QTensor / PackedTensor: its inner tensors hold the bytes
            names, _ = t.__tensor_flatten__()
            for name in names:
                yield from leaves(getattr(t, name))
        else:
            yield t

    for module in block.modules() if recurse else [block]:
        tensors = [p for p in module.parameters(recurse=False) if not p.requires_grad]
        tensors += list(module.buffers(recurse=False))
        for tensor in tensors:
            for leaf in leaves(tensor):
                found.setdefault(id(leaf), leaf)
            quant_state = getattr(tensor, "quant_state", None)  # bitsandbytes Params4bit
            for leaf in _quant_state_tensors(quant_state):
                found.setdefault(id(leaf), leaf)
    return list(found.values())


def _quant_state_tensors(quant_state) -> list[torch.Tensor]:
    if quant_state is None:
        return []
    tensors = [quant_state.absmax]
    if getattr(quant_state, "nested", False):
        tensors += [quant_state.offset, quant_state.state2.absmax]
    return [t for t in tensors if isinstance(t, torch.Tensor)]  # `code` is a small table shared by layers


@dataclass
class _Slot:
    buffer: torch.Tensor  # uint8 on the device
    owner: int | None = None
    free_event: object = None  # compute-stream event after the owner's last use


@dataclass
class _SwappedBlock:
    index: int
    tensors: list[torch.Tensor]
    layout: list[tuple[int, int, torch.dtype, torch.Size]]  # offset, bytes, dtype, shape
    host: torch.Tensor  # uint8, pinned where CUDA is present
    host_views: list[torch.Tensor]
    nbytes: int
    slot: int | None = None
    ready: object = None  # copy-stream event: the slot holds this block's bytes
    handled_backward: int = -1  # graph task whose backward already reached this block
    extra: dict = field(default_factory=dict)


class BlockSwap:
    """Install on a transformer whose other weights are already on `device` (LoRA added, frozen base):

        swap = BlockSwap(transformer, swapped_block_indices(60, 20), device)

    The swapped blocks' frozen weights move to CPU memory (from wherever they are), their trainable
    parameters to `device`. `close()` puts every weight back on `device` and removes the hooks.
    On a CPU "device" the copies run between two CPU buffers (useless, but the same mechanics).
    """

    def __init__(self, model: torch.nn.Module, indices: list[int], device: torch.device, slots: int = DEFAULT_SLOTS):
        self.model = model
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.blocks = [block for _, block in repeated_blocks(model)]
        self.order = sorted(indices)
        self.swapped: dict[int, _SwappedBlock] = {}
        self._copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._backward_task = None
        self.copies = 0  # blocks copied onto the device so far
        shared = _shared_storages(model, self.order, self.blocks)
        for index in self.order:
            self.swapped[index] = self._to_host(index, shared)
        slot_bytes = max((b.nbytes for b in self.swapped.values()), default=0)
        self.slots = [_Slot(torch.empty(slot_bytes, dtype=torch.uint8, device=self.device)) for _ in range(min(slots, len(self.order)))]
        self._handles = []
        model._block_swap = self  # validation finds it to empty the slots before moving the model (evaluation.residency)
        for index, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_pre_hook(self._pre_hook(index)))
            self._handles.append(block.register_forward_hook(self._post_hook(index)))
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()  # the swapped blocks' device copies were just freed

    # -- sizes ---------------------------------------------------------------------------
    @property
    def host_bytes(self) -> int:
        return sum(b.nbytes for b in self.swapped.values())

    @property
    def slot_bytes(self) -> int:
        return sum(s.buffer.numel() for s in self.slots)

    # -- installation --------------------------------------------------------------------
    def _to_host(self, index: int, shared: set[int]) -> _SwappedBlock:
        block = self.blocks[index]
        for p in block.parameters():
            if p.requires_grad and p.device != self.device:
                p.data = p.data.to(self.device)  # LoRA stays on the device: the optimizer's own objects
        _patch_4bit_layers(block)
        tensors = [t for t in frozen_leaf_tensors(block) if t.untyped_storage().data_ptr() not in shared and t.numel()]
        layout, offset = [], 0
        for t in tensors:
            if not t.is_contiguous():
                raise ValueError(f"block swap: a weight of block {index} is not contiguous ({tuple(t.shape)})")
            nbytes = t.numel() * t.element_size()
            layout.append((offset, nbytes, t.dtype, t.shape))
            offset += -(-nbytes // ALIGN) * ALIGN
        host = torch.empty(offset, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
        views = _views(host, layout)
        for t, view in zip(tensors, views):
            view.copy_(t.detach())
            t.data = view  # the device copy is freed once nothing else holds it
        return _SwappedBlock(index, tensors, layout, host, views, offset)

    def close(self) -> None:
        """Every swapped weight back on the device as an ordinary tensor; hooks and buffers gone."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.model.__dict__.pop("_block_swap", None)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        for block in self.swapped.values():
            for t, host_view in zip(block.tensors, block.host_views):
                t.data = host_view.to(self.device, copy=True)
            block.slot = None
        self.swapped, self.slots = {}, []
        for index in range(len(self.blocks)):
            _unpatch_4bit_layers(self.blocks[index])

    # -- hooks ---------------------------------------------------------------------------
    def _pre_hook(self, index: int):
        def hook(module, args):
            if _in_backward():  # the checkpoint recompute
                self._on_backward(index)
                return
            if index in self.swapped and torch.is_grad_enabled() and not getattr(self.model, "gradient_checkpointing", False):
                raise RuntimeError(
                    "block swap: a forward pass with gradients needs gradient checkpointing "
                    "(gradient_checkpointing: true); without it autograd would keep views of swapped weights"
                )
            for other in self.order:  # blocks below are done in this forward
                if other < index and not self._kept_for_backward(other):
                    self._release(other)
            if index in self.swapped:
                self._ensure(index)
            self._prefetch([i for i in self.order if i > index])

        return hook

    def _post_hook(self, index: int):
        def hook(module, args, output):
            if _in_backward():
                return
            backward_follows = torch.is_grad_enabled() and any(
                isinstance(t, torch.Tensor) and t.requires_grad for t in _as_tuple(output)
            )
            if backward_follows:
                for t in _as_tuple(output):
                    if isinstance(t, torch.Tensor) and t.requires_grad:
                        t.register_hook(self._grad_hook(index))
            if index in self.swapped and not (backward_follows and self._kept_for_backward(index)):
                self._release(index)
            if backward_follows and index == len(self.blocks) - 1:
                self._prefetch([i for i in reversed(self.order)])

        return hook

    def _kept_for_backward(self, index: int) -> bool:
        """The last swapped blocks of a forward with gradients are the backward's first: they stay."""
        return torch.is_grad_enabled() and index in self.order[-len(self.slots):]

    def _grad_hook(self, index: int):
        def hook(grad):
            self._on_backward(index)

        return hook

    def _on_backward(self, index: int) -> None:
        """Block `index`'s backward is about to run (its output's gradient is complete)."""
        task = torch._C._current_graph_task_id()
        if self._backward_task != task:
            self._backward_task = task
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)
        for other in self.order:  # every higher block's backward has run
            if other > index and other not in self.order[: len(self.slots)]:  # the next forward's first stay
                self._release(other)
        if index in self.swapped:
            self._ensure(index)
        self._prefetch([i for i in reversed(self.order) if i < index])

    def _backward_done(self) -> None:
        self._backward_task = None  # the lowest blocks stay loaded: the next forward starts with them

    # -- moving bytes --------------------------------------------------------------------
    def _prefetch(self, upcoming: list[int]) -> None:
        for index in upcoming:
            block = self.swapped[index]
            if block.slot is not None:
                continue
            if not any(s.owner is None for s in self.slots):
                return
            self._load(block)

    def _ensure(self, index: int) -> None:
        block = self.swapped[index]
        if block.slot is None:
            if not any(s.owner is None for s in self.slots):  # only the running block is in use
                self._release(next(s.owner for s in self.slots if s.owner != index))
            self._load(block)
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(block.ready)

    def _load(self, block: _SwappedBlock) -> None:
        number = next(i for i, s in enumerate(self.slots) if s.owner is None)
        slot = self.slots[number]
        target = slot.buffer[: block.nbytes]
        if self.cuda:
            with torch.cuda.stream(self._copy_stream):
                if slot.free_event is not None:
                    self._copy_stream.wait_event(slot.free_event)  # the previous owner's kernels are done
                target.copy_(block.host, non_blocking=True)
                block.ready = self._copy_stream.record_event()
        else:
            target.copy_(block.host)
        for t, view in zip(block.tensors, _views(slot.buffer, block.layout)):
            t.data = view
        slot.owner, block.slot = block.index, number
        self.copies += 1

    def _release(self, index: int) -> None:
        block = self.swapped[index]
        if block.slot is None:
            return
        for t, host_view in zip(block.tensors, block.host_views):
            t.data = host_view
        slot = self.slots[block.slot]
        if self.cuda:
            slot.free_event = torch.cuda.current_stream(self.device).record_event()
        slot.owner, block.slot = None, None

    def release_all(self) -> None:
        """Every swapped block back on its host copy (e.g. before the rest of the model leaves the card)."""
        for index in self.order:
            self._release(index)

    def loaded(self) -> list[int]:
        """The swapped blocks whose weights are on the device now."""
        return sorted(s.owner for s in self.slots if s.owner is not None)

    def on_device(self, tensor: torch.Tensor) -> bool:
        """Whether `tensor` (a swapped weight) points into a device slot now."""
        pointer = tensor.data_ptr()
        return any(s.buffer.data_ptr() <= pointer < s.buffer.data_ptr() + s.buffer.numel() for s in self.slots)


def _views(flat: torch.Tensor, layout) -> list[torch.Tensor]:
    return [flat[offset : offset + nbytes].view(dtype).view(shape) for offset, nbytes, dtype, shape in layout]


def _as_tuple(output) -> tuple:
    return output if isinstance(output, tuple) else (output,)


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _shared_storages(model: torch.nn.Module, swapped: list[int], blocks: list[torch.nn.Module]) -> set[int]:
    """Storages that a tensor outside the swapped blocks, or a second tensor, also uses: those stay put."""
    inside = {id(m) for i in swapped for m in blocks[i].modules()}
    seen: dict[int, int] = {}
    outside: set[int] = set()
    for module in model.modules():
        leaves = frozen_leaf_tensors(module, recurse=False)
        for t in leaves:
            pointer = t.untyped_storage().data_ptr()
            seen[pointer] = seen.get(pointer, 0) + 1
            if id(module) not in inside:
                outside.add(pointer)
    return outside | {p for p, n in seen.items() if n > 1}


# -- bitsandbytes 4-bit layers -----------------------------------------------------------------


def _patch_4bit_layers(block: torch.nn.Module) -> None:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for module in block.modules():
        if isinstance(module, bnb.nn.Linear4bit) and "forward" not in module.__dict__:
            module.forward = _linear4bit_forward.__get__(module)


def _unpatch_4bit_layers(block: torch.nn.Module) -> None:
    for module in block.modules():
        if module.__dict__.get("forward") is not None and getattr(module.__dict__["forward"], "__func__", None) is _linear4bit_forward:
            del module.forward


def _linear4bit_forward(self, x: torch.Tensor) -> torch.Tensor:
    return _FrozenMatmul4bit.apply(x, self)


class _FrozenMatmul4bit(torch.autograd.Function):
    """bitsandbytes' Linear4bit forward, with a backward that reads the weights as they are then.

    bitsandbytes keeps the packed weight from the forward on its autograd context (not as a saved
    tensor, so checkpointing does not drop it); under block swap that slot may hold another block by the
    backward. Here the context keeps the module, and the backward dequantises its current weight
    and quant_state, as `MatMul4Bit.backward` does, for the input's gradient only (the base is frozen).
    """

    @staticmethod
    def forward(ctx, x, module):
        import bitsandbytes as bnb

        with torch.no_grad():
            out = bnb.nn.Linear4bit.forward(module, x)
        ctx.module, ctx.x_dtype = module, x.dtype
        ctx.compute_dtype = module.compute_dtype or x.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        import bitsandbytes.functional as F

        weight = ctx.module.weight
        grad = grad.to(ctx.compute_dtype)  # the gradient of bitsandbytes' `.to(inp_dtype)` of its output
        dequantized = F.dequantize_4bit(weight.view(-1, 1), weight.quant_state).to(grad.dtype)
        return torch.matmul(grad, dequantized).to(ctx.x_dtype), None
