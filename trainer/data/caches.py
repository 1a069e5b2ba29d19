"""Prompt-embedding and VAE-latent caches: one safetensors file per sample, keyed by content.

Each file records a fingerprint of everything that went into it (image bytes, caption,
preprocessing, model, flavour) in its safetensors metadata. A cache pass encodes only samples
whose fingerprint changed and prunes files whose sample left the manifest. Files are written
to a temp name and renamed, so a reader never sees half a file.
"""

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from trainer.config.schema import TrainConfig
from trainer.data.dataset_config import DatasetConfig
from trainer.data.images import crop_to_aspect, load_image
from trainer.data.pairing import reference_paths
from trainer.io import atomic_write_with
from trainer.model.conditioning import (
    PromptEmbedding,
    embed_prompt,
    encode_image_latents,
    prepare_references,
    preprocess_target,
    references_take_target_area,
)
from trainer.model.loading import compute_dtype, default_device, load_pipeline

# bump when what a cache file holds changes; "2": strict references cropped at their own
# resolution, match_target_res references at the target's area and their own aspect ratio
# (edit-2.1 adds `image_pad_mask` tensors; its files are keyed by flavour, so "2" stays)
CACHE_FORMAT = "2"


@dataclass(frozen=True)
class CacheStats:
    encoded: int
    reused: int
    pruned: int
    folders: tuple[str, ...]

    def as_metadata(self) -> dict:
        return {"encoded": self.encoded, "reused": self.reused, "pruned": self.pruned, "folders": list(self.folders)}


@dataclass(frozen=True)
class SamplePaths:
    text: Path
    vae: Path
    mask: Path | None = None  # the loss mask at latent resolution (trainer.data.masks), beside the VAE latents


def sample_paths(dataset_config: DatasetConfig, config: TrainConfig, row) -> SamplePaths:
    from trainer.data.masks import mask_path

    tset = dataset_config.training_set(dataset_config.by_id(row["dataset_id"]), config.flavour)
    return SamplePaths(
        tset.text_cache_dir / f"{row['name']}.safetensors", tset.vae_cache_dir / f"{row['name']}.safetensors",
        mask_path(dataset_config, config, row),
    )


def target_size(dataset_config: DatasetConfig, row) -> tuple[int, int]:
    """The (width, height) bucket of a sample's target image (from its header, EXIF-aware)."""
    entry = dataset_config.by_id(row["dataset_id"])
    width, height = int(row["target_width"]), int(row["target_height"])  # probed when the manifest was built
    return entry.bucket(width, height)


def strict_references(dataset_config: DatasetConfig, config: TrainConfig, row) -> tuple[bool, ...]:
    """Per reference of the row: is it `reference_strict` (cropped to its target's aspect ratio)?"""
    tset = dataset_config.training_set(dataset_config.by_id(row["dataset_id"]), config.flavour)
    return tuple(entry.conditioning_type == "reference_strict" for entry in tset.references[: int(row["n_references"])])


def load_references(dataset_config: DatasetConfig, config: TrainConfig, row) -> list:
    """The row's reference images at full resolution; strict ones centre-cropped to the aspect ratio
    of the target's bucket. The pipeline's own preparation resizes them afterwards, as at inference.
    edit-2.1 keeps their alpha channel (its VAE reads RGBA)."""
    size = target_size(dataset_config, row)
    keep_alpha = config.flavour.keeps_alpha
    return [
        crop_to_aspect(load_image(path, keep_alpha), *size) if strict else load_image(path, keep_alpha)
        for path, strict in zip(reference_paths(row), strict_references(dataset_config, config, row))
    ]


def reference_target_size(dataset_config: DatasetConfig, config: TrainConfig, row) -> tuple[int, int] | None:
    """The size references are prepared for: the target's bucket where they take its area (edit-2.1,
    match_target_res), else None (the pipelines' fixed sizes)."""
    if references_take_target_area(config.flavour, config.model_kwargs.match_target_res):
        return target_size(dataset_config, row)
    return None


