"""A tiny, deterministic paired image-edit dataset a LoRA can learn from a few samples.

Each sample is a flat light-grey background with one shape (square, circle or triangle) of one
saturated colour. The instruction asks to recolour the shape ("make the square blue"):

- ``edited/NNNN.png``       the target: the same scene with the shape in the new colour,
- ``edited/NNNN.txt``       the caption: the instruction text,
- ``reference/NNNN.png``    reference 1: the original scene,
- ``reference_2/NNNN.png``  reference 2: a solid swatch of the target colour,
- ``reference_3/NNNN.png``  reference 3: the shape's silhouette (white on black).

Both ``train/`` and ``eval/`` use this layout (SPEC section 4: file names match across folders).
Generation is deterministic (same arguments, byte-identical files), idempotent (a complete
dataset with the same parameters is left alone) and atomic (written into a hidden sibling folder,
then moved into place; ``demo_dataset.json`` is written last and marks the dataset complete).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from trainer.errors import DataError

MANIFEST = "demo_dataset.json"
GENERATOR_VERSION = 1  # bump when the images a given set of parameters produces change
SPLITS = ("train", "eval")
EDITED_FOLDER = "edited"
REFERENCE_FOLDERS = ("reference", "reference_2", "reference_3")
SHAPES = ("square", "circle", "triangle")
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "magenta": (210, 30, 200),
    "cyan": (20, 200, 210),
    "orange": (245, 130, 20),
}
INSTRUCTIONS = (
    "make the {shape} {colour}",
    "turn the {shape} {colour}",
    "change the colour of the {shape} to {colour}",
    "paint the {shape} {colour}",
    "recolour the {shape} {colour}",
)
MIN_SIZE = 16
# A scene's geometry: (shape, (x0, y0, x1, y1)); no geometry appears twice in a dataset.
Geometry = tuple[str, tuple[int, int, int, int]]


@dataclass(frozen=True)
class DemoDataset:
    root: Path
    train_dir: Path
    eval_dir: Path
    n_train: int
    n_eval: int
    size: int

    def folder(self, split: str, name: str) -> Path:
        """The folder of one split, e.g. ``folder("train", "edited")``."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        if name not in (EDITED_FOLDER, *REFERENCE_FOLDERS):
            valid = ", ".join((EDITED_FOLDER, *REFERENCE_FOLDERS))
            raise ValueError(f"unknown folder {name!r}; valid: {valid}")
        return self.root / split / name


@dataclass(frozen=True)
class Scene:
    shape: str
    box: tuple[int, int, int, int]  # inclusive pixel bounds of the shape
    source: str  # colour name before the edit
    target: str  # colour name after the edit
    background: tuple[int, int, int]
    caption: str

    @property
    def geometry(self) -> Geometry:
        return (self.shape, self.box)


def choose_scene(rng: np.random.Generator, size: int) -> Scene:
    """Draw one random scene: shape, position and size, colours, background, instruction."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    colours = list(PALETTE)
    source = colours.pop(rng.integers(len(colours)))
    target = colours[rng.integers(len(colours))]  # never the source colour
    edge = int(rng.integers(int(size * 0.3), int(size * 0.6) + 1))
    x0, y0 = (int(v) for v in rng.integers(0, size - edge + 1, size=2))
    grey = int(rng.integers(200, 236))
    template = INSTRUCTIONS[rng.integers(len(INSTRUCTIONS))]
    return Scene(
        shape=shape,
        box=(x0, y0, x0 + edge - 1, y0 + edge - 1),
        source=source,
        target=target,
        background=(grey, grey, grey),
        caption=caption(template, shape, target),
    )


def caption(template: str, shape: str, colour: str) -> str:
    """The instruction text, e.g. "make the square blue"."""
    return template.format(shape=shape, colour=colour)


def silhouette(scene: Scene, size: int) -> Image.Image:
    """The shape's mask, 255 inside, 0 outside (no anti-aliasing: every pixel is in or out)."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    x0, y0, x1, y1 = scene.box
    if scene.shape == "square":
        draw.rectangle(scene.box, fill=255)
    elif scene.shape == "circle":
        draw.ellipse(scene.box, fill=255)
    else:
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=255)
    return mask


