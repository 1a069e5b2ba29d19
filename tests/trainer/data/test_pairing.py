"""The pairing manifest: one row per edit target with its references, checked before any encoding.

Each test builds a small demo dataset (4 training and 1 eval sample, 32 px) and, where it is
about failures, breaks it the way real datasets break: a reference missing or empty, a target
cut short, a caption missing or blank. The user must get every problem in one report, each
naming the exact file.
"""

import json

import pandas as pd
import pytest

from trainer.data.dataset_config import parse_dataset_config
from trainer.data.images import BUCKET_MULTIPLE, bucket_size
from trainer.data.pairing import PairingError, build_manifest, read_manifest, reference_paths, write_manifest
from trainer.demo.dataset import generate_demo_dataset
from trainer.model.flavours import FLAVOURS

V2 = FLAVOURS["edit-v2"]
REFERENCES = ("reference", "reference_2")  # two references per sample, in this order


@pytest.fixture
def demo(tmp_path):
    return generate_demo_dataset(tmp_path / "data", n_train=4, n_eval=1, size=32)


def dataset_config(demo, **edit_fields):
    """edit-v2: 'edits' (train) and 'eval', each with REFERENCES as its conditioning datasets."""
    entries = []
    for split, dataset_id in (("train", "edits"), ("eval", "eval")):
        refs = [f"{dataset_id}-{name}" for name in REFERENCES]
        entries.append(
            {"id": dataset_id, "instance_data_dir": str(demo.folder(split, "edited")), "conditioning_data": refs, "resolution": 32}
            | (edit_fields if split == "train" else {})
        )
        entries += [
            {"id": ref, "dataset_type": "conditioning", "instance_data_dir": str(demo.folder(split, name))}
            for ref, name in zip(refs, REFERENCES)
        ]
    return parse_dataset_config(entries, "multidatabackend.json", V2, demo.root)


def pairing_error(demo, **edit_fields) -> PairingError:
    with pytest.raises(PairingError) as info:
        build_manifest(dataset_config(demo, **edit_fields), V2, eval_dataset_id="eval")
    return info.value


# --- a sound dataset -----------------------------------------------------------------------


def test_a_sound_dataset_gives_one_row_per_target_with_its_references_in_order(demo):
    manifest, report = build_manifest(dataset_config(demo), V2, eval_dataset_id="eval")
    assert report.errors == [] and report.warnings == []
    assert list(manifest["name"]) == ["0000", "0001", "0002", "0003", "0000"]
    assert list(manifest["split"]) == ["train"] * 4 + ["eval"]
    assert list(manifest["dataset_id"]) == ["edits"] * 4 + ["eval"]
    for _, row in manifest.iterrows():
        split = row["split"]
        assert row["target_path"] == str(demo.folder(split, "edited") / f"{row['name']}.png")
        assert row["n_references"] == 2
        assert reference_paths(row) == [str(demo.folder(split, name) / f"{row['name']}.png") for name in REFERENCES]
        assert row["reference_3"] is None
        caption_file = demo.folder(split, "edited") / f"{row['name']}.txt"
        assert row["caption"] == caption_file.read_text().strip()  # the file ends in a newline; the caption does not


def test_without_an_eval_dataset_id_every_dataset_trains(demo):
    manifest, _ = build_manifest(dataset_config(demo), V2)
    assert set(manifest["split"]) == {"train"} and len(manifest) == 5


def test_a_reference_may_have_another_image_format_than_its_target(demo):
    from PIL import Image

    png = demo.folder("train", "reference") / "0001.png"
    with Image.open(png) as image:
        image.convert("RGB").save(png.with_suffix(".jpg"))
    png.unlink()
    manifest, report = build_manifest(dataset_config(demo), V2)
    assert manifest.loc[1, "reference_1"] == str(png.with_suffix(".jpg"))
    assert report.errors == []


# --- a broken dataset: every problem at once, each naming its file ------------------------------


