"""Reading images from disk and choosing the size a target trains at (aspect-ratio buckets)."""

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISREG
from typing import Literal

from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
BUCKET_MULTIPLE = 32  # sides of every training size, as the pipelines round theirs

ResolutionType = Literal["pixel_area", "area", "pixel"]
CropAspect = Literal["preserve", "closest", "square"]  # SimpleTuner's names; preserve == closest here


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def load_rgb(path: str | Path) -> Image.Image:
    """An RGB image with its EXIF orientation applied, so target and reference agree.

    Transparent pixels are composited on white (a plain convert would expose whatever colour
    the transparent pixels happen to hold); CMYK, palette and 16-bit images are converted.
    """
    return load_image(path)


def load_image(path: str | Path, keep_alpha: bool = False) -> Image.Image:
    """`load_rgb`, or with `keep_alpha` an RGBA image whose alpha is the file's (opaque when it has
    none): what Qwen-Image-2.1's VAE reads (`Flavour.keeps_alpha`)."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if has_alpha(image):
            rgba = image.convert("RGBA")
            return rgba if keep_alpha else on_white(rgba)
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            rgb = image.point(lambda v: v / 256).convert("L").convert("RGB")
        else:
            rgb = image.convert("RGB")
        return rgb.convert("RGBA") if keep_alpha else rgb


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def on_white(image: Image.Image) -> Image.Image:
    """RGB with transparent pixels composited on white (an RGB image is returned as it is)."""
    if image.mode == "RGB":
        return image
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


_ROTATED_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that swap width and height


@dataclass(frozen=True)
class ImageProbe:
    """What the pairing checks need to know of a file: its header, a structural verify, and a decode of
    the pixel data where verify reads none (JPEG, BMP)."""

    error: str | None = None
    width: int = 0  # after EXIF orientation
    height: int = 0
    notes: tuple[str, ...] = field(default_factory=tuple)
    has_alpha: bool = False  # what loading does with it depends on the flavour: see `alpha_note`


def probe_image(path: str | Path) -> ImageProbe:
    """Is `path` a usable image, and what will loading it change? Cached per (path, size, mtime)."""
    try:
        stat = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return ImageProbe("missing file")
    except (OSError, ValueError) as exc:  # a symlink loop, no permission, a NUL byte
        return ImageProbe(f"cannot be read ({getattr(exc, 'strerror', None) or exc})")
    if not S_ISREG(stat.st_mode):
        return ImageProbe("not a file")
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _PROBES:
        _PROBES[key] = _probe(*key)
    return _PROBES[key]


_PROBES: dict[tuple[str, int, int], ImageProbe] = {}  # (path, size, mtime_ns) -> probe; a changed file misses
PARALLEL_ABOVE = 2000  # files; below this a process pool costs more than it saves


def probe_images(paths: list[str]) -> None:
    """Probe many files at once on every core (PIL's header parsing is Python-bound), filling the cache."""
    keys = []
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError:
            continue
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in _PROBES and S_ISREG(stat.st_mode):
            keys.append(key)
    workers = os.cpu_count() or 1
    if len(keys) < PARALLEL_ABOVE or workers == 1:
        for key in keys:
            _PROBES[key] = _probe(*key)
        return
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers) as pool:
        for key, probe in zip(keys, pool.map(_probe_key, keys, chunksize=512)):
            _PROBES[key] = probe


def _probe_key(key: tuple[str, int, int]) -> ImageProbe:
    return _probe(*key)


