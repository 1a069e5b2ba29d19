"""Loss masks: SimpleTuner's `conditioning_type: "mask"` datasets, one mask image per target (same name, same size).

A mask is read as SimpleTuner reads it: its first (red) channel, 0..255 -> 0..1, brought to the target's
bucket with the target's own resize-and-crop, then averaged over each latent pixel ("area"), so the loss of
a latent pixel is weighted by the share of white under it. White trains, black is left out, grey weighs in
between. The result [h, w] is cached beside the sample's VAE latents (`<cache_dir_vae>/masks/<name>.safetensors`),
keyed by the mask's bytes and the bucket like every cache file; it is built with the VAE cache.
"""

from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from trainer.data.pairing import MASK_COLUMN

MASK_FORMAT = "1"  # bump when what a mask file holds changes
MASK_FOLDER = "masks"  # under the VAE cache folder: the VAE pass prunes only its own folder's files


def has_mask(row) -> bool:
    value = row.get(MASK_COLUMN) if hasattr(row, "get") else None
    return isinstance(value, str) and value != ""


def vae_scale_factor(flavour) -> int:
    """Pixels per latent pixel: Qwen-Image-2.1's VAE compresses 16x, the edit models' 8x."""
    return 16 if flavour.is_21 else 8


def mask_path(dataset_config, config, row) -> Path | None:
    """The cache file of a row's latent-resolution mask, or None for a row without one."""
    if not has_mask(row):
        return None
    tset = dataset_config.training_set(dataset_config.by_id(row["dataset_id"]), config.flavour)
    return tset.vae_cache_dir / MASK_FOLDER / f"{row['name']}.safetensors"


def latent_mask(image, size: tuple[int, int], scale: int) -> torch.Tensor:
    """[h, w] weights in [0, 1] of a mask image for a target trained at `size` (width, height)."""
    from diffusers.image_processor import VaeImageProcessor

    width, height = size
    # the pipelines' image processor, "crop" resize: the geometry preprocess_target gives the target
    resized = VaeImageProcessor(vae_scale_factor=scale * 2).resize(image, height, width, resize_mode="crop")
    red = torch.frombuffer(bytearray(resized.getchannel(0).tobytes()), dtype=torch.uint8).float().div(255)
    return F.interpolate(red.reshape(1, 1, height, width), size=(height // scale, width // scale), mode="area")[0, 0]


def mask_key(dataset_config, config, row):
    from trainer.data.caches import CacheKey, target_size

    settings = {"kind": "mask", "mask_format": MASK_FORMAT, "target_size": target_size(dataset_config, row),
                "scale": vae_scale_factor(config.flavour)}
    return CacheKey(settings, (row[MASK_COLUMN],))


def build_mask_cache(manifest: pd.DataFrame, dataset_config, config) -> int:
    """Write the masks that are missing or stale, prune those whose sample left; returns how many were written."""
    from trainer.data.caches import _save, is_current, prune_cache_folders, target_size
    from trainer.data.images import load_rgb

    written, wanted = 0, set()
    for row in manifest.to_dict("records"):
        path = mask_path(dataset_config, config, row)
        if path is None:
            continue
        wanted.add(path)
        key = mask_key(dataset_config, config, row)
        current, fingerprint, _ = is_current(path, key)
        if not current:
            weights = latent_mask(load_rgb(row[MASK_COLUMN]), target_size(dataset_config, row), vae_scale_factor(config.flavour))
            _save(path, {"loss_mask": weights}, key, fingerprint)
            written += 1
    prune_cache_folders(sorted({p.parent for p in wanted}), wanted)  # as the VAE pass prunes its own folders
    return written


def stale_masks(manifest: pd.DataFrame, dataset_config, config) -> list[str]:
    """Rows whose mask file is missing or out of date (training refuses them, as it refuses stale latents)."""
    from trainer.data.caches import is_current

    problems = []
    for row in manifest.to_dict("records"):
        path = mask_path(dataset_config, config, row)
        if path is not None and not is_current(path, mask_key(dataset_config, config, row))[0]:
            problems.append(f"{path}: missing or stale for {row[MASK_COLUMN]}")
    return problems


def load_mask(path: Path | None) -> torch.Tensor | None:
    if path is None:
        return None
    from safetensors.torch import load_file

    return load_file(str(path))["loss_mask"]