@dataclass(frozen=True)
class CacheKey:
    """What a cache file depends on: settings, plus source files (by content)."""

    settings: dict
    sources: tuple[str, ...]

    def _hash(self, files: list) -> str:
        payload = {"format": CACHE_FORMAT, **self.settings, "files": files}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()

    def fingerprint(self) -> str:
        """Content-addressed: the same bytes and settings give the same key wherever the files live."""
        return self._hash([hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in self.sources])

    def quick(self) -> str:
        """A stat-based stand-in (name, size, mtime): when it matches, no file needs hashing.

        The folder is left out so a copied or moved project (mtimes kept) still hits.
        """
        return self._hash([(Path(p).name, (st := os.stat(p)).st_size, st.st_mtime_ns) for p in self.sources])


def _settings(kind: str, config: TrainConfig, **extra) -> dict:
    return {
        "kind": kind,
        "model": config.model_path,
        "flavour": config.model_flavour,
        "match_target_res": config.model_kwargs.match_target_res,
        **extra,
    }


def _random_reference(dataset_config: DatasetConfig, config: TrainConfig, row) -> bool:
    """`random` sampling trains on one reference per step: each needs its own prompt embedding."""
    tset = dataset_config.training_set(dataset_config.by_id(row["dataset_id"]), config.flavour)
    return tset.sampling == "random" and int(row["n_references"]) > 1


def text_key(config: TrainConfig, dataset_config: DatasetConfig, row) -> CacheKey:
    strict = strict_references(dataset_config, config, row)
    settings = _settings(
        "text", config,
        caption=row["caption"],
        dropout=config.caption_dropout_probability > 0,
        per_reference=_random_reference(dataset_config, config, row),
        strict=strict,
        # the VL encoder sees references at fixed sizes (edit-2.1: the target's area): otherwise the
        # target's size matters only through strict crops
        target_size=target_size(dataset_config, row) if any(strict) or config.flavour.is_21 else None,
    )
    return CacheKey(settings, tuple(reference_paths(row)))


def vae_key(config: TrainConfig, dataset_config: DatasetConfig, row) -> CacheKey:
    settings = _settings(
        "vae", config, target_size=target_size(dataset_config, row), strict=strict_references(dataset_config, config, row)
    )
    return CacheKey(settings, (row["target_path"], *reference_paths(row)))


def text_fingerprint(config: TrainConfig, dataset_config: DatasetConfig, row) -> str:
    return text_key(config, dataset_config, row).fingerprint()


def vae_fingerprint(config: TrainConfig, dataset_config: DatasetConfig, row) -> str:
    return vae_key(config, dataset_config, row).fingerprint()


