"""Which scaled-dot-product-attention kernel the transformer's joint attention uses (`attention_backend`).

`native` lets PyTorch choose (FlashAttention-2 for bf16 without a mask); `cudnn` asks for cuDNN's fused
attention, the fastest on Hopper GPUs; `flash` forces FlashAttention-2. All compute the same
attention; the kernels differ in speed and in rounding. The choice is diffusers' per-processor
attention backend, so it holds in the forward pass, in gradient checkpointing's recomputation and in
live validation alike.
"""

import torch

from trainer.errors import ConfigError

DIFFUSERS_BACKENDS = {"cudnn": "_native_cudnn", "flash": "_native_flash"}


def set_attention_backend(transformer, backend: str, device: torch.device) -> None:
    if backend == "native":
        return
    if device.type != "cuda":
        raise ConfigError(f"attention_backend {backend!r} needs a CUDA GPU; use attention_backend 'native' on this machine")
    transformer.set_attention_backend(DIFFUSERS_BACKENDS[backend])