def draw_sample(scene: Scene, size: int) -> dict[str, Image.Image]:
    """The images of one sample, by folder name; all RGB, ``size`` x ``size``."""
    mask = silhouette(scene, size)

    def scene_in(colour: str) -> Image.Image:
        image = Image.new("RGB", (size, size), scene.background)
        image.paste(PALETTE[colour], mask=mask)
        return image

    return {
        EDITED_FOLDER: scene_in(scene.target),
        "reference": scene_in(scene.source),
        "reference_2": Image.new("RGB", (size, size), PALETTE[scene.target]),
        "reference_3": mask.convert("RGB"),
    }


def choose_scenes(rng: np.random.Generator, n: int, size: int, taken: set[Geometry]) -> list[Scene]:
    """``n`` scenes whose geometry is not in ``taken`` (which is updated), so none repeats."""
    scenes: list[Scene] = []
    for _ in range(1000 * n):
        if len(scenes) == n:
            break
        scene = choose_scene(rng, size)
        if scene.geometry not in taken:
            taken.add(scene.geometry)
            scenes.append(scene)
    if len(scenes) < n:
        raise ValueError(f"cannot draw {n} distinct scenes at size {size}; use a larger size")
    return scenes


def write_split(split_dir: Path, scenes: list[Scene], size: int) -> None:
    """Write every folder of one split: ``NNNN.png`` per folder, plus ``edited/NNNN.txt``."""
    for name in (EDITED_FOLDER, *REFERENCE_FOLDERS):
        (split_dir / name).mkdir(parents=True)
    for index, scene in enumerate(scenes):
        stem = f"{index:04d}"
        for name, image in draw_sample(scene, size).items():
            image.save(split_dir / name / f"{stem}.png", format="PNG")  # no metadata chunks
        (split_dir / EDITED_FOLDER / f"{stem}.txt").write_text(scene.caption + "\n", encoding="utf-8")


def _parameters(n_train: int, n_eval: int, size: int, seed: int) -> dict:
    return {"version": GENERATOR_VERSION, "n_train": n_train, "n_eval": n_eval, "size": size, "seed": seed}


def _read_manifest(root: Path) -> dict | None:
    try:
        return json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _check_replaceable(root: Path) -> None:
    """Refuse to delete a folder that holds anything but (part of) a demo dataset."""
    foreign = sorted(p.name for p in root.iterdir() if p.name not in (*SPLITS, MANIFEST))
    if foreign:
        raise DataError(
            f"{root} is not a demo dataset folder (it holds {', '.join(foreign)}); "
            "pass an empty or new folder as the demo dataset root"
        )


def generate_demo_dataset(
    root: Path,
    n_train: int = 24,
    n_eval: int = 4,
    size: int = 64,
    seed: int = 0,
    overwrite: bool = False,
) -> DemoDataset:
    """Write the demo dataset under ``root`` (see the module docstring) and describe it.

    A complete dataset with the same parameters is reused unless ``overwrite``; an incomplete
    one (no manifest) or one with other parameters is replaced.
    """
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} pixels, got {size}")
    if n_train < 1 or n_eval < 0:
        raise ValueError(f"need n_train >= 1 and n_eval >= 0, got {n_train} and {n_eval}")
    root = Path(root).absolute()
    dataset = DemoDataset(root, root / "train", root / "eval", n_train, n_eval, size)
    parameters = _parameters(n_train, n_eval, size, seed)
    if not overwrite and _read_manifest(root) == parameters:
        return dataset
    if root.exists():
        _check_replaceable(root)

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        taken: set[Geometry] = set()
        for split, n, stream in (("train", n_train, 0), ("eval", n_eval, 1)):
            rng = np.random.default_rng([seed, stream])  # independent stream per split
            write_split(tmp / split, choose_scenes(rng, n, size, taken), size)
        (tmp / MANIFEST).write_text(json.dumps(parameters, indent=2) + "\n", encoding="utf-8")
        if not overwrite and _read_manifest(root) == parameters:
            return dataset  # a concurrent generation finished first; keep its files
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful replace
    return dataset


__all__ = [
    "DemoDataset",
    "PALETTE",
    "REFERENCE_FOLDERS",
    "SHAPES",
    "Scene",
    "generate_demo_dataset",
]
