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


def speed_notes(config: TrainConfig) -> list[str]:
    """What `qwen-edit check` says about a speed setting that measured worse than it reads
    (benchmarks/RESULTS.md, issue 10)."""
    notes = []
    if config.base_model_precision == "fp8-native" and not config.compile_transformer_blocks:
        notes.append(
            "fp8-native without compile_transformer_blocks is slower than bf16 and needs more memory (eager mode "
            "keeps the quantisation temporaries: 3.1 s vs 1.2 s a step, 67 vs 47 GiB on an H200); "
            "set compile_transformer_blocks true"
        )
    return notes