def break_dataset(demo) -> dict[str, str]:
    """Four defects in four different samples; returns what each reported line must contain."""
    missing = demo.folder("train", "reference") / "0000.png"
    missing.unlink()
    empty = demo.folder("train", "reference_2") / "0001.png"
    empty.write_bytes(b"")
    truncated = demo.folder("train", "edited") / "0002.png"
    truncated.write_bytes(truncated.read_bytes()[:100])
    blank_caption = demo.folder("train", "edited") / "0003.txt"
    blank_caption.write_text("   \n")
    return {
        "missing reference": f"{missing}: missing file",
        "zero-byte reference": f"{empty}: empty (zero-byte) file",
        "truncated target": f"{truncated}: not a readable image",
        "empty caption": f"{blank_caption}: caption missing, empty",
    }


def test_a_missing_or_empty_reference_a_truncated_target_and_a_blank_caption_are_reported_at_once(demo):
    expected = break_dataset(demo)
    error = pairing_error(demo)
    assert len(error.report.errors) == len(expected), error.report.errors  # one line per problem
    for problem, line in expected.items():
        assert line in str(error), problem
    assert "nothing was encoded or trained" in str(error)
    # a reference's line also says which target it belongs to
    assert f"(reference for {demo.folder('train', 'edited') / '0000.png'})" in str(error)


def test_a_missing_caption_is_reported_together_with_every_other_problem(demo):
    expected = break_dataset(demo)
    no_caption = demo.folder("train", "edited") / "0000.txt"
    no_caption.unlink()
    expected["missing caption"] = f"{no_caption}: caption missing"
    error = pairing_error(demo)
    for problem, line in expected.items():
        assert line in str(error), problem
    assert len(error.report.errors) == len(expected)


def test_two_targets_with_the_same_name_are_reported(demo):
    from PIL import Image

    target = demo.folder("train", "edited") / "0000.png"
    with Image.open(target) as image:
        image.convert("RGB").save(target.with_suffix(".jpg"))
    error = pairing_error(demo)
    assert str(target) in str(error) and str(target.with_suffix(".jpg")) in str(error)


def test_a_missing_folder_is_reported(demo):
    error = pairing_error(demo, instance_data_dir=str(demo.root / "train" / "edits"))
    assert f"instance_data_dir {demo.root / 'train' / 'edits'} does not exist" in str(error)


def test_references_without_a_target_are_warnings_not_errors(demo):
    orphan = demo.folder("train", "reference_2") / "0099.png"
    orphan.write_bytes((demo.folder("train", "reference_2") / "0000.png").read_bytes())
    manifest, report = build_manifest(dataset_config(demo), V2, eval_dataset_id="eval")
    assert len(manifest) == 5 and report.errors == []
    assert len(report.warnings) == 1
    assert report.warnings[0].startswith(f"{orphan}: reference with no target image")
    assert "| warning |" in report.to_markdown()


def test_an_unknown_eval_dataset_id_is_refused_with_a_suggestion(demo):
    from trainer.errors import ConfigError

    with pytest.raises(ConfigError, match="no dataset with id 'evl'; did you mean 'eval'"):
        build_manifest(dataset_config(demo), V2, eval_dataset_id="evl")


def test_a_dataset_whose_only_image_dataset_is_the_eval_one_has_no_training_samples(demo):
    config = dataset_config(demo)
    config = parse_dataset_config(
        [e.model_dump() for e in config.entries if e.id.startswith("eval")], "multidatabackend.json", V2, demo.root
    )
    with pytest.raises(PairingError, match="no training samples"):
        build_manifest(config, V2, eval_dataset_id="eval")


def test_targets_below_minimum_image_size_are_left_out_each_named_in_a_warning(demo):
    from PIL import Image

    small = demo.folder("train", "edited") / "0002.png"
    Image.open(small).resize((16, 16)).save(small)  # √area 16 < 24; the others are 32 x 32
    manifest, report = build_manifest(dataset_config(demo, minimum_image_size=24), V2, eval_dataset_id="eval")
    assert list(manifest[manifest["split"] == "train"]["name"]) == ["0000", "0001", "0003"]
    assert report.warnings == [f"{small}: 16x16 is below minimum_image_size 24 (pixel_area) of dataset 'edits'; left out"]


