"""Loading the model components, always through diffusers' `from_pretrained`.

The same calls load `Qwen/Qwen-Image-Edit` from the Hub, a local diffusers folder, or the
tiny random-weight test model: nothing here knows which one it is given.
"""

from contextlib import contextmanager
from pathlib import Path

import torch

from trainer.config.schema import TrainConfig


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    """bf16/fp16 on accelerators as configured; float32 on the CPU, where half types are slow."""
    if device.type == "cpu" or config.mixed_precision == "no":
        return torch.float32
    return torch.bfloat16 if config.mixed_precision == "bf16" else torch.float16


def cached_snapshot(model: str, cache_dir: str | Path | None = None) -> Path | None:
    """The folder of `model` in the local Hugging Face cache, or None when it is not there.

    Only "not in the cache" means None (huggingface_hub's LocalEntryNotFoundError, which includes
    an incomplete snapshot); anything else, such as an invalid repo id, is an error to see.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model, local_files_only=True, cache_dir=cache_dir))
    except LocalEntryNotFoundError:
        return None


def load_pipeline(
    config: TrainConfig,
    device: torch.device,
    dtype: torch.dtype,
    *,
    transformer: bool = True,
    text_encoder: bool = True,
    vae: bool = True,
):
    """The flavour's diffusers pipeline; components not asked for are not loaded at all."""
    skip = {
        name: None
        for name, wanted in (("transformer", transformer), ("text_encoder", text_encoder), ("vae", vae))
        if not wanted
    }
    with _safetensors_only(config):
        pipe = config.flavour.pipeline_cls().from_pretrained(config.model_path, dtype=dtype, use_safetensors=True, **skip)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_transformer(config: TrainConfig, dtype: torch.dtype):
    """The flavour's transformer class (`Flavour.transformer_class`) from the model's `transformer/` folder."""
    kwargs = {}
    if config.base_model_precision == "nf4-bnb":
        from trainer.model.quantization import bnb_quantization_config

        kwargs["quantization_config"] = bnb_quantization_config(config)
    with _safetensors_only(config):
        return config.flavour.transformer_cls().from_pretrained(
            config.model_path, subfolder="transformer", dtype=dtype, use_safetensors=True, **kwargs
        )


@contextmanager
def _safetensors_only(config: TrainConfig):
    """Weights load from .safetensors only: a pickled .bin/.pt in a model folder could run code when loaded."""
    try:
        yield
    except OSError as exc:
        from trainer.errors import ConfigError

        raise ConfigError(
            f"pretrained_model_name_or_path={config.model_path!r}: cannot load the model ({' '.join(str(exc).split())[:300]}); "
            "qwen-edit reads weights from .safetensors files only (pickled .bin/.pt weights can run code when loaded)"
        ) from None
