"""The demo's pretraining script (`trainer/demo/pretrain.py`) and the edit family it learns (`trainer/demo/edits.py`)."""

import numpy as np
import pytest
import torch

from trainer.demo import pretrain
from trainer.demo.edits import EDIT_KINDS, edit_pairs, random_images


def test_single_frame_convolutions_give_the_same_reconstruction_and_gradients():
    """The VAE-fitting speed-up (causal 3-D convolutions of one frame run as 2-D ones) changes no number."""
    torch.manual_seed(0)
    vae = pretrain.build_vae(pretrain.Budget())
    x = pretrain.to_tensor(random_images(np.random.default_rng(0), 2, 32))

    def forward_backward():
        vae.zero_grad()
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample
        (recon**2).mean().backward()
        return recon.detach(), [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in vae.parameters()]

    recon, grads = forward_backward()
    with pretrain.single_frame_convolutions(vae):
        fast_recon, fast_grads = forward_backward()
    assert torch.allclose(recon, fast_recon, atol=1e-5)
    for slow, fast in zip(grads, fast_grads):
        assert torch.allclose(slow, fast, atol=1e-6, rtol=1e-4)
    assert all("forward" not in vars(m) for m in vae.modules())  # the speed-up is gone after the block


def test_the_edit_family_holds_out_shape_recolouring():
    pairs = edit_pairs(seed=0, n=40, size=64)
    assert {p.kind for p in pairs} == set(EDIT_KINDS)
    assert "recolour" not in EDIT_KINDS
    for pair in pairs:
        scene, swatch, mask = (np.asarray(r) for r in pair.references)
        target, inside = np.asarray(pair.target), mask[..., 0] > 0
        shape_colour = scene[inside][0]
        assert (swatch == swatch[0, 0]).all()  # the demo dataset's reference layout: scene, swatch, silhouette
        assert not (target == scene).all(), pair.caption  # every pair edits something
        has_shape = (target == shape_colour).all(axis=2).any()
        if pair.kind == "remove":
            assert not has_shape
        elif pair.kind == "background":
            assert (target[inside] == scene[inside]).all() and (target[~inside] == swatch[0, 0]).all()
        elif pair.kind == "add":  # onto an empty scene, in the swatch's colour, where the silhouette says
            assert (scene == scene[0, 0]).all()
            assert (target[inside] == swatch[0, 0]).all() and (target[~inside] == scene[~inside]).all()
        else:  # moved or resized: the shape keeps its colour
            assert has_shape and (target[inside] != scene[inside]).any() or pair.kind == "resize"


def test_edit_pairs_are_deterministic():
    a, b = edit_pairs(3, 8, 64), edit_pairs(3, 8, 64)
    assert [p.caption for p in a] == [p.caption for p in b]
    assert all((np.asarray(x.target) == np.asarray(y.target)).all() for x, y in zip(a, b))


def test_a_misspelt_edit_kind_is_refused_before_any_fitting():
    with pytest.raises(ValueError, match=r"unknown edit kind 'remvoe' in kinds='move,remvoe'; valid: move, remove, resize, background, add"):
        pretrain.budget_with(["kinds=move,remvoe"])
