"""Masked loss: SimpleTuner's `conditioning_type: "mask"` datasets. The manifest names a missing or misshapen mask
before anything is encoded; the mask is cached at latent resolution beside the VAE latents; black pixels contribute
nothing to the loss or to the gradient; masked_loss_probability decides per sample whether the mask applies."""

import json

import pytest
import torch
from PIL import Image

from tests.conftest import write_small_project
from trainer.data.caches import CachedSample, load_sample, verify_cache
from trainer.data.masks import latent_mask, mask_path
from trainer.data.pairing import MASK_COLUMN, PairingError
from trainer.errors import ConfigError
from trainer.model.lora import add_lora
from trainer.training.loss import flow_matching_loss
from trainer.workflow import check_data, load_project

SIZE = 32  # the small project's targets: 32 px, latents 4 x 4


def _write_masks(root, names, size=(SIZE, SIZE), left_black=True):
    """Masks whose left half (a whole latent column pair at 32 px) is black, the rest white."""
    folder = root / "data" / "train" / "mask"
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        image = Image.new("L", size, 255)
        if left_black:
            image.paste(0, (0, 0, size[0] // 2, size[1]))
        image.save(folder / f"{name}.png")
    return folder


def _project_with_masks(root, demo_root, names=("0000", "0001", "0002", "0003"), **config):
    config_path, data_path = write_small_project(root, demo_root / "demo" / "models", **config)
    entries = json.loads(data_path.read_text())
    folder = _write_masks(root, names)
    entries[0]["conditioning_data"].append("edits-mask")
    entries.append({"id": "edits-mask", "dataset_type": "conditioning", "conditioning_type": "mask", "instance_data_dir": str(folder)})
    data_path.write_text(json.dumps(entries))
    return config_path, data_path


# -- the manifest ------------------------------------------------------------------------------------------------


def test_the_manifest_pairs_each_target_with_its_mask_and_a_mask_is_no_reference(demo_root, tmp_path):
    project = load_project(*_project_with_masks(tmp_path, demo_root), tmp_path)
    manifest, _ = check_data(project)
    train = manifest[manifest["split"] == "train"]
    assert [p.rsplit("/", 1)[1] for p in train[MASK_COLUMN]] == ["0000.png", "0001.png", "0002.png", "0003.png"]
    assert manifest[manifest["split"] == "eval"][MASK_COLUMN].isna().all()  # the eval dataset has none
    assert set(train["n_references"]) == {3}  # the mask dataset is not counted as a reference


def test_a_missing_mask_is_named_by_the_manifest_before_any_encoding(demo_root, tmp_path, capsys, monkeypatch):
    """`qwen-edit cache` (its main, in this process): the check fails, naming the file, and nothing is encoded."""
    from trainer.cli import main

    config_path, data_path = _project_with_masks(tmp_path, demo_root, names=("0000", "0001", "0003"))
    monkeypatch.chdir(tmp_path)
    assert main(["cache", "--config", str(config_path), "--data", str(data_path)]) == 2
    stderr = capsys.readouterr().err
    missing = tmp_path / "data" / "train" / "mask" / "0002.png"
    assert f"{missing}: missing file (mask for {tmp_path / 'data' / 'train' / 'edited' / '0002.png'})" in stderr
    assert "nothing was encoded or trained" in stderr
    assert not (tmp_path / "cache").exists()


def test_a_mask_of_another_size_than_its_target_is_an_error_naming_both(demo_root, tmp_path):
    project = load_project(*_project_with_masks(tmp_path, demo_root), tmp_path)
    _write_masks(tmp_path, ["0001"], size=(SIZE, SIZE - 8))
    with pytest.raises(PairingError) as refused:
        check_data(project)
    (problem,) = refused.value.report.errors
    assert problem.startswith(f"{tmp_path / 'data' / 'train' / 'mask' / '0001.png'}: 32x24, but its target")
    assert "a mask must be its target's size" in problem


def test_one_mask_dataset_per_target(demo_root, tmp_path):
    config_path, data_path = _project_with_masks(tmp_path, demo_root)
    entries = json.loads(data_path.read_text())
    entries[0]["conditioning_data"].append("more-masks")
    entries.append({"id": "more-masks", "dataset_type": "conditioning", "conditioning_type": "mask", "instance_data_dir": "x"})
    data_path.write_text(json.dumps(entries))
    with pytest.raises(ConfigError, match="links 2 mask datasets .* keep one"):
        load_project(config_path, data_path, tmp_path)


# -- the mask at latent resolution ----------------------------------------------------------------------------------


def test_a_mask_becomes_its_red_channels_share_of_white_per_latent_pixel():
    image = Image.new("RGB", (64, 48), (255, 0, 0))  # red is the channel SimpleTuner reads: white in it
    image.paste((0, 255, 255), (0, 0, 16, 48))  # left 16 px: no red (cyan), so black
    image.paste((128, 128, 128), (16, 0, 24, 48))  # one latent column of grey
    weights = latent_mask(image, (64, 48), scale=8)
    assert weights.shape == (6, 8)
    torch.testing.assert_close(weights[:, :2], torch.zeros(6, 2))
    torch.testing.assert_close(weights[:, 2], torch.full((6,), 128 / 255))
    torch.testing.assert_close(weights[:, 3:], torch.ones(6, 5))
    # a mask of another aspect ratio than the bucket is cropped as its target is (centre crop), then averaged
    assert latent_mask(Image.new("L", (80, 48), 255).convert("RGB"), (64, 48), scale=8).shape == (6, 8)


def _sample(mask=None) -> CachedSample:
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(16, 4, 4, generator=generator)
    return CachedSample("s", torch.randn(6, 32, generator=generator), torch.ones(6, dtype=torch.long), target,
                        [torch.randn(16, 4, 4, generator=generator)], loss_mask=mask)


def _loss_and_gradients(model, sample, x_t, noise, masked=True):
    model.zero_grad(set_to_none=True)
    loss = flow_matching_loss(model, sample, torch.tensor([0.6]), noise, torch.float32, x_t=x_t, masked=masked)
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in model.parameters() if p.requires_grad and p.grad is not None]


def test_masked_out_pixels_contribute_nothing_to_the_loss_or_the_gradient():
    """The same model input (x_t), the target changed only under the mask's black half: the loss and every LoRA
    gradient stay exactly the same. Changed under the white half, or without the mask, they do not."""
    from trainer.demo.tiny_model import _transformer

    model = _transformer(zero_cond_t=False)
    add_lora(model, 4, 4.0, seed=0)
    generator = torch.Generator().manual_seed(1)
    for p in model.parameters():  # a LoRA after some training: B not zero, so every LoRA weight has a gradient
        if p.requires_grad:
            p.data.normal_(0, 0.1, generator=generator)
    mask = torch.ones(4, 4)
    mask[:, :2] = 0  # the left half of the latent
    sample = _sample(mask)
    noise = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(2))
    x_t = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(3))

    def changed(columns):
        target = sample.target.clone()
        target[:, :, columns] += 3.0
        return CachedSample(**{**sample.__dict__, "target": target})

    loss, grads = _loss_and_gradients(model, sample, x_t, noise)
    assert sum(bool(g.abs().sum() > 0) for g in grads) > len(grads) // 2  # (the last block's text stream gets none)
    black_loss, black_grads = _loss_and_gradients(model, changed(slice(0, 2)), x_t, noise)
    assert black_loss == loss and all(torch.equal(a, b) for a, b in zip(grads, black_grads))
    white_loss, white_grads = _loss_and_gradients(model, changed(slice(2, 4)), x_t, noise)
    assert white_loss != loss and any(not torch.equal(a, b) for a, b in zip(grads, white_grads))
    unmasked, _ = _loss_and_gradients(model, sample, x_t, noise, masked=False)
    changed_unmasked, _ = _loss_and_gradients(model, changed(slice(0, 2)), x_t, noise, masked=False)
    assert changed_unmasked != unmasked  # without the mask the black half counts
    # the mean runs over every pixel, as SimpleTuner's (mask weighting, no renormalisation by the mask's area)
    all_white, _ = _loss_and_gradients(model, _sample(torch.ones(4, 4)), x_t, noise)
    assert all_white == pytest.approx(unmasked, rel=1e-6)


