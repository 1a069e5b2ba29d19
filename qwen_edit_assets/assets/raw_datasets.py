"""One asset per dataset folder of the data config: what is on disk, with a few thumbnails."""

import hashlib
from pathlib import Path

import dagster as dg

from qwen_edit_assets.metadata import thumbnail_markdown
from qwen_edit_assets.resources import QwenEditProject

GROUP = "raw_datasets"


def raw_asset_key(dataset_id: str) -> dg.AssetKey:
    return dg.AssetKey(["raw", dataset_id.replace("-", "_")])


def folder_version(folder: Path) -> str:
    """Changes when a file is added, removed, renamed or rewritten (name, size, mtime)."""
    digest = hashlib.sha256()
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if path.is_file():
                stat = path.stat()
                digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def raw_dataset_asset(dataset_id: str, dataset_type: str, folder_hint: str) -> dg.AssetsDefinition:
    @dg.asset(
        key=raw_asset_key(dataset_id),
        group_name=GROUP,
        description=f"The {dataset_type} dataset {dataset_id!r} ({folder_hint}) as it is on disk.",
        kinds={"files"},
    )
    def raw_dataset(context: dg.AssetExecutionContext, project: QwenEditProject) -> dg.MaterializeResult:
        from trainer.data.images import is_image_file

        loaded = project.load()
        entry = loaded.dataset_config.by_id(dataset_id)
        folder = loaded.dataset_config.resolve(entry.instance_data_dir)
        if not folder.is_dir():
            raise dg.Failure(f"dataset {dataset_id!r}: instance_data_dir {folder} does not exist")
        images = sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))
        captions = sorted(folder.glob("*.txt"))
        return dg.MaterializeResult(
            metadata={
                "folder": dg.MetadataValue.path(str(folder)),
                "images": len(images),
                "captions": len(captions),
                "samples": dg.MetadataValue.md(thumbnail_markdown(images[:6]) or "(no images)"),
            },
            data_version=dg.DataVersion(folder_version(folder)),
        )

    return raw_dataset


def raw_dataset_assets(project: QwenEditProject) -> list[dg.AssetsDefinition]:
    loaded = project.load()
    return [
        raw_dataset_asset(entry.id, entry.dataset_type, entry.instance_data_dir)
        for entry in loaded.dataset_config.entries
        if entry.dataset_type in ("image", "conditioning") and not entry.disabled
    ]
