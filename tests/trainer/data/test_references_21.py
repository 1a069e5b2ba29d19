"""edit-2.1's data rules: up to 10 conditioning datasets, a manifest with reference_1..10, and
transparency treated as QwenImage21Pipeline treats it (kept for the VAE, on white for the VL encoder)."""

import numpy as np
import pytest
from PIL import Image

from trainer.data.dataset_config import parse_dataset_config
from trainer.data.images import load_image, load_rgb
from trainer.data.pairing import build_manifest, read_manifest, reference_paths, write_manifest
from trainer.demo.dataset import generate_demo_dataset
from trainer.errors import ConfigError
from trainer.model.flavours import FLAVOURS

V21, V2 = FLAVOURS["edit-2.1"], FLAVOURS["edit-v2"]


def entries(demo, n_refs: int) -> list[dict]:
    """One edit dataset with `n_refs` conditioning datasets, all over the demo's three reference folders."""
    folders = ["reference", "reference_2", "reference_3"]
    refs = [f"ref{i + 1}" for i in range(n_refs)]
    return [
        {"id": "edits", "instance_data_dir": str(demo.folder("train", "edited")), "conditioning_data": refs, "resolution": 32},
        *({"id": ref, "dataset_type": "conditioning", "instance_data_dir": str(demo.folder("train", folders[i % 3]))}
          for i, ref in enumerate(refs)),
    ]


@pytest.fixture
def demo(tmp_path):
    return generate_demo_dataset(tmp_path / "data", n_train=2, n_eval=0, size=32)


def refused(raw, flavour) -> str:
    with pytest.raises(ConfigError) as info:
        parse_dataset_config(raw, "multidatabackend.json", flavour)
    return str(info.value)


def test_edit_2_1_takes_ten_conditioning_datasets_and_the_manifest_lists_them_in_order(demo, tmp_path):
    config = parse_dataset_config(entries(demo, 10), "multidatabackend.json", V21, demo.root)
    manifest, report = build_manifest(config, V21)
    assert report.errors == []
    assert list(manifest.columns[-10:]) == [f"reference_{i}" for i in range(1, 11)]
    row = manifest.iloc[0]
    assert row["n_references"] == 10
    folders = ["reference", "reference_2", "reference_3"]
    assert reference_paths(row) == [str(demo.folder("train", folders[i % 3]) / "0000.png") for i in range(10)]
    # the manifest file round-trips, its extra columns included
    again = read_manifest(write_manifest(manifest, tmp_path / "manifest.json"))
    assert reference_paths(again.iloc[1]) == reference_paths(manifest.iloc[1])


def test_an_eleventh_reference_is_refused_naming_the_count_and_the_limit(demo):
    message = refused(entries(demo, 11), V21)
    assert "entry 'edits': edit-2.1 takes 1-10 conditioning dataset(s), got 11 in conditioning_data" in message
    assert "list at most 10" in message


def test_other_flavours_keep_their_limits_and_are_pointed_to_edit_2_1(demo):
    message = refused(entries(demo, 4), V2)
    assert "edit-v2 takes 1-3 conditioning dataset(s), got 4" in message
    assert "use model_flavour 'edit-2.1' (takes 4)" in message


def test_edit_v2_manifests_keep_their_three_reference_columns(demo):
    config = parse_dataset_config(entries(demo, 3), "multidatabackend.json", V2, demo.root)
    manifest, _ = build_manifest(config, V2)
    assert [c for c in manifest.columns if c.startswith("reference_")] == ["reference_1", "reference_2", "reference_3"]


def test_edit_2_1_refuses_an_edit_v1_embeds_cache_and_caches_prompts_as_text_embeds(demo):
    raw = entries(demo, 1)
    raw[0]["conditioning_image_embeds"] = "embeds"
    raw.append({"id": "embeds", "dataset_type": "conditioning_image_embeds"})
    assert "conditioning_image_embeds is an edit-v1 cache" in refused(raw, V21)
    config = parse_dataset_config(entries(demo, 1), "multidatabackend.json", V21, demo.root)
    assert config.training_set(config.by_id("edits"), V21).text_cache_dir == demo.root / "cache" / "text_embeds" / "edits"


def _make_transparent(path):
    with Image.open(path) as image:
        rgba = image.convert("RGBA")
    pixels = np.asarray(rgba).copy()
    pixels[:, :16, 3] = 0  # left half see-through
    Image.fromarray(pixels, "RGBA").save(path)


def test_transparency_is_kept_for_the_vae_and_the_notes_say_what_each_flavour_does(demo):
    target = demo.folder("train", "edited") / "0000.png"
    reference = demo.folder("train", "reference") / "0001.png"
    _make_transparent(target)
    _make_transparent(reference)
    config = parse_dataset_config(entries(demo, 1), "multidatabackend.json", V21, demo.root)
    _, report = build_manifest(config, V21)
    assert f"{target}: has transparency: trained with its alpha channel" in "\n".join(report.warnings)
    assert (f"{reference}: has transparency: the VAE reads its alpha channel, the Qwen3-VL encoder sees it composited "
            "on white (as QwenImage21Pipeline does)") in report.warnings
    config = parse_dataset_config(entries(demo, 1), "multidatabackend.json", V2, demo.root)
    _, report = build_manifest(config, V2)
    assert f"{target}: has transparency, composited on white" in report.warnings

    kept, flattened = load_image(target, keep_alpha=True), load_rgb(target)
    assert kept.mode == "RGBA" and np.asarray(kept)[0, 0, 3] == 0 and np.asarray(kept)[0, 31, 3] == 255
    assert flattened.mode == "RGB" and np.asarray(flattened)[0, 0].tolist() == [255, 255, 255]
    opaque = load_image(demo.folder("train", "edited") / "0001.png", keep_alpha=True)
    assert opaque.mode == "RGBA" and np.asarray(opaque)[..., 3].min() == 255  # no alpha: opaque, as the pipeline's convert


def test_match_target_res_is_refused_for_edit_2_1_which_always_matches():
    from trainer.config.parsing import parse_train_config

    with pytest.raises(ConfigError) as info:
        parse_train_config({"model_flavour": "edit-2.1", "model_kwargs": {"match_target_res": True}})
    assert "edit-2.1 always gives its references the target's area" in str(info.value)
