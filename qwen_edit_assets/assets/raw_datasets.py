"""One observable source asset per dataset folder of the data config: Dagster does not make the folders,
it watches them. An observation records what is on disk (counts, size, thumbnails) and a data version
from the folder's files, so once a folder changed every asset built from it shows as stale in the UI.

Observed by the UI's "Observe sources", by `make demo` and the `retrain` job (which include them), and by
the `new_pairs_sensor`, which reports an observation whenever it sees a folder change.
"""

import hashlib
import warnings
from pathlib import Path

import dagster as dg

from qwen_edit_assets.metadata import readable_size, thumbnail_markdown
from qwen_edit_assets.resources import QwenEditProject
from qwen_edit_assets.scope import SINGLE, ProjectScope

GROUP = "raw_datasets"


def raw_asset_key(dataset_id: str, scope: ProjectScope = SINGLE) -> dg.AssetKey:
    return scope.key("raw", dataset_id.replace("-", "_"))


def folder_version(folder: Path) -> str:
    """Changes when a file is added, removed, renamed or rewritten (name, size, mtime)."""
    digest = hashlib.sha256()
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if path.is_file():
                stat = path.stat()
                digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def observe_folder(folder: Path) -> dg.ObserveResult:
    """What the folder holds now, versioned by its files."""
    from trainer.data.images import is_image_file

    if not folder.is_dir():
        raise dg.Failure(f"instance_data_dir {folder} does not exist; fix the dataset config or create the folder")
    files = [p for p in folder.iterdir() if p.is_file()]
    images = sorted(p for p in files if is_image_file(p))
    return dg.ObserveResult(
        data_version=dg.DataVersion(folder_version(folder)),
        metadata={
            "folder": dg.MetadataValue.path(str(folder)),
            "images": len(images),
            "captions": sum(1 for p in files if p.suffix == ".txt"),
            "size_mb": readable_size(sum(p.stat().st_size for p in files)),
            "samples": dg.MetadataValue.md(thumbnail_markdown(images[:6]) or "(no images)"),
        },
    )


def raw_dataset_asset(dataset_id: str, dataset_type: str, folder_hint: str, scope: ProjectScope = SINGLE) -> dg.SourceAsset:
    def raw_dataset(context) -> dg.ObserveResult:
        loaded = scope.project(context).load()
        entry = loaded.dataset_config.by_id(dataset_id)
        return observe_folder(loaded.dataset_config.resolve(entry.instance_data_dir))

    with warnings.catch_warnings():  # observable source assets are beta in Dagster 1.13: chosen knowingly, said once here
        warnings.simplefilter("ignore", dg.BetaWarning)
        return dg.observable_source_asset(
            key=raw_asset_key(dataset_id, scope),
            group_name=scope.group(GROUP),
            required_resource_keys={scope.resource_key},
            description=f"The {dataset_type} dataset {dataset_id!r} ({folder_hint}) as it is on disk; its data version "
            "changes with any file added, removed or rewritten.",
            tags={"dagster/kind/files": "", **scope.tags},
        )(raw_dataset)


def raw_dataset_assets(project: QwenEditProject, scope: ProjectScope = SINGLE) -> list[dg.SourceAsset]:
    loaded = project.load()
    return [
        raw_dataset_asset(entry.id, entry.dataset_type, entry.instance_data_dir, scope)
        for entry in loaded.dataset_config.entries
        if entry.dataset_type in ("image", "conditioning") and not entry.disabled
    ]
