"""Regional compilation: one `torch.compile` of the block call, shared by all 60 transformer blocks.

The blocks are one class with same-shaped weights, so one graph serves them all (the weights are
inputs to it). Sequence lengths change with every bucket and caption, so the token dimensions are
marked dynamic before the first call: one compilation, no recompiles across buckets, while the
model's widths stay static (Inductor picks its kernels for those).
"""

import torch
import torch._dynamo


def compile_block_call(call):
    # PyTorch releases that still gate selective checkpointing's `context_fn` under compile behind a flag
    if hasattr(torch._dynamo.config, "_experimental_support_context_fn_in_torch_utils_checkpoint"):
        torch._dynamo.config._experimental_support_context_fn_in_torch_utils_checkpoint = True
    return torch.compile(call)


def mark_sequence_dims_dynamic(block_args: tuple) -> None:
    """The token dimensions of a QwenImageTransformerBlock's positional arguments: image and text streams
    (dim 1), the text mask and `modulate_index` (dim 1), the RoPE tables of both streams (dim 0)."""
    positions = {0: 1, 1: 1, 2: 1, 6: 1}  # hidden_states, encoder_hidden_states, the mask, modulate_index
    for position, dim in positions.items():
        if position < len(block_args) and isinstance(block_args[position], torch.Tensor):
            torch._dynamo.maybe_mark_dynamic(block_args[position], dim)
    rotary = block_args[4] if len(block_args) > 4 else None
    for table in rotary or ():
        if isinstance(table, torch.Tensor):
            torch._dynamo.maybe_mark_dynamic(table, 0)


def compile_counts() -> dict[str, int]:
    """Graphs compiled so far in this process (dynamo's counters): a recompile shows as a new graph."""
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]), "graph_breaks": int(sum(counters["graph_break"].values()))}
