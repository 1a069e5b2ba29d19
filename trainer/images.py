"""Reading images from disk and choosing the size a target trains at (aspect-ratio buckets)."""

import math
from pathlib import Path

from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
BUCKET_MULTIPLE = 32  # sides of every training size, as the pipelines round theirs


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def load_rgb(path: str | Path) -> Image.Image:
    """An RGB image with its EXIF orientation applied, so target and reference agree."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        return image.convert("RGB")


def probe_image(path: str | Path) -> str | None:
    """None when `path` is a readable image, else why it is not (for the pairing report)."""
    path = Path(path)
    if not path.is_file():
        return "missing file"
    if path.stat().st_size == 0:
        return "empty (zero-byte) file"
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as exc:  # PIL raises many types for bad files
        return f"not a readable image ({type(exc).__name__}: {exc})"
    return None


def bucket_size(width: int, height: int, resolution: float, resolution_type: str) -> tuple[int, int]:
    """(width, height) a target of this aspect ratio trains at, sides a multiple of 32.

    `pixel_area`: resolution is an edge, the area is resolution**2 (SimpleTuner's default);
    `area`: resolution is in megapixels; `pixel`: resolution is the shorter edge.
    """
    ratio = width / height
    if resolution_type == "pixel":
        short = resolution
        w, h = (short * ratio, short) if ratio >= 1 else (short, short / ratio)
    else:
        area = resolution**2 if resolution_type == "pixel_area" else resolution * 1024 * 1024
        w = math.sqrt(area * ratio)
        h = w / ratio
    return _round_side(w), _round_side(h)


def _round_side(value: float) -> int:
    return max(BUCKET_MULTIPLE, int(round(value / BUCKET_MULTIPLE)) * BUCKET_MULTIPLE)
