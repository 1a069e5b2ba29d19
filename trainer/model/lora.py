"""The LoRA adapter: added with peft, saved in diffusers' format with its adapter metadata.

DoRA, LoKr and LoHa (trainer.model.adapters) go through the same state dict, checkpoint and export
functions; only their ComfyUI tensors and the notes in the files differ."""

import json
import os
import tempfile
from pathlib import Path

import torch
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from trainer.faults import kill_point
from trainer.training.sharding import full_tensor

# The MMDiT's attention projections of both streams, as diffusers' Qwen-Image LoRA script targets.
TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
COMFYUI_WEIGHTS_NAME = "pytorch_lora_weights_comfyui.safetensors"
USE_IN_KEY = "qwen_edit.use_in"  # safetensors metadata: which program each file is for
NOTE_KEY = "qwen_edit.note"


def add_lora(transformer, rank: int, alpha: float, seed: int) -> list[torch.nn.Parameter]:
    """Freeze the base, add a trainable LoRA; return its parameters (kept in float32)."""
    from trainer.model.adapters import AdapterPlan, add_adapter

    return add_adapter(transformer, AdapterPlan("lora", rank, alpha), seed)


def lora_state_dict(transformer) -> dict[str, torch.Tensor]:
    """The adapter's weights as full CPU tensors. Under FSDP each is gathered from its shards:
    a collective, so every rank calls this."""
    return {k: full_tensor(v).detach().cpu().contiguous() for k, v in get_peft_model_state_dict(transformer).items()}


def load_lora_state_dict(transformer, state_dict: dict[str, torch.Tensor], source: str = "the LoRA state") -> None:
    """Load a saved LoRA (e.g. a checkpoint's) into the model's adapter, refusing one that does not fit.

    Checked before loading, so a changed lora_rank or model gives one error naming `source` and the
    fix instead of torch's size-mismatch traceback (or a partly loaded adapter).
    """
    from trainer.errors import ConfigError

    wanted = {key: tuple(value.shape) for key, value in get_peft_model_state_dict(transformer).items()}
    unexpected = sorted(set(state_dict) - set(wanted))
    missing = sorted(set(wanted) - set(state_dict))
    resized = sorted(k for k in set(state_dict) & set(wanted) if tuple(state_dict[k].shape) != wanted[k])
    problems = [f"{len(unexpected)} layer(s) the model has no LoRA for, e.g. {unexpected[0]}"] if unexpected else []
    problems += [f"{len(missing)} of the model's LoRA layer(s) missing, e.g. {missing[0]}"] if missing else []
    if resized:
        key = resized[0]
        problems.append(f"{len(resized)} layer(s) of another shape, e.g. {key}: {tuple(state_dict[key].shape)} "
                        f"saved, {wanted[key]} in this model (another lora_rank?)")
    if problems:
        raise ConfigError(
            f"{source} does not fit this model's LoRA: {'; '.join(problems)}. It was saved with another lora_rank, "
            "adapter (lora_type, use_dora, lycoris_config), model or flavour: resume with the settings it was trained with, or train from scratch "
            "(a new output_dir, or without resume_from_checkpoint)"
        )
    set_peft_model_state_dict(transformer, state_dict)


def adapter_metadata(transformer) -> dict:
    """Rank and alpha travel with the file: without them a reload assumes alpha = rank."""
    return transformer.peft_config["default"].to_dict()


