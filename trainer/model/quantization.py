"""Quantising the frozen base transformer (`base_model_precision`) so the 20B model fits 24 GB.

optimum-quanto's QLinear subclasses nn.Linear, so peft wraps quantised layers directly:
quantise and freeze first, then add the LoRA. The exported LoRA loads into an unquantised
pipeline; it is never fused into quantised weights (a silent no-op there).
"""

from collections.abc import Collection

import torch

from trainer.config.schema import TrainConfig
from trainer.errors import ConfigError

QUANTO_WEIGHTS = {"int8-quanto": "qint8", "int4-quanto": "qint4", "int2-quanto": "qint2", "fp8-quanto": "qfloat8"}
# Layers at the model's edges stay in full precision: they are small and most sensitive.
KEEP_FULL_PRECISION = ["img_in", "txt_in", "proj_out", "norm_out.*", "time_text_embed.*"]


def quantize_transformer(
    transformer: torch.nn.Module, config: TrainConfig, device: torch.device, stay_on_cpu: Collection[int] = ()
) -> None:
    """`stay_on_cpu`: numbers of the blocks that block swap keeps in CPU memory; on the accelerator path
    each goes back to the CPU once quantised, so the card never holds more than it will during training."""
    precision = config.base_model_precision
    if precision == "nf4-bnb":
        raise ConfigError(
            "base_model_precision 'nf4-bnb' is applied when the transformer is loaded "
            "(trainer.model.loading.bnb_quantization_config); it cannot be applied afterwards"
        )
    if precision == "fp8-native":
        convert_transformer_to_fp8(transformer, config, device, stay_on_cpu)
        return
    import optimum.quanto as quanto

    weights = getattr(quanto, QUANTO_WEIGHTS[precision])
    activations = quanto.qint8 if config.quantize_activations else None
    done = []
    if config.quantize_via == "accelerator":
        # Quantise on the accelerator (fast), one block at a time: its peak memory is the quantised
        # model plus one block in full precision (0.7 GB for the 20B model), not the whole bf16 model
        # (38 GiB). Each layer is quantised exactly as a whole-model pass would.
        from trainer.model.block_swap import move_to_device_except, park_frozen_on_cpu

        for index, (prefix, block) in enumerate(repeated_blocks(transformer)):
            block.to(device)
            quanto.quantize(
                transformer, weights=weights, activations=activations, include=[f"{prefix}.*"], exclude=KEEP_FULL_PRECISION
            )
            quanto.freeze(block)
            if index in stay_on_cpu:
                block.requires_grad_(False)  # quanto's freeze makes a trainable Parameter; the base is frozen
                park_frozen_on_cpu(block)
            done.append(f"{prefix}.*")
        move_to_device_except(transformer, device, set(stay_on_cpu))
    quanto.quantize(transformer, weights=weights, activations=activations, exclude=KEEP_FULL_PRECISION + done)
    quanto.freeze(transformer)


def convert_transformer_to_fp8(
    transformer: torch.nn.Module, config: TrainConfig, device: torch.device, stay_on_cpu: Collection[int] = ()
) -> None:
    """fp8-native (trainer.model.fp8_linear): every linear layer of the blocks in float8, the edges in full
    precision. On the accelerator path one block at a time reaches the card in full precision."""
    from trainer.model.block_swap import move_to_device_except, park_frozen_on_cpu
    from trainer.model.fp8_linear import convert_linears_to_fp8, use_native_fp8

    on_accelerator = config.quantize_via == "accelerator"
    for index, (prefix, block) in enumerate(repeated_blocks(transformer)):
        if on_accelerator:
            block.to(device)
        convert_linears_to_fp8(block, KEEP_FULL_PRECISION, prefix)
        if on_accelerator and index in stay_on_cpu:
            park_frozen_on_cpu(block)
    convert_linears_to_fp8(transformer, KEEP_FULL_PRECISION)  # any linear layer outside the blocks, edges excepted
    if on_accelerator:
        move_to_device_except(transformer, device, set(stay_on_cpu))
    use_native_fp8(transformer, device)


def repeated_blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, block) for each element of the model's top-level ModuleLists (the transformer blocks)."""
    return [
        (f"{name}.{index}", block)
        for name, child in model.named_children()
        if isinstance(child, torch.nn.ModuleList)
        for index, block in enumerate(child)
    ]


def bnb_quantization_config(config: TrainConfig):
    """diffusers' BitsAndBytesConfig for nf4, or a clear error where bitsandbytes cannot run."""
    if not torch.cuda.is_available():
        raise ConfigError("base_model_precision 'nf4-bnb' needs a CUDA GPU (bitsandbytes); use 'int8-quanto' on this machine")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("base_model_precision 'nf4-bnb' needs bitsandbytes: pip install bitsandbytes") from None
    from diffusers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
