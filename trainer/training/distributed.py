"""The accelerator and optimizer a run trains with, and the settings FSDP refuses up front."""

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs, DistributedType
from accelerate.utils import parse_flag_from_env

from trainer.config.schema import TrainConfig
from trainer.errors import ConfigError


def make_accelerator(config: TrainConfig) -> Accelerator:
    on_cpu = not torch.cuda.is_available()
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision="no" if on_cpu else config.mixed_precision,
        cpu=on_cpu,
        # the last block's text-stream LoRA layers get no gradient (their output is discarded)
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    if parse_flag_from_env("ACCELERATE_USE_FSDP") and accelerator.distributed_type != DistributedType.FSDP:
        # accelerate shards only on accelerators: elsewhere it would quietly train unsharded
        raise ConfigError(
            f"the accelerate config asks for FSDP, but accelerate runs FSDP on GPUs only and would train "
            f"{accelerator.distributed_type.value} (unsharded) here; use config/accelerate/ddp.yaml on this machine"
        )
    return accelerator


def check_fsdp_config(config: TrainConfig) -> None:
    """Refuse, before any model is loaded, the settings that cannot run on a sharded transformer."""
    if config.base_model_precision != "no_change":
        raise ConfigError(
            f"base_model_precision {config.base_model_precision!r} cannot be sharded by FSDP (quantised weights are "
            "not plain tensors); set base_model_precision 'no_change', or keep the quantised base with "
            "config/accelerate/ddp.yaml (it fits one card)"
        )
    if config.lora_type != "standard" or config.use_dora:
        key = "lora_type 'lycoris'" if config.lora_type != "standard" else "use_dora"
        raise ConfigError(
            f"{key} is not supported with FSDP here (its export reads the frozen weights and peft's layers, which FSDP "
            "shards; untested): train it with config/accelerate/ddp.yaml or on one GPU, or use a standard LoRA"
        )
    if config.use_ema:
        raise ConfigError(
            "use_ema is not supported with FSDP (the EMA copy of the LoRA is not sharded); set use_ema false, "
            "or use config/accelerate/ddp.yaml"
        )
    if config.offload_optimizer_state:
        raise ConfigError(
            "offload_optimizer_state is not supported with FSDP (it shards the optimizer state across the cards "
            "already); set offload_optimizer_state false, or keep it with config/accelerate/ddp.yaml"
        )
    if config.blocks_to_swap:
        raise ConfigError(
            "blocks_to_swap is not supported with FSDP (each card holds only its shard of every block already); "
            "set blocks_to_swap 0, or keep block swap with config/accelerate/ddp.yaml or on one GPU"
        )
    if config.validation_step_interval:
        raise ConfigError(
            "validation_step_interval is not supported with FSDP: live validation runs on rank 0 alone, and the sharded "
            "transformer needs every rank for each forward pass; unset it (the validation_report asset and "
            "`qwen-edit train` validate the saved LoRA after training), or use config/accelerate/ddp.yaml"
        )


def make_optimizer(config: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if config.optimizer == "adamw8bit":
        if not torch.cuda.is_available():
            raise ConfigError("optimizer 'adamw8bit' needs a CUDA GPU (bitsandbytes); use 'adamw' on this machine")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("optimizer 'adamw8bit' needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(params, lr=config.learning_rate, weight_decay=1e-2)
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=1e-2)
