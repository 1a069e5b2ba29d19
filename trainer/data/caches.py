"""Prompt-embedding and VAE-latent caches: one safetensors file per sample, keyed by content.

Each file records a fingerprint of everything that went into it (image bytes, caption,
preprocessing, model, flavour) in its safetensors metadata. A cache pass encodes only samples
whose fingerprint changed and prunes files whose sample left the manifest. Files are written
to a temp name and renamed, so a reader never sees half a file.

A pass keeps the device busy: worker threads decode and prepare the next samples (`cache_workers`), the
main thread runs the encoder (the VAE on batches of same-sized images, `vae_batch_size`), a writer
thread writes the files (trainer.data.cache_threads, cache_encoders); under `accelerate launch`
(`trainer.cache`) each rank encodes its share (trainer.data.cache_ranks).
"""

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from trainer.config.schema import TrainConfig
from trainer.data.cache_ranks import CacheRanks
from trainer.data.dataset_config import DatasetConfig
from trainer.data.images import crop_to_aspect, load_image
from trainer.data.pairing import reference_paths
from trainer.io import atomic_write_with
from trainer.model.conditioning import PromptEmbedding, references_take_target_area
from trainer.model.loading import compute_dtype, default_device, load_pipeline

# bump when what a cache file holds changes; "2": strict references cropped at their own
# resolution, match_target_res references at the target's area and their own aspect ratio
# (edit-2.1 adds `image_pad_mask` tensors; its files are keyed by flavour, so "2" stays)
CACHE_FORMAT = "2"


