"""Files that only fail when decoded or opened are caught by the pairing check (issue 18 §5, §8).

PIL's `verify()` reads no pixel data of a JPEG or a BMP, so a truncated one passed `check` and
`train` then died mid-cache with `OSError: image file is truncated`. A symlink loop in a dataset
folder and a caption that is a folder gave tracebacks. Each is now one line of the pairing report.
"""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import write_small_project
from tests.trainer.data.test_pairing import demo, pairing_error  # noqa: F401 (fixture)
from trainer.data.images import probe_image


def noisy_image(size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8))


@pytest.mark.parametrize("fmt, suffix", [("JPEG", ".jpg"), ("BMP", ".bmp"), ("PNG", ".png"), ("WEBP", ".webp")])
def test_a_truncated_image_of_any_format_is_unreadable_and_a_whole_one_is_fine(tmp_path, fmt, suffix):
    whole, cut = tmp_path / f"whole{suffix}", tmp_path / f"cut{suffix}"
    noisy_image().save(whole, fmt)
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    assert probe_image(whole).error is None
    assert "not a readable image" in probe_image(cut).error


def test_a_truncated_jpeg_target_is_listed_by_the_pairing_check(demo):
    target = demo.folder("train", "edited") / "0001.png"
    jpeg = target.with_suffix(".jpg")
    Image.open(target).convert("RGB").resize((256, 256)).save(jpeg, "JPEG")
    jpeg.write_bytes(jpeg.read_bytes()[:-300])
    target.unlink()
    assert f"{jpeg}: not a readable image (OSError: image file is truncated" in str(pairing_error(demo))


def test_a_symlink_loop_among_the_images_is_listed_not_raised(demo):
    loop = demo.folder("train", "reference") / "0002.png"
    loop.unlink()
    loop.symlink_to(loop)
    assert f"{loop}: cannot be read (Too many levels of symbolic links)" in str(pairing_error(demo))


def test_a_caption_that_is_a_folder_is_listed_as_a_missing_caption(demo):
    caption = demo.folder("train", "edited") / "0003.txt"
    caption.unlink()
    caption.mkdir()
    assert f"{caption}: caption missing" in str(pairing_error(demo))


def test_qwen_edit_check_lists_a_truncated_jpeg_with_one_error_and_no_traceback(demo_root, tmp_path):
    config, data = write_small_project(tmp_path, demo_root / "demo" / "models", n_train=2)
    target = tmp_path / "data" / "train" / "edited" / "0001.png"
    jpeg = target.with_suffix(".jpg")
    noisy_image(128).save(jpeg, "JPEG")
    jpeg.write_bytes(jpeg.read_bytes()[:-500])
    target.unlink()
    result = subprocess.run([sys.executable, "-m", "trainer.cli", "check", "--config", str(config), "--data", str(data)],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{jpeg}: not a readable image (OSError: image file is truncated" in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.startswith("error: the dataset has 1 problem(s)")