# --- caption strategies --------------------------------------------------------------------------


def test_caption_strategy_filename_uses_the_file_name_with_underscores_as_spaces(demo):
    for folder in ("edited", *REFERENCES):
        path = demo.folder("train", folder) / "0000.png"
        path.rename(path.with_name("make_the_square_blue.png"))
    manifest, _ = build_manifest(dataset_config(demo, caption_strategy="filename"), V2, eval_dataset_id="eval")
    captions = dict(zip(manifest["name"], manifest["caption"]))
    assert captions["make_the_square_blue"] == "make the square blue"
    assert captions["0001"] == "0001"


def test_caption_strategy_instanceprompt_gives_every_sample_the_instance_prompt(demo):
    for txt in demo.folder("train", "edited").glob("*.txt"):
        txt.unlink()  # not read at all
    config = dataset_config(demo, caption_strategy="instanceprompt", instance_prompt="make it blue")
    manifest, _ = build_manifest(config, V2, eval_dataset_id="eval")
    assert list(manifest.loc[manifest["split"] == "train", "caption"]) == ["make it blue"] * 4


# --- the manifest file -----------------------------------------------------------------------


def test_write_manifest_and_read_manifest_round_trip(demo, tmp_path):
    manifest, _ = build_manifest(dataset_config(demo), V2, eval_dataset_id="eval")
    path = write_manifest(manifest, tmp_path / "out" / "pairing_manifest.json")
    assert [p.name for p in path.parent.iterdir()] == ["pairing_manifest.json"]  # no temp file left
    records = json.loads(path.read_text())
    assert records[0]["name"] == "0000" and records[0]["reference_3"] is None
    again = read_manifest(path)
    pd.testing.assert_frame_equal(again, manifest)
    assert again.loc[0, "reference_3"] is None
    assert reference_paths(again.loc[4]) == reference_paths(manifest.loc[4])


# --- bucket sizes -------------------------------------------------------------------------------


@pytest.mark.parametrize("resolution_type, resolution", [("pixel_area", 1024), ("area", 1.0), ("pixel", 768), ("pixel_area", 512)])
@pytest.mark.parametrize("width, height", [(1024, 1024), (1920, 1080), (600, 900), (4000, 1000), (37, 53)])
def test_bucket_sides_are_multiples_of_32_and_keep_the_aspect_ratio(resolution_type, resolution, width, height):
    w, h = bucket_size(width, height, resolution, resolution_type)
    assert w % BUCKET_MULTIPLE == 0 and h % BUCKET_MULTIPLE == 0
    assert w / h == pytest.approx(width / height, rel=0.06)
    if resolution_type == "pixel":
        assert min(w, h) == pytest.approx(resolution, abs=BUCKET_MULTIPLE / 2)  # the short edge
    else:
        area = resolution**2 if resolution_type == "pixel_area" else resolution * 1024 * 1024
        assert w * h == pytest.approx(area, rel=0.06)


def test_crop_aspect_square_trains_every_target_square_at_the_same_area():
    assert bucket_size(1920, 1080, 1024, "pixel_area", crop_aspect="square") == (1024, 1024)
    assert bucket_size(600, 900, 512, "pixel", crop_aspect="square") == (512, 512)
    assert bucket_size(1920, 1080, 1024, "pixel_area", crop_aspect="closest") == bucket_size(1920, 1080, 1024, "pixel_area")


def test_bucket_examples():
    assert bucket_size(1024, 768, 1024, "pixel_area") == (1184, 896)
    assert bucket_size(1024, 768, 1.0, "area") == (1184, 896)  # 1 megapixel == 1024 px edge
    assert bucket_size(1024, 768, 512, "pixel") == (672, 512)
    assert bucket_size(32, 32, 64, "pixel_area") == (64, 64)  # small images are scaled up to the bucket
    assert bucket_size(5000, 10, 64, "pixel_area") == (1440, 32)  # never below 32 px
