"""The demo's *trained* edit-v2 pipeline, shipped with the package (`trained_edit_v2/`).

`python -m trainer.demo.pretrain` built it (seed 0, its default budget, on one NVIDIA H200; its
`qwen_edit_pretrained.json` records the budget and what was measured). It is a plain diffusers
pipeline folder of the real classes: `qwen-edit demo-setup` copies it to
`demo/models/trained-edit-v2`, which the bundled edit-v2 preset trains, loaded by
`from_pretrained` like any checkpoint. The random tiny models stay for the parity tests.
"""

import json
import shutil
from pathlib import Path

from trainer.io import atomic_folder

SHIPPED = Path(__file__).parent / "trained_edit_v2"
MARKER_FILE = "qwen_edit_pretrained.json"  # written by trainer.demo.pretrain beside model_index.json
DEMO_NAME = "trained-edit-v2"  # its folder under demo/models, as the edit-v2 preset names it


def shipped_report() -> dict:
    """What `trainer.demo.pretrain` recorded when it built the shipped pipeline."""
    return json.loads((SHIPPED / MARKER_FILE).read_text())


def install_trained_pipeline(out: Path) -> Path:
    """Copy the shipped pipeline to `out` unless the same one is there (atomic: `trainer.io.atomic_folder`)."""
    out = Path(out)
    try:
        if json.loads((out / MARKER_FILE).read_text()) == shipped_report():
            return out
    except (OSError, ValueError):
        pass
    with atomic_folder(out) as staging:
        shutil.copytree(SHIPPED, staging, dirs_exist_ok=True)
    return out


__all__ = ["DEMO_NAME", "SHIPPED", "install_trained_pipeline", "shipped_report"]
