"""Data versions: one id per manifest and per cache, the same wherever it is shown.

Dagster's data versions, the MLflow run's `manifest_version` tag and a checkpoint's
`data_version` all come from these two functions, so one state of the data has one id.
"""

import hashlib
import json
from pathlib import Path
from typing import Literal

import pandas as pd

from trainer.config.schema import TrainConfig
from trainer.data.dataset_config import DatasetConfig

CacheKind = Literal["text", "vae"]
VERSION_DIGITS = 16


def manifest_version(path: Path) -> str:
    """The pairing manifest's version: sha256 of the manifest file's bytes, 16 hex digits.

    The file is what training reads, so hashing it (not the DataFrame) lets every reader agree.
    """
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:VERSION_DIGITS]


def cache_version(manifest: pd.DataFrame, dataset_config: DatasetConfig, config: TrainConfig, kind: CacheKind) -> str:
    """The version of one cache ('text' or 'vae') for `manifest` under `config`.

    Built from each sample's cache fingerprint, i.e. the very key that decides whether a file is
    re-encoded (settings such as caption dropout and strict crops, captions, image contents):
    whatever changes a cache file changes this version, and nothing else does. A file already
    current is answered from its stat shortcut, so the images are not re-hashed.
    """
    from trainer.data.caches import is_current, sample_paths, text_key, vae_key  # torch: only when needed

    key_of = text_key if kind == "text" else vae_key
    rows = []
    for row in manifest.to_dict("records"):
        paths = sample_paths(dataset_config, config, row)
        _, fingerprint, _ = is_current(paths.text if kind == "text" else paths.vae, key_of(config, dataset_config, row))
        rows.append((row["dataset_id"], row["name"], fingerprint))
    payload = json.dumps({"kind": kind, "samples": sorted(rows)}, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:VERSION_DIGITS]