@dataclass(frozen=True)
class CacheStats:
    encoded: int  # over every rank
    reused: int
    pruned: int
    folders: tuple[str, ...]
    seconds: float = 0.0  # the whole pass: checks, loading, encoding, writing, pruning
    load_seconds: float = 0.0  # of that, loading the encoder
    peak_allocated_gib: float | None = None  # this process's GPU peak during the pass (None off CUDA)
    peak_reserved_gib: float | None = None
    reserved_after_gib: float | None = None  # still reserved once the encoder is freed (the training process's to use)
    encoded_per_rank: tuple[int, ...] = ()

    def as_metadata(self) -> dict:
        return {"encoded": self.encoded, "reused": self.reused, "pruned": self.pruned, "folders": list(self.folders)}

    def to_json(self) -> dict:
        return {**asdict(self), "folders": list(self.folders), "encoded_per_rank": list(self.encoded_per_rank)}

    @classmethod
    def from_json(cls, data: dict) -> "CacheStats":
        return cls(**{**data, "folders": tuple(data["folders"]), "encoded_per_rank": tuple(data.get("encoded_per_rank", ()))})


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
    tensors = {k: _host_copy(v) for k, v in tensors.items()}
    metadata = {"fingerprint": fingerprint, "quick": key.quick(), WRITER_KEY: WRITER}
    atomic_write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU tensor of its own: a device tensor is copied over (on the writer thread that waits for it, in the
    device's order, while the main thread queues the next encode); a CPU view of a batch is cloned (one file's
    tensors must not share storage with each other, safetensors refuses that)."""
    tensor = tensor.detach()
    return tensor.to("cpu").contiguous() if tensor.device.type != "cpu" else tensor.contiguous().clone()


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
    encoder,
    path_of: Callable[[object], Path],
    key_of: Callable[[object], CacheKey],
    pipeline: Callable[[], object],
    device: torch.device,
    ranks: CacheRanks | None = None,
    workers: int = 0,
) -> CacheStats:
    """Encode the rows whose file is missing or stale (`encoder`: trainer.data.cache_encoders), prune the rest.

    Rows are checked on every rank before any writes (trainer.data.cache_ranks); this rank's chunks are
    prepared `workers` rows ahead on threads, encoded here, and written on a writer thread. The pipeline
    is loaded only when something needs encoding, and its memory is given back at the end.
    """
    from trainer.data.cache_threads import BackgroundWriter, prepared_in_order
    from trainer.model.peak_memory import measured_peak, release_cached_memory

    ranks = ranks or CacheRanks()
    started = time.perf_counter()
    rows = manifest.to_dict("records")  # plain dicts: iterrows costs ~30 µs a row
    stale, refresh = [], []
    for row in rows:
        key = key_of(row)
        current, fingerprint, missed = is_current(path_of(row), key)
        if not current:
            stale.append((row, key, fingerprint))
        elif missed:  # same contents, files touched or moved: refresh the shortcut, no encoding
            refresh.append((row, key, fingerprint))
    ranks.wait()  # every rank has decided from the same files before any of them writes
    for index, (row, key, fingerprint) in enumerate(refresh):
        if ranks.owns(index):
            _save(path_of(row), load_file(str(path_of(row))), key, fingerprint)
    ordered = sorted(stale, key=lambda item: encoder.order(item[0]))  # stable: manifest order within an order
    size = encoder.rows_per_chunk
    chunks = [chunk for index, chunk in enumerate(ordered[i : i + size] for i in range(0, len(ordered), size)) if ranks.owns(index)]
    mine = [item for chunk in chunks for item in chunk]
    load_seconds, reserved_after = 0.0, 0.0
    with measured_peak(device) as peak, _prompt_gil_handoff():
        if mine:
            loading = time.perf_counter()
            pipe = pipeline()
            load_seconds = time.perf_counter() - loading
            prepared = prepared_in_order((row for row, _, _ in mine), lambda row: encoder.prepare(pipe, row), workers)
            progress = tqdm(total=len(mine), desc=encoder.description, unit="sample", disable=not ranks.is_main)
            try:
                with BackgroundWriter(_save) as writer, progress:
                    for chunk in chunks:
                        files = encoder.encode(pipe, [next(prepared) for _ in chunk])
                        for (row, key, fingerprint), tensors in zip(chunk, files, strict=True):
                            writer.put(path_of(row), tensors, key, fingerprint)
                        progress.update(len(chunk))
            finally:
                prepared.close()  # its worker threads stop
            del pipe, prepared
    if mine:
        reserved_after = release_cached_memory(device)
    encoded_per_rank = ranks.gather(len(mine))
    ranks.wait()  # every rank's files are written
    wanted = {path_of(row) for row in rows}
    folders = sorted({p.parent for p in wanted})
    pruned = prune_cache_folders(folders, wanted) if ranks.is_main else 0
    return CacheStats(
        len(stale), len(rows) - len(stale), pruned, tuple(str(f) for f in folders),
        seconds=round(time.perf_counter() - started, 3), load_seconds=round(load_seconds, 3),
        peak_allocated_gib=peak.get("allocated"), peak_reserved_gib=peak.get("reserved"),
        reserved_after_gib=reserved_after if mine and peak else None, encoded_per_rank=tuple(encoded_per_rank),
    )


@contextmanager
def _prompt_gil_handoff(seconds: float = 0.0005):
    """While the workers prepare, the main thread gets the GIL back within `seconds` (Python's default: 5 ms)
    after each wait for the device: each such wait is otherwise a gap in which the device idles."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(min(before, seconds))
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def _pipeline_source(config: TrainConfig, device: torch.device, components: dict, pipeline=None) -> Callable[[], object]:
    """What a pass encodes with: `pipeline` when given (a benchmark's model built in memory), else the
    flavour's pipeline with only `components` loaded (never the transformer), when first needed."""
    if pipeline is not None:
        return lambda: pipeline
    return lambda: load_pipeline(config, device, compute_dtype(config, device), **components)


def build_text_cache(
    manifest: pd.DataFrame, dataset_config: DatasetConfig, config: TrainConfig, device: torch.device | None = None,
    *, ranks: CacheRanks | None = None, pipeline=None,
) -> CacheStats:
    """Prompt embeddings with the reference images, as the pipeline's `encode_prompt` makes them."""
    from trainer.data.cache_encoders import TextEmbeddingsEncoder

    device = device or default_device()
    encoder = TextEmbeddingsEncoder(dataset_config, config, pin_memory=device.type == "cuda")
    return _run_cache_pass(
        manifest, encoder,
        lambda row: sample_paths(dataset_config, config, row).text,
        lambda row: text_key(config, dataset_config, row),
        _pipeline_source(config, device, encoder.components, pipeline), device, ranks, config.cache_workers,
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
    manifest: pd.DataFrame, dataset_config: DatasetConfig, config: TrainConfig, device: torch.device | None = None,
    *, ranks: CacheRanks | None = None, pipeline=None,
) -> CacheStats:
    """Normalised VAE latents of the target (at its bucket size) and of each reference; the loss masks beside them."""
    from trainer.data.masks import build_mask_cache

    build_mask_cache(manifest, dataset_config, config)  # no model needed: a resize per mask
    from trainer.data.cache_encoders import VaeLatentsEncoder

    device = device or default_device()
    encoder = VaeLatentsEncoder(dataset_config, config, pin_memory=device.type == "cuda")
    return _run_cache_pass(
        manifest, encoder,
        lambda row: sample_paths(dataset_config, config, row).vae,
        lambda row: vae_key(config, dataset_config, row),
        _pipeline_source(config, device, encoder.components, pipeline), device, ranks, config.cache_workers,
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