def save_lora(
    pipeline_cls, layers: dict[str, torch.Tensor], metadata: dict, out_dir: Path, comfyui: dict[str, torch.Tensor] | None = None,
    lycoris: dict | None = None,
) -> Path:
    """Write `pytorch_lora_weights.safetensors` that `pipeline.load_lora_weights(out_dir)` loads (DoRA too;
    LoKr and LoHa: `trainer.model.adapters.load_adapter`), and the ComfyUI file beside it.

    `layers` is `lora_state_dict(transformer)` and `metadata` `adapter_metadata(transformer)`:
    gathered on every rank, written by one. `comfyui` (`adapters.comfyui_tensors`) is the ComfyUI file's
    content for the adapters other than LoRA, whose ComfyUI arithmetic needs the model to be worked out;
    `lycoris` the lycoris_config the adapter was trained from, kept in the file's metadata.
    """
    from trainer.model.adapters import ADAPTER_KEY, LYCORIS_KEY, adapter_file_notes, metadata_kind

    kind = metadata_kind(metadata)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".saving-") as tmp:  # rename = atomic
        pipeline_cls.save_lora_weights(tmp, transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata)
        if kind == "lora":
            notes = diffusers_file_notes(metadata["r"], metadata["lora_alpha"])
        else:
            notes = {ADAPTER_KEY: kind, **adapter_file_notes(kind)}
            notes.update({LYCORIS_KEY: json.dumps(lycoris)} if lycoris is not None else {})
        _add_metadata(Path(tmp) / LORA_WEIGHTS_NAME, notes)
        kill_point("lora.diffusers_written")
        os.replace(Path(tmp) / LORA_WEIGHTS_NAME, out_dir / LORA_WEIGHTS_NAME)
    kill_point("lora.before_comfyui")
    if kind == "lora":
        export_comfyui(out_dir / LORA_WEIGHTS_NAME, out_dir / COMFYUI_WEIGHTS_NAME, metadata["lora_alpha"])
    else:
        _write_comfyui(comfyui, out_dir / COMFYUI_WEIGHTS_NAME, {ADAPTER_KEY: kind, **adapter_file_notes(kind, comfyui=True)})
    return out_dir / LORA_WEIGHTS_NAME


def diffusers_file_notes(rank: int, alpha: float) -> dict[str, str]:
    """This file has no `.alpha` keys: ComfyUI would apply it at scale 1.0 instead of alpha / rank."""
    return {
        USE_IN_KEY: "diffusers (pipeline.load_lora_weights)",
        NOTE_KEY: f"for ComfyUI use {COMFYUI_WEIGHTS_NAME} (has .alpha): ComfyUI reads no alpha from this file "
        f"and would apply it at scale 1.0 instead of lora_alpha / rank = {alpha:g} / {rank} = {alpha / rank:g}",
    }


def comfyui_file_notes(alpha: float) -> dict[str, str]:
    return {
        USE_IN_KEY: "ComfyUI (LoraLoaderModelOnly)",
        NOTE_KEY: f"ComfyUI keys (diffusion_model.*) with .alpha = {alpha:g} per layer; diffusers loads it too "
        f"(load_lora_weights(folder, weight_name='{COMFYUI_WEIGHTS_NAME}'))",
    }


def _add_metadata(path: Path, notes: dict[str, str]) -> None:
    """Rewrite a safetensors file in place with `notes` added to its metadata (used on a temp file)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    save_file(load_file(str(path)), str(path), metadata={**metadata, **notes})


def export_comfyui(diffusers_file: Path, out_file: Path, alpha: float) -> Path:
    """The same LoRA in ComfyUI's key format: `diffusion_model.<module>.lora_A/B.weight` + `.alpha`.

    diffusers' `load_lora_weights` reads this format too (it converts `diffusion_model.` keys).
    """
    from safetensors.torch import load_file

    tensors = {}
    for key, value in load_file(str(diffusers_file)).items():
        module_key = "diffusion_model." + key.removeprefix("transformer.")
        tensors[module_key] = value
        if key.endswith(".lora_A.weight"):
            tensors[module_key.removesuffix(".lora_A.weight") + ".alpha"] = torch.tensor(float(alpha))
    return _write_comfyui(tensors, out_file, comfyui_file_notes(alpha))


def _write_comfyui(tensors: dict[str, torch.Tensor], out_file: Path, notes: dict[str, str]) -> Path:
    from safetensors.torch import save_file

    from trainer.io import atomic_write_with

    metadata = {"format": "pt", **notes}
    atomic_write_with(out_file, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return out_file
