"""edit-2.1's caches: the text cache keeps `image_pad_mask`, the VAE cache RGBA latents (64 channels,
16x), both keyed by the flavour and (for the text too) the target's size, which sets the references'."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.data.caches import build_text_cache, build_vae_cache, iter_samples, sample_paths, text_fingerprint
from trainer.data.images import on_white
from trainer.demo.dataset import generate_demo_dataset
from trainer.workflow import check_data, load_project


def project(root, models, resolution: int = 32):
    data = generate_demo_dataset(root / "data", n_train=2, n_eval=0, size=32)
    refs = ["ref1", "ref2"]
    entries = [{"id": "edits", "instance_data_dir": str(data.folder("train", "edited")), "resolution": resolution,
                "conditioning_data": refs}]
    entries += [{"id": ref, "dataset_type": "conditioning", "instance_data_dir": str(data.folder("train", folder))}
                for ref, folder in zip(refs, ("reference", "reference_2"))]
    config = {"model_flavour": "edit-2.1", "pretrained_model_name_or_path": str(models / "tiny-edit-2.1"),
              "output_dir": str(root / "out"), "mixed_precision": "no", "report_to": "none", "caption_dropout_probability": 0.5}
    (root / "config.json").write_text(json.dumps(config))
    (root / "data.json").write_text(json.dumps(entries))
    return load_project(root / "config.json", root / "data.json", root), data


@pytest.mark.slow  # about 23 s on two shared cores: three encoder loads
def test_the_caches_hold_what_edit_2_1_trains_on(demo_root, tmp_path):
    loaded, data = project(tmp_path, demo_root / "demo" / "models")
    target = data.folder("train", "edited") / "0000.png"
    with Image.open(target) as image:
        pixels = np.asarray(image.convert("RGBA")).copy()
    pixels[:, :16, 3] = 0
    Image.fromarray(pixels, "RGBA").save(target)  # a transparent target: its alpha reaches the VAE
    manifest, _ = check_data(loaded)
    cpu = torch.device("cpu")
    assert build_text_cache(manifest, loaded.dataset_config, loaded.config, cpu).encoded == 2
    assert build_vae_cache(manifest, loaded.dataset_config, loaded.config, cpu).encoded == 2
    samples = {s.name: s for s in iter_samples(manifest, loaded.dataset_config, loaded.config)}
    sample = samples["0000"]
    assert sample.target.shape == (64, 2, 2) and [r.shape for r in sample.references] == [(64, 2, 2)] * 2
    assert sample.image_pad_mask.dtype == torch.bool and int(sample.image_pad_mask.sum()) == 2  # a 32 px slot each
    dropped = sample.with_caption_dropped()  # the empty instruction keeps its own image slots
    assert int(dropped.image_pad_mask.sum()) == 2 and dropped.prompt_embeds.shape[0] < sample.prompt_embeds.shape[0]
    assert dropped.image_pad_mask.shape == dropped.prompt_embeds.shape[:1]
    paths = sample_paths(loaded.dataset_config, loaded.config, manifest.iloc[0])
    assert "text_embeds" in str(paths.text)

    # the transparent target's latents are not those of its on-white copy
    on_white(Image.open(target)).save(target)
    assert build_vae_cache(manifest, loaded.dataset_config, loaded.config, cpu).encoded == 1
    again = {s.name: s for s in iter_samples(manifest, loaded.dataset_config, loaded.config)}
    assert not torch.allclose(again["0000"].target, sample.target)

    # a larger bucket gives the references a larger area: the prompt embedding (image slots) changes
    bigger, _ = project(tmp_path / "bigger", demo_root / "demo" / "models", resolution=64)
    row = check_data(bigger)[0].iloc[0]
    assert text_fingerprint(bigger.config, bigger.dataset_config, row) != text_fingerprint(loaded.config, loaded.dataset_config, manifest.iloc[0])
