"""Edit metrics (`trainer/evaluation/metrics.py`) on constructed images whose answer is known."""

import math

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

from trainer.evaluation.metrics import MAX_PSNR, edit_metrics, edit_region, pixel_shift, psnr, ssim


def textured(size: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth random RGB texture: structure everywhere, so a translation is measurable."""
    noise = np.random.default_rng(seed).random((size, size, 3))
    smooth = gaussian_filter(noise, sigma=(2, 2, 0))
    return ((smooth - smooth.min()) / np.ptp(smooth) * 255).round().astype(np.uint8)


def scene_with_square(colour: tuple[int, int, int], background: np.ndarray | None = None) -> np.ndarray:
    image = textured() if background is None else background.copy()
    image[16:40, 20:44] = colour
    return image


def pil(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array)


@pytest.mark.parametrize("dx, dy", [(3, 0), (0, -2), (4, 5), (-6, 1)])
def test_a_known_translation_is_measured(dx, dy):
    reference = textured()
    moved = np.roll(reference, (dy, dx), axis=(0, 1))  # content moves dx right, dy down
    assert pixel_shift(reference, moved) == pytest.approx((dx, dy), abs=0.1)
    metrics = edit_metrics(pil(moved), pil(reference), pil(reference))
    assert metrics["pixel_shift"] == pytest.approx(math.hypot(dx, dy), abs=0.1)


def test_a_subpixel_translation_is_resolved():
    big = textured(256)
    reference = np.asarray(pil(big).resize((64, 64), Image.Resampling.BOX))
    moved = np.asarray(pil(np.roll(big, 2, axis=1)).resize((64, 64), Image.Resampling.BOX))  # 2/4 = 0.5 px
    dx, dy = pixel_shift(reference, moved)
    assert dx == pytest.approx(0.5, abs=0.15) and dy == pytest.approx(0.0, abs=0.15)


@pytest.mark.parametrize("seed", range(4))
def test_a_soft_noisy_recolouring_in_place_is_not_read_as_a_shift(seed):
    """A small model's output: the demo's flat scene, the shape recoloured in place but blurred and
    noisy. Registration must find no shift (phase normalisation found false ones half an image away)."""
    from PIL import ImageFilter

    reference = np.full((64, 64, 3), 215, np.uint8)
    reference[20:44, 12:36] = (220, 30, 30)
    output = np.full((64, 64, 3), 215, np.uint8)
    output[20:44, 12:36] = (30, 170, 50)
    output = np.asarray(pil(output).filter(ImageFilter.GaussianBlur(3))).astype(np.int16)
    output = np.clip(output + np.random.default_rng(seed).integers(-12, 13, output.shape), 0, 255).astype(np.uint8)
    assert math.hypot(*pixel_shift(reference, output)) < 1.0


def test_an_unmoved_image_and_a_flat_image_have_no_shift():
    reference = textured()
    assert pixel_shift(reference, reference) == (0.0, 0.0)
    flat = np.full((32, 32, 3), 200, np.uint8)
    assert pixel_shift(flat, flat) == (0.0, 0.0)


def test_identical_images_score_the_maximum_not_infinity():
    image = textured()
    assert psnr(image, image) == MAX_PSNR
    assert ssim(image, image) == pytest.approx(1.0)
    metrics = edit_metrics(pil(image), pil(image), pil(image))
    assert all(math.isfinite(v) for v in metrics.values())
    assert "edit_success" not in metrics  # target == reference: nothing was to be edited
    assert metrics["preservation"] == MAX_PSNR and metrics["pixel_shift"] == 0.0


def test_the_edit_region_is_where_target_and_reference_differ():
    reference = scene_with_square((200, 30, 30))
    target = scene_with_square((30, 60, 220), background=reference)
    region = edit_region(target, reference)
    expected = np.zeros((64, 64), bool)
    expected[16:40, 20:44] = True
    assert (region == expected).all()
    noisy = np.clip(reference.astype(int) + np.random.default_rng(1).integers(-5, 6, reference.shape), 0, 255)
    assert not edit_region(noisy.astype(np.uint8), reference).any()  # noise below the tolerance is no edit


def test_a_perfect_edit_succeeds_and_preserves():
    reference = scene_with_square((200, 30, 30))
    target = scene_with_square((30, 60, 220), background=reference)
    metrics = edit_metrics(pil(target), pil(target), pil(reference))
    assert metrics["edit_success"] == MAX_PSNR and metrics["preservation"] == MAX_PSNR and metrics["psnr"] == MAX_PSNR


def test_doing_nothing_preserves_the_background_but_fails_the_edit():
    reference = scene_with_square((200, 30, 30))
    target = scene_with_square((30, 60, 220), background=reference)
    metrics = edit_metrics(pil(reference), pil(target), pil(reference))
    assert metrics["preservation"] == MAX_PSNR  # the untouched background scores as preserved
    assert metrics["edit_success"] < 10
    assert metrics["pixel_shift"] == 0.0


def test_an_edit_that_also_repaints_the_background_loses_preservation_only():
    reference = scene_with_square((200, 30, 30))
    target = scene_with_square((30, 60, 220), background=reference)
    repainted = scene_with_square((30, 60, 220), background=textured(seed=7))
    metrics = edit_metrics(pil(repainted), pil(target), pil(reference))
    assert metrics["edit_success"] == MAX_PSNR
    assert metrics["preservation"] < 20 and metrics["psnr"] < 20


def test_target_and_reference_are_resized_to_the_output():
    reference = scene_with_square((200, 30, 30))
    target = scene_with_square((30, 60, 220), background=reference)
    small = pil(target).resize((32, 32), Image.Resampling.BICUBIC)
    metrics = edit_metrics(small, pil(target), pil(reference))
    assert metrics["psnr"] > 40 and metrics["pixel_shift"] < 0.2
