"""The shipped, pretrained demo pipeline (edit-v2), written by `python -m trainer.demo.pretrain`.

`qwen-edit demo-setup` copies it to `demo/models/pretrained-edit-v2`, which the edit-v2 preset
trains; the folder is an ordinary diffusers pipeline folder (`from_pretrained` loads it).
"""

import os
import shutil
import uuid
from pathlib import Path

SHIPPED_DIR = Path(__file__).parent / "pretrained" / "edit-v2"
MARKER_FILE = "qwen_edit_pretrained.json"  # written by trainer.demo.pretrain; says how the weights were made


def install_pretrained_model(destination: str | os.PathLike, source: Path = SHIPPED_DIR) -> Path:
    """Copy the shipped pipeline folder to `destination`; an identical copy already there is kept.

    The copy appears atomically (copied beside it, then renamed), so an interrupted setup never
    leaves a half-written model behind.
    """
    destination = Path(destination).resolve()
    if not (source / MARKER_FILE).is_file():
        raise FileNotFoundError(f"{source} holds no pretrained demo model; build it with `python -m trainer.demo.pretrain {source}`")
    if _same_files(source, destination):
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.parent / f".{destination.name}.tmp-{uuid.uuid4().hex[:12]}"
    old = destination.parent / f".{destination.name}.old-{uuid.uuid4().hex[:12]}"
    try:
        shutil.copytree(source, tmp)
        if destination.exists():
            os.replace(destination, old)
        os.replace(tmp, destination)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return destination


def _same_files(source: Path, destination: Path) -> bool:
    """Same relative paths and sizes, and the same marker (which records the run that wrote the weights)."""
    if not (destination / MARKER_FILE).is_file():
        return False
    if (source / MARKER_FILE).read_bytes() != (destination / MARKER_FILE).read_bytes():
        return False

    def listing(root: Path) -> dict[str, int]:
        return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}

    return listing(source) == listing(destination)
