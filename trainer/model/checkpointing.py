"""Selective gradient checkpointing of the transformer blocks (and their compiled calls).

diffusers runs each block through the model's `_gradient_checkpointing_func` while gradients are on;
`BlockRunner` is that function. It decides per block:

- `gradient_checkpointing_interval: N` (SimpleTuner's key): only every N-th block (0, N, 2N, ...)
  is checkpointed, the others keep their activations (faster, more memory);
- `gradient_checkpointing_keep_attention`: a checkpointed block keeps its attention output (about
  what its input costs again), so the backward pass recomputes everything but the attention, the
  block's costliest op (PyTorch's selective activation checkpointing, `create_selective_checkpoint_contexts`);
- `compile_transformer_blocks`: both calls are compiled once for every block (`trainer.model.compile`);
  the checkpoint sits inside the compiled region, so recomputation and backward are one graph.

Each variant computes the same function: only what is kept between forward and backward changes.
"""

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from trainer.model.compile import compile_block_call, mark_sequence_dims_dynamic

# The fused attention kernels scaled_dot_product_attention dispatches to (the math fallback is many ops).
ATTENTION_OPS = tuple(
    getattr(torch.ops.aten, name).default
    for name in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    )
    if hasattr(torch.ops.aten, name)
)


def _keep_attention_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


_keep_attention = functools.partial(create_selective_checkpoint_contexts, _keep_attention_policy)


def plain_block_call(block, *args):
    return block(*args)


def checkpointed_block_call(block, *args):
    return checkpoint(block.__call__, *args, use_reentrant=False)


def checkpointed_block_call_keeping_attention(block, *args):
    return checkpoint(block.__call__, *args, use_reentrant=False, context_fn=_keep_attention)


class BlockRunner:
    """The model's `_gradient_checkpointing_func`: runs each block checkpointed or not, compiled or not."""

    def __init__(self, blocks, interval: int | None, keep_attention: bool = False, compile_blocks: bool = False):
        """`interval` None: no block is checkpointed (compilation alone)."""
        self.checkpointed = {id(block) for index, block in enumerate(blocks) if interval and index % interval == 0}
        checkpointed = checkpointed_block_call_keeping_attention if keep_attention else checkpointed_block_call
        self.eager = {True: checkpointed, False: plain_block_call}
        self.compiled = {key: compile_block_call(call) for key, call in self.eager.items()} if compile_blocks else None

    def __call__(self, block, *args):
        checkpointed = id(block) in self.checkpointed
        # The first block's input needs no gradient: compiling that case too would cost a second graph
        # (minutes) for 1/60 of the work, so it runs eagerly.
        if self.compiled is not None and args[0].requires_grad:
            mark_sequence_dims_dynamic(args)
            return self.compiled[checkpointed](block, *args)
        return self.eager[checkpointed](block, *args)
