"""Bad inputs beyond pairing: a generated corpus of the ways real images and folders go wrong.

Each case asserts the exact file is named, whether it blocks (error) or is converted with a
note (warning), and that loading treats target and reference the same way.
"""

import numpy as np
import pytest
from PIL import Image

from tests.trainer.data.test_pairing import dataset_config, demo, pairing_error  # noqa: F401 (fixture)
from trainer.data.images import load_rgb, probe_image
from trainer.data.pairing import build_manifest
from trainer.model.flavours import FLAVOURS

V2 = FLAVOURS["edit-v2"]


def warnings_for(demo) -> list[str]:
    _, report = build_manifest(dataset_config(demo), V2, eval_dataset_id="eval")
    return report.warnings


@pytest.mark.parametrize(
    "mode, note",
    [
        ("CMYK", "CMYK image, converted to RGB"),
        ("P", "palette image, converted to RGB"),
        ("I;16", "(16-bit) image, converted to 8-bit RGB"),
        ("RGBA", "has transparency, composited on white"),
    ],
)
def test_unusual_colour_modes_are_converted_with_a_note(demo, mode, note):
    target = demo.folder("train", "edited") / "0001.png"
    extension = ".jpg" if mode == "CMYK" else ".png"
    with Image.open(target) as image:
        converted = image.convert("L").convert(mode) if mode == "I;16" else image.convert(mode)
    target.unlink()
    target = target.with_suffix(extension)
    converted.save(target)
    assert any(w.startswith(str(target)) and note in w for w in warnings_for(demo))
    assert load_rgb(target).mode == "RGB"


def test_transparent_pixels_become_white_not_their_hidden_colour(tmp_path):
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    image.save(tmp_path / "a.png")
    assert np.asarray(load_rgb(tmp_path / "a.png"))[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied_to_size_and_pixels(tmp_path):
    image = Image.new("RGB", (40, 20), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    image.save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    probe = probe_image(tmp_path / "rotated.jpg")
    assert (probe.width, probe.height) == (20, 40)
    assert "EXIF orientation 6 applied" in probe.notes
    assert load_rgb(tmp_path / "rotated.jpg").size == (20, 40)


def test_a_decompression_bomb_is_refused_by_name(demo, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 16 * 16)  # the demo's 32 px images now count as bombs
    from trainer.data import images

    images._PROBES.clear()
    error = pairing_error(demo)
    assert f"{demo.folder('train', 'edited') / '0000.png'}: decompression bomb refused" in str(error)
    images._PROBES.clear()


def test_a_non_image_file_is_ignored_with_a_warning(demo):
    stray = demo.folder("train", "reference") / "notes.docx"
    stray.write_text("not an image")
    assert f"{stray}: not an image type (.docx), ignored" in warnings_for(demo)


def test_a_file_with_an_image_extension_that_is_not_an_image_is_an_error(demo):
    fake = demo.folder("train", "reference") / "0002.png"
    fake.write_text("hello")
    assert f"{fake}: not a readable image" in str(pairing_error(demo))


def test_a_strict_reference_of_another_shape_is_an_error_naming_the_fix(demo):
    reference = demo.folder("train", "reference_2") / "0003.png"
    Image.new("RGB", (64, 32)).save(reference)
    message = str(pairing_error(demo))
    assert f"{reference}: 64x32 has another aspect ratio than its target" in message
    assert "conditioning_type 'reference_loose'" in message


def test_a_loose_reference_may_have_another_shape(demo):
    from trainer.data.dataset_config import parse_dataset_config

    Image.new("RGB", (64, 32)).save(demo.folder("train", "reference_2") / "0003.png")
    config = dataset_config(demo)
    entries = [e.model_dump(exclude_unset=True) for e in config.entries]
    for entry in entries:
        if entry.get("dataset_type") == "conditioning":
            entry["conditioning_type"] = "reference_loose"
    manifest, report = build_manifest(parse_dataset_config(entries, "x", V2, demo.root), V2, eval_dataset_id="eval")
    assert report.errors == [] and len(manifest) == 5


def test_an_image_far_below_the_training_size_is_a_warning(demo):
    small = demo.folder("train", "edited") / "0002.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(small)
    for folder in ("reference", "reference_2"):
        Image.new("RGB", (8, 8)).save(demo.folder("train", folder) / "0002.png")
    assert any(w.startswith(f"{small}: 8x8 is well below the training size 32x32") for w in warnings_for(demo))


def test_names_differing_only_by_case_are_an_error(demo):
    folder = demo.folder("train", "reference")
    (folder / "0001.png").rename(folder / "Sample.png")
    (folder / "0002.png").rename(folder / "sample.PNG")
    message = str(pairing_error(demo))
    assert f"{folder / 'Sample.png'} and {folder / 'sample.PNG'}: names differ only by letter case" in message


def test_a_reference_named_in_another_case_gets_a_hint(demo):
    edited = demo.folder("train", "edited")
    (edited / "0001.png").rename(edited / "Shape.png")
    (edited / "0001.txt").rename(edited / "Shape.txt")
    for name in ("reference", "reference_2"):
        (demo.folder("train", name) / "0001.png").rename(demo.folder("train", name) / "shape.png")
    folder = demo.folder("train", "reference")
    assert f"{folder / 'Shape.png'}: missing file (found shape.png: names must match exactly, including case)" in str(
        pairing_error(demo)
    )


def test_a_caption_that_is_not_utf8_is_an_error(demo):
    caption = demo.folder("train", "edited") / "0003.txt"
    caption.write_bytes(b"make it \xff\xfe red")
    assert f"{caption}: caption missing, empty or not UTF-8" in str(pairing_error(demo))
