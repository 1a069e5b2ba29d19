"""Edit metrics in pixels: how users judge an edit (did it happen, did the rest stay put, did the picture move).

All of them compare 8-bit RGB images of one size (the generated edit, its target, its first
reference); `edit_metrics` resizes the target and reference to the output first.

- `psnr`, `ssim`: fidelity of the output to the target, whole image (scikit-image).
- `edit_success`: PSNR of the output against the target inside the *edit region*, the pixels
  where target and reference differ: did the edit happen there?
- `preservation`: PSNR of the output against the reference outside the edit region: did the
  rest of the image stay as it was?
- `pixel_shift`: how far (in pixels) the output is translated against the reference, by
  cross-correlation: the Qwen-Image-Edit-2509 "zoom/shift" failure shows up here.

PSNRs of identical pixels are infinite; they are reported as `MAX_PSNR` so that means, JSON and
MLflow stay finite.
"""

import math

import numpy as np
from PIL import Image
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity
from skimage.registration import phase_cross_correlation

MAX_PSNR = 100.0  # dB for identical pixels; above any finite 8-bit PSNR of an image up to ~4 gigapixels
REGION_TOLERANCE = 12  # of 255: target and reference differing by less are the same pixel (noise, compression)
SHIFT_UPSAMPLE = 10  # the registration resolves shifts to 1/10 pixel
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "edit_success": True, "preservation": True, "pixel_shift": False}


def as_array(image: Image.Image, size: tuple[int, int] | None = None) -> np.ndarray:
    """uint8 [H, W, 3]; resized (bicubic) to `size` = (width, height) when given and different."""
    image = image.convert("RGB")
    if size is not None and image.size != tuple(size):
        image = image.resize(tuple(size), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two same-shaped uint8 arrays (any shape: masked pixels too); MAX_PSNR when equal."""
    if a.size == 0:
        return math.nan
    if mean_squared_error(a, b) == 0:
        return MAX_PSNR
    return float(peak_signal_noise_ratio(a, b, data_range=255))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two uint8 [H, W, 3] images (scikit-image's 7x7 window, smaller on tiny images)."""
    window = min(7, *a.shape[:2])
    window -= 1 - window % 2  # must be odd
    return float(structural_similarity(a, b, channel_axis=2, data_range=255, win_size=window))


def edit_region(target: np.ndarray, reference: np.ndarray, tolerance: int = REGION_TOLERANCE) -> np.ndarray:
    """bool [H, W]: the pixels the edit changes, where any channel of target and reference differs by more than `tolerance`."""
    difference = np.abs(target.astype(np.int16) - reference.astype(np.int16)).max(axis=2)
    return difference > tolerance


def pixel_shift(reference: np.ndarray, output: np.ndarray) -> tuple[float, float]:
    """(dx, dy) in pixels by which `output`'s content sits translated against `reference` (+x right, +y down).

    Cross-correlation of the grey images (scikit-image's registration, without the phase
    normalisation): whole-image translation, subpixel. Phase normalisation whitens the spectrum,
    which on the nearly flat, soft outputs of a small model lifts noise into false peaks (half an
    image away); plain correlation keeps the shapes' weight. A flat image has no structure to
    register, and counts as unshifted.
    """
    grey_reference, grey_output = (x.astype(np.float64).mean(axis=2) for x in (reference, output))
    if np.ptp(grey_reference) == 0 or np.ptp(grey_output) == 0:
        return 0.0, 0.0
    grey_reference, grey_output = grey_reference - grey_reference.mean(), grey_output - grey_output.mean()
    # the returned shift registers `output` onto `reference`: the output's displacement is its negative
    (dy, dx), _, _ = phase_cross_correlation(grey_reference, grey_output, upsample_factor=SHIFT_UPSAMPLE, normalization=None)
    return float(-dx) + 0.0, float(-dy) + 0.0  # + 0.0 turns -0.0 into 0.0


def edit_metrics(output: Image.Image, target: Image.Image, reference: Image.Image) -> dict[str, float]:
    """Every metric of one generated edit; `edit_success` is left out when target equals reference
    (nothing to edit) and `preservation` when the edit changes every pixel."""
    size = output.size
    out, tgt, ref = as_array(output), as_array(target, size), as_array(reference, size)
    region = edit_region(tgt, ref)
    dx, dy = pixel_shift(ref, out)
    metrics = {"psnr": psnr(tgt, out), "ssim": ssim(tgt, out)}
    if region.any():
        metrics["edit_success"] = psnr(tgt[region], out[region])
    if not region.all():
        metrics["preservation"] = psnr(ref[~region], out[~region])
    metrics.update(pixel_shift=math.hypot(dx, dy), shift_x=dx, shift_y=dy)
    return metrics
