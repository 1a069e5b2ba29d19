"""Validation edits as MLflow images: one strip per pair and step, so MLflow's image slider walks
through the steps and shows the LoRA's edit changing next to what stays fixed."""

import re
from pathlib import Path

STRIP_CELL = 128  # pixels per image in a strip: small enough for MLflow's grid, large enough to judge an edit


def image_key(pair: str) -> str:
    """MLflow's image keys allow letters, digits, `_-./` and spaces; anything else in a pair name becomes `_`."""
    return "validation/" + (re.sub(r"[^A-Za-z0-9_\-. ]", "_", pair) or "_")


def pair_strip(row, path: Path, cell: int = STRIP_CELL) -> Path:
    """references | base | LoRA | target of one validation row, side by side (empty cells left white)."""
    from PIL import Image

    from trainer.data.images import load_rgb
    from trainer.io import atomic_write_with

    cells = [*row.references, row.base_image, row.lora_image, row.target]
    strip = Image.new("RGB", (cell * len(cells), cell), "white")
    for x, image_path in enumerate(cells):
        if image_path:
            strip.paste(load_rgb(image_path).resize((cell, cell)), (x * cell, 0))
    return atomic_write_with(path, lambda tmp: strip.save(tmp, format="PNG"))


def pair_strips(report) -> dict[str, Path]:
    """Each row's strip in the report's `strips/` folder, by MLflow image key."""
    folder = report.html_path.parent / "strips"
    return {image_key(row.name): pair_strip(row, folder / f"{row.name}.png") for row in report.rows}
