"""The training step's speed settings, applied to the transformer after the LoRA is added.

With the defaults this is exactly diffusers' `enable_gradient_checkpointing()` (or nothing): the
levers are opt-in config keys, each measured in benchmarks/RESULTS.md ("Issue 10: step speed").
"""

import torch

from trainer.config.schema import TrainConfig
from trainer.model.attention import set_attention_backend
from trainer.model.checkpointing import BlockRunner


def apply_speed_settings(transformer, config: TrainConfig, device: torch.device) -> None:
    """Attention backend, (selective) gradient checkpointing and compiled blocks, as `config` asks."""
    set_attention_backend(transformer, config.attention_backend, device)
    interval = config.gradient_checkpointing_interval if config.gradient_checkpointing else None
    selective = config.gradient_checkpointing and (interval > 1 or config.gradient_checkpointing_keep_attention)
    if config.compile_transformer_blocks or selective:
        runner = BlockRunner(
            transformer.transformer_blocks, interval, config.gradient_checkpointing_keep_attention, config.compile_transformer_blocks
        )
        transformer.enable_gradient_checkpointing(runner)  # diffusers calls it for every block while gradients are on
    elif config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