# -- through the cache and the training step -------------------------------------------------------------------------


@pytest.mark.slow
def test_masks_are_cached_beside_the_vae_latents_and_train_with_their_probability(demo_root, tmp_path):
    from trainer.data.caches import build_text_cache, build_vae_cache, sample_paths
    from trainer.tracking.reporting import SilentReporter
    from trainer.training.recipe import LoraTrainingRecipe

    project = load_project(*_project_with_masks(tmp_path, demo_root, max_train_steps=4, masked_loss_probability=0.5), tmp_path)
    manifest, _ = check_data(project)
    build_text_cache(manifest, project.dataset_config, project.config)
    build_vae_cache(manifest, project.dataset_config, project.config)
    train = manifest[manifest["split"] == "train"]
    row = train.iloc[0].to_dict()
    path = mask_path(project.dataset_config, project.config, row)
    assert path == project.dataset_config.resolve(str(tmp_path / "cache" / "vae" / "edits")) / "masks" / "0000.safetensors"
    sample = load_sample(sample_paths(project.dataset_config, project.config, row), row["name"])
    assert sample.loss_mask.shape == sample.target.shape[1:] == (4, 4)
    assert torch.equal(sample.loss_mask, torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 4))
    assert verify_cache(train, project.dataset_config, project.config, "vae") == []
    _write_masks(tmp_path, ["0001"], left_black=False)  # a mask changed after caching: training refuses the stale one
    assert [p.split(":")[0] for p in verify_cache(train, project.dataset_config, project.config, "vae")] == [
        str(mask_path(project.dataset_config, project.config, train.iloc[1].to_dict()))
    ]
    build_vae_cache(manifest, project.dataset_config, project.config)

    recipe = LoraTrainingRecipe(project.config, project.dataset_config, project.manifest_path, project.root, tags={})
    recipe.setup()
    decisions = []
    decide = recipe._masked_this_step
    recipe._masked_this_step = lambda sample, generator: decisions.append(decide(sample, generator)) or decisions[-1]
    recipe.train(SilentReporter())
    assert len(decisions) == 4 and len(set(decisions)) == 2  # masked_loss_probability 0.5: some masked, some not