def stored_metadata(path: Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except Exception:  # missing, truncated or garbage: stale
        return {}


def stored_fingerprint(path: Path) -> str | None:
    return stored_metadata(path).get("fingerprint")


def is_current(path: Path, key: CacheKey) -> tuple[bool, str, bool]:
    """(up to date?, fingerprint, stat shortcut missed?): contents are hashed only when the shortcut misses."""
    stored = stored_metadata(path)
    if stored.get("quick") == key.quick() and "fingerprint" in stored:
        return True, stored["fingerprint"], False
    fingerprint = key.fingerprint()
    return stored.get("fingerprint") == fingerprint, fingerprint, True


def _save(path: Path, tensors: dict[str, torch.Tensor], key: CacheKey, fingerprint: str) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    metadata = {"fingerprint": fingerprint, "quick": key.quick(), WRITER_KEY: WRITER}
    atomic_write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


WRITER_KEY, WRITER = "written_by", "qwen-edit cache"  # in every cache file's metadata: pruning deletes only these


def written_by_this_cache(path: Path) -> bool:
    """Ours: the marker, or (files written before it) the fingerprint + stat-key pair only this cache writes."""
    metadata = stored_metadata(path)
    return metadata.get(WRITER_KEY) == WRITER or {"fingerprint", "quick"} <= metadata.keys()


def prune_cache_folders(folders, wanted: set[Path]) -> int:
    """Delete cache files whose sample left the manifest; any other file (a LoRA, a user's file) is left alone."""
    pruned = 0
    for folder in folders:
        for path in folder.glob("*.safetensors"):
            if path not in wanted and not path.is_symlink() and written_by_this_cache(path):
                path.unlink()
                pruned += 1
    return pruned


def _run_cache_pass(
    manifest: pd.DataFrame,
    path_of: Callable[[object], Path],
    key_of: Callable[[object], CacheKey],
    encode: Callable[[object], dict[str, torch.Tensor]],
    description: str,
) -> CacheStats:
    rows = manifest.to_dict("records")  # plain dicts: iterrows costs ~30 µs a row
    stale = []
    for row in rows:
        key = key_of(row)
        current, fingerprint, missed = is_current(path_of(row), key)
        if not current:
            stale.append((row, key, fingerprint))
        elif missed:  # same contents, files touched or moved: refresh the shortcut, no encoding
            _save(path_of(row), load_file(str(path_of(row))), key, fingerprint)
    for row, key, fingerprint in tqdm(stale, desc=description, unit="sample", disable=not stale):
        _save(path_of(row), encode(row), key, fingerprint)
    wanted = {path_of(row) for row in rows}
    folders = sorted({p.parent for p in wanted})
    pruned = prune_cache_folders(folders, wanted)
    return CacheStats(len(stale), len(rows) - len(stale), pruned, tuple(str(f) for f in folders))


def build_text_cache(
    manifest: pd.DataFrame, dataset_config: DatasetConfig, config: TrainConfig, device: torch.device | None = None
) -> CacheStats:
    """Prompt embeddings with the reference images, as the pipeline's `encode_prompt` makes them."""
    device = device or default_device()
    pipe = None

    def encode(row) -> dict[str, torch.Tensor]:
        nonlocal pipe
        pipe = pipe or load_pipeline(config, device, compute_dtype(config, device), transformer=False, vae=False)
        size = reference_target_size(dataset_config, config, row)
        images = load_references(dataset_config, config, row)
        refs = prepare_references(pipe, config.flavour, images, size)
        tensors = _embedding_tensors(embed_prompt(pipe, config.flavour, row["caption"], refs))
        if config.caption_dropout_probability > 0:  # the instruction dropped, the references kept
            tensors.update(_embedding_tensors(embed_prompt(pipe, config.flavour, "", refs), prefix="dropout_"))
        if _random_reference(dataset_config, config, row):
            for index, image in enumerate(images):
                single = prepare_references(pipe, config.flavour, [image], size)
                tensors.update(_embedding_tensors(embed_prompt(pipe, config.flavour, row["caption"], single), suffix=f"_ref{index}"))
        return tensors

    return _run_cache_pass(
        manifest,
        lambda row: sample_paths(dataset_config, config, row).text,
        lambda row: text_key(config, dataset_config, row),
        encode,
        "text embeddings",
    )


def _embedding_tensors(embedding: PromptEmbedding, prefix: str = "", suffix: str = "") -> dict[str, torch.Tensor]:
    """A text cache file's names for one prompt's embedding (edit-2.1 adds its image_pad_mask)."""
    tensors = {f"{prefix}prompt_embeds{suffix}": embedding.embeds, f"{prefix}prompt_embeds_mask{suffix}": embedding.mask}
    if embedding.image_pad_mask is not None:
        tensors[f"{prefix}image_pad_mask{suffix}"] = embedding.image_pad_mask
    return tensors


def _embedding_of(text: dict[str, torch.Tensor], prefix: str = "", suffix: str = "") -> tuple[torch.Tensor, ...]:
    """(embeds, mask) of a text cache file's prompt, with its image_pad_mask where there is one (edit-2.1)."""
    names = [f"{prefix}prompt_embeds{suffix}", f"{prefix}prompt_embeds_mask{suffix}", f"{prefix}image_pad_mask{suffix}"]
    return tuple(text[name] for name in names if name in text)


def build_vae_cache(
    manifest: pd.DataFrame, dataset_config: DatasetConfig, config: TrainConfig, device: torch.device | None = None
) -> CacheStats:
    """Normalised VAE latents of the target (at its bucket size) and of each reference; the loss masks beside them."""
    from trainer.data.masks import build_mask_cache

    build_mask_cache(manifest, dataset_config, config)  # no model needed: a resize per mask
    device = device or default_device()
    pipe = None

    def encode(row) -> dict[str, torch.Tensor]:
        nonlocal pipe
        pipe = pipe or load_pipeline(config, device, compute_dtype(config, device), transformer=False, text_encoder=False)
        size = target_size(dataset_config, row)
        refs = prepare_references(
            pipe, config.flavour, load_references(dataset_config, config, row), reference_target_size(dataset_config, config, row)
        )
        target = load_image(row["target_path"], config.flavour.keeps_alpha)
        tensors = {"target": encode_image_latents(pipe, preprocess_target(pipe, target, size))}
        for index, image in enumerate(refs.vae_images):
            tensors[f"reference_{index}"] = encode_image_latents(pipe, image)
        return tensors

    return _run_cache_pass(
        manifest,
        lambda row: sample_paths(dataset_config, config, row).vae,
        lambda row: vae_key(config, dataset_config, row),
        encode,
        "VAE latents",
    )


@dataclass
class CachedSample:
    name: str
    prompt_embeds: torch.Tensor  # [T, D]
    prompt_embeds_mask: torch.Tensor  # [T]
    target: torch.Tensor  # [16, h, w] (edit-2.1: [64, h, w])
    references: list[torch.Tensor]  # each [16, h_i, w_i]
    # empty instruction, same references: (embeds, mask), edit-2.1 (embeds, mask, image_pad_mask)
    dropout_embeds: tuple[torch.Tensor, ...] | None = None
    per_reference_embeds: list[tuple[torch.Tensor, ...]] | None = None  # `random` sampling, as dropout_embeds
    image_pad_mask: torch.Tensor | None = None  # [T] bool, edit-2.1 only: the VL encoder's image slots
    loss_mask: torch.Tensor | None = None  # [h, w] in [0, 1] at the target latent's size (a mask dataset)

    def with_caption_dropped(self) -> "CachedSample":
        return self._with_prompt(*self.dropout_embeds)

    def with_one_reference(self, index: int) -> "CachedSample":
        return replace(self._with_prompt(*self.per_reference_embeds[index]), references=[self.references[index]])

    def _with_prompt(self, embeds: torch.Tensor, mask: torch.Tensor, image_pad_mask: torch.Tensor | None = None) -> "CachedSample":
        return replace(self, prompt_embeds=embeds, prompt_embeds_mask=mask, image_pad_mask=image_pad_mask)


def load_sample(paths: SamplePaths, name: str) -> CachedSample:
    from trainer.data.masks import load_mask

    text = load_file(str(paths.text))
    vae = load_file(str(paths.vae))
    refs = [vae[f"reference_{i}"] for i in range(len(vae) - 1)]
    dropout = _embedding_of(text, prefix="dropout_") if "dropout_prompt_embeds" in text else None
    per_reference = None
    if "prompt_embeds_ref0" in text:
        per_reference = [_embedding_of(text, suffix=f"_ref{i}") for i in range(len(refs))]
    return CachedSample(
        name, text["prompt_embeds"], text["prompt_embeds_mask"], vae["target"], refs, dropout, per_reference,
        text.get("image_pad_mask"), load_mask(paths.mask),
    )


def iter_samples(manifest: pd.DataFrame, dataset_config: DatasetConfig, config: TrainConfig) -> Iterator[CachedSample]:
    for _, row in manifest.iterrows():
        yield load_sample(sample_paths(dataset_config, config, row), row["name"])


def verify_cache(manifest: pd.DataFrame, dataset_config: DatasetConfig, config: TrainConfig, kind: str) -> list[str]:
    """Samples whose `kind` ('text' or 'vae') cache file is missing, unreadable or out of date."""
    key_of = text_key if kind == "text" else vae_key
    problems = []
    for row in manifest.to_dict("records"):
        paths = sample_paths(dataset_config, config, row)
        path = paths.text if kind == "text" else paths.vae
        if not is_current(path, key_of(config, dataset_config, row))[0]:
            problems.append(f"{path}: missing or stale for {row['target_path']}")
    if kind == "vae":  # the loss masks are built with the VAE latents
        from trainer.data.masks import stale_masks

        problems += stale_masks(manifest, dataset_config, config)
    return problems