def _probe(path: str, size: int, mtime_ns: int) -> ImageProbe:
    if size == 0:
        return ImageProbe("empty (zero-byte) file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height, mode, image_format = image.width, image.height, image.mode, image.format
                alpha = mode in ("RGBA", "LA", "PA") or "transparency" in image.info
                orientation = _orientation(image.info.get("exif"))  # header bytes only: no pixel decoding
                image.verify()  # structure and checksums: catches truncated PNG and WebP files
            if image_format in _PIXELS_NOT_VERIFIED:
                _decode(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return ImageProbe(f"decompression bomb refused ({exc}); downscale it below {Image.MAX_IMAGE_PIXELS} pixels")
    except Exception as exc:  # PIL raises many types for bad files
        return ImageProbe(f"not a readable image ({type(exc).__name__}: {exc})")
    notes = []
    if mode == "CMYK":
        notes.append("CMYK image, converted to RGB")
    elif mode.startswith("I"):
        notes.append(f"{mode} (16-bit) image, converted to 8-bit RGB")
    elif mode == "P" and not alpha:
        notes.append("palette image, converted to RGB")
    if orientation in _ROTATED_ORIENTATIONS:
        width, height = height, width
    if orientation != 1:
        notes.append(f"EXIF orientation {orientation} applied")
    return ImageProbe(None, width, height, tuple(notes), alpha)


def alpha_note(keep_alpha: bool, is_reference: bool) -> str:
    """What training does with a transparent image, as the flavour's pipeline does it."""
    if not keep_alpha:
        return "has transparency, composited on white"
    if is_reference:  # QwenImage21Pipeline: the VAE reads RGBA, only the VL encoder's copy is flattened
        return "has transparency: the VAE reads its alpha channel, the Qwen3-VL encoder sees it composited on white (as QwenImage21Pipeline does)"
    return "has transparency: trained with its alpha channel (Qwen-Image-2.1's VAE encodes RGBA)"


# PIL's verify() reads no pixel data of these: a truncated file passes it (and then fails mid-cache)
_PIXELS_NOT_VERIFIED = ("JPEG", "MPO", "BMP", "DIB")


def _decode(path: str) -> None:
    """Decode every byte of pixel data; a JPEG at 1/8 scale (libjpeg skips the inverse DCT, still reads it all)."""
    with Image.open(path) as image:
        if image.format in ("JPEG", "MPO"):
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
        image.load()


def _orientation(raw_exif: bytes | None) -> int:
    if not raw_exif:
        return 1
    exif = Image.Exif()
    exif.load(raw_exif)
    return int(exif.get(0x0112, 1))


def bucket_size(
    width: int, height: int, resolution: float, resolution_type: str, crop_aspect: str = "preserve"
) -> tuple[int, int]:
    """(width, height) a target of this aspect ratio trains at, sides a multiple of 32.

    `pixel_area`: resolution is an edge, the area is resolution**2 (SimpleTuner's default);
    `area`: resolution is in megapixels; `pixel`: resolution is the shorter edge.
    `crop_aspect` 'square' trains every image square (centre-cropped); otherwise the aspect
    ratio is kept, up to the rounding of the sides.
    """
    ratio = 1.0 if crop_aspect == "square" else width / height
    if resolution_type == "pixel":
        short = resolution
        w, h = (short * ratio, short) if ratio >= 1 else (short, short / ratio)
    else:
        area = resolution**2 if resolution_type == "pixel_area" else resolution * 1024 * 1024
        w = math.sqrt(area * ratio)
        h = w / ratio
    return _round_side(w), _round_side(h)


def crop_to_aspect(image: Image.Image, width: int, height: int) -> Image.Image:
    """The largest centred crop of `image` with the aspect ratio width:height, at the image's own resolution.

    A `reference_strict` reference gets its target's framing this way; the pipeline's own
    preparation then resizes it, as at inference (resizing here first would blur it).
    """
    ratio = width / height
    if image.width / image.height > ratio:  # wider than wanted: trim the sides
        crop_w, crop_h = max(1, round(image.height * ratio)), image.height
    else:  # taller: trim top and bottom
        crop_w, crop_h = image.width, max(1, round(image.width / ratio))
    left, top = (image.width - crop_w) // 2, (image.height - crop_h) // 2
    return image.crop((left, top, left + crop_w, top + crop_h))


def image_size_measure(width: int, height: int, resolution_type: str) -> float:
    """An image's size in the unit of `resolution` (and `minimum_image_size`) for this resolution_type."""
    if resolution_type == "pixel":
        return float(min(width, height))
    if resolution_type == "area":
        return width * height / (1024 * 1024)
    return math.sqrt(width * height)


def _round_side(value: float) -> int:
    return max(BUCKET_MULTIPLE, int(round(value / BUCKET_MULTIPLE)) * BUCKET_MULTIPLE)
