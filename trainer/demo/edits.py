"""Generic edits on the demo's scenes, for pretraining the demo's base model (`trainer.demo.pretrain`).

The scenes are the demo dataset's (`trainer.demo.dataset`): a light-grey background with one
saturated shape. The base model learns this family of edits:

- move the shape left / right / up / down (by a quarter of the image),
- remove it,
- make it bigger / smaller,
- recolour the *background*,
- add a shape to an empty scene.

Recolouring the *shape*, the demo dataset's edit, is held out: the base has never seen it, and
the demo's LoRA teaches it. Every pair has the demo's three references (the scene, a colour
swatch, the shape's silhouette), so the base knows that layout; the swatch carries the colour
for the background and add edits and is a random colour otherwise. Adding is what makes the
held-out edit learnable by a small LoRA: the base already paints the silhouette in the swatch's
colour onto an empty scene, but given a scene with the shape it keeps the shape's colour (GPU
budgets compared in benchmarks/RESULTS.md, "Issue 12").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from trainer.demo.dataset import PALETTE, Scene, choose_scene, silhouette

DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
MOVE_TEMPLATES = ("move the {shape} {direction}", "push the {shape} {direction}")
REMOVE_TEMPLATES = ("remove the {shape}", "delete the {shape}", "erase the {shape}")
RESIZE_TEMPLATES = {
    "bigger": ("make the {shape} bigger", "enlarge the {shape}"),
    "smaller": ("make the {shape} smaller", "shrink the {shape}"),
}
BACKGROUND_TEMPLATES = ("make the background {colour}", "paint the background {colour}", "change the background to {colour}")
ADD_TEMPLATES = ("add a {colour} {shape}", "draw a {colour} {shape}")
EDIT_KINDS = ("move", "remove", "resize", "background", "add")
HELD_OUT_KIND = "recolour"  # the demo dataset's edit; never in pretraining


@dataclass(frozen=True)
class EditPair:
    kind: str
    caption: str
    references: tuple[Image.Image, ...]  # scene, swatch, silhouette: the demo dataset's layout
    target: Image.Image


def draw_scene(shape: str, box: tuple[int, int, int, int], colour: tuple[int, int, int] | None, background, size: int) -> Image.Image:
    """A background with the shape in `box` (none when `colour` is None)."""
    image = Image.new("RGB", (size, size), tuple(background))
    if colour is not None:
        image.paste(colour, mask=_mask(shape, box, size))
    return image


def _mask(shape: str, box: tuple[int, int, int, int], size: int) -> Image.Image:
    return silhouette(Scene(shape, box, "red", "red", (0, 0, 0), ""), size)


def _moved(box, dx: int, dy: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    return (x0 + dx, y0 + dy, x1 + dx, y1 + dy)


def _resized(box, factor: float, size: int) -> tuple[int, int, int, int] | None:
    """The box scaled about its centre, kept inside the image; None when it would not fit or vanish."""
    x0, y0, x1, y1 = box
    edge = round((x1 - x0 + 1) * factor)
    if edge < 8 or edge > size:
        return None
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    nx0 = int(min(max(round(cx - (edge - 1) / 2), 0), size - edge))
    ny0 = int(min(max(round(cy - (edge - 1) / 2), 0), size - edge))
    return (nx0, ny0, nx0 + edge - 1, ny0 + edge - 1)


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def make_edit(rng: np.random.Generator, size: int, kind: str) -> EditPair | None:
    """One random pair of `kind`; None when the drawn scene does not admit it (e.g. no room to move)."""
    scene = choose_scene(rng, size)
    colour = PALETTE[scene.source]
    reference = draw_scene(scene.shape, scene.box, colour, scene.background, size)
    swatch_colour = _pick(rng, [c for c in PALETTE if c != scene.source])
    target, caption = None, ""
    if kind == "move":
        direction = _pick(rng, list(DIRECTIONS))
        step = size // 4
        dx, dy = (step * d for d in DIRECTIONS[direction])
        box = _moved(scene.box, dx, dy)
        if min(box) < 0 or max(box) >= size:
            return None
        target = draw_scene(scene.shape, box, colour, scene.background, size)
        caption = _pick(rng, MOVE_TEMPLATES).format(shape=scene.shape, direction=direction)
    elif kind == "remove":
        target = draw_scene(scene.shape, scene.box, None, scene.background, size)
        caption = _pick(rng, REMOVE_TEMPLATES).format(shape=scene.shape)
    elif kind == "resize":
        which = _pick(rng, list(RESIZE_TEMPLATES))
        box = _resized(scene.box, 1.5 if which == "bigger" else 0.6, size)
        if box is None:
            return None
        target = draw_scene(scene.shape, box, colour, scene.background, size)
        caption = _pick(rng, RESIZE_TEMPLATES[which]).format(shape=scene.shape)
    elif kind == "add":  # onto the empty background: the swatch gives the colour, the silhouette the place
        reference = draw_scene(scene.shape, scene.box, None, scene.background, size)
        target = draw_scene(scene.shape, scene.box, PALETTE[swatch_colour], scene.background, size)
        caption = _pick(rng, ADD_TEMPLATES).format(colour=swatch_colour, shape=scene.shape)
    elif kind == "background":
        target = draw_scene(scene.shape, scene.box, colour, PALETTE[swatch_colour], size)
        caption = _pick(rng, BACKGROUND_TEMPLATES).format(colour=swatch_colour)
    else:
        raise ValueError(f"unknown edit kind {kind!r}; valid: {', '.join(EDIT_KINDS)}")
    swatch = Image.new("RGB", (size, size), PALETTE[swatch_colour])
    mask = silhouette(scene, size).convert("RGB")
    return EditPair(kind, caption, (reference, swatch, mask), target)


def edit_pairs(seed: int, n: int, size: int, kinds: tuple[str, ...] = EDIT_KINDS) -> list[EditPair]:
    """`n` pairs, the kinds in turn, deterministic for a seed."""
    rng = np.random.default_rng([seed, 2])  # a stream of its own, apart from the demo dataset's splits
    pairs: list[EditPair] = []
    while len(pairs) < n:
        pair = make_edit(rng, size, kinds[len(pairs) % len(kinds)])
        if pair is not None:
            pairs.append(pair)
    return pairs


def random_images(rng: np.random.Generator, n: int, size: int) -> list[Image.Image]:
    """What the VAE must reconstruct: scenes (grey or coloured backgrounds, with or without a
    shape, sometimes two), colour swatches and silhouettes, about in the proportions it meets them."""
    images = []
    for _ in range(n):
        roll = rng.random()
        scene = choose_scene(rng, size)
        if roll < 0.15:
            images.append(Image.new("RGB", (size, size), PALETTE[scene.source]))
        elif roll < 0.3:
            images.append(silhouette(scene, size).convert("RGB"))
        else:
            background = PALETTE[scene.target] if rng.random() < 0.25 else scene.background
            image = draw_scene(scene.shape, scene.box, PALETTE[scene.source] if rng.random() > 0.1 else None, background, size)
            if rng.random() < 0.2:  # a second shape: the decoder must not depend on there being one
                other = choose_scene(rng, size)
                image.paste(PALETTE[other.source], mask=_mask(other.shape, other.box, size))
            images.append(image)
    return images


__all__ = ["EDIT_KINDS", "EditPair", "HELD_OUT_KIND", "draw_scene", "edit_pairs", "make_edit", "random_images"]
