"""The held-out loss: a fixed σ/noise grid, the base with the adapters off, the LoRA with them on."""

import pytest
import torch

from trainer.data.caches import CachedSample
from trainer.model.lora import add_lora
from trainer.training.flow_matching import sigma_quantile
from trainer.training.held_out import base_and_lora_loss, held_out_grid, held_out_loss, sigma_grid


def _sample(seed: int) -> CachedSample:
    """A sample shaped as the tiny model's caches are: 32-wide text tokens, a 16-channel 4x4 target, one reference."""
    g = torch.Generator().manual_seed(seed)
    return CachedSample(
        name=f"{seed:04d}", prompt_embeds=torch.randn(12, 32, generator=g), prompt_embeds_mask=torch.ones(12, dtype=torch.long),
        target=torch.randn(16, 4, 4, generator=g), references=[torch.randn(16, 4, 4, generator=g)],
    )


@pytest.fixture(scope="module")
def transformer(demo_root):
    from diffusers import QwenImageTransformer2DModel

    model = QwenImageTransformer2DModel.from_pretrained(demo_root / "demo" / "models" / "tiny-edit-v2", subfolder="transformer")
    add_lora(model, rank=4, alpha=4.0, seed=0)
    return model


def test_the_grid_is_fixed_and_weights_sigma_as_training_draws_it():
    samples = [_sample(0), _sample(1)]
    first, again = held_out_grid(samples, shift=1.73, seed=3), held_out_grid(samples, shift=1.73, seed=3)
    assert len(first) == 2 * 4
    for a, b in zip(first, again):
        assert torch.equal(a.sigma, b.sigma) and torch.equal(a.noise, b.noise)
    assert [float(p.sigma) for p in first[:4]] == pytest.approx([sigma_quantile(q, 1.73) for q in (0.125, 0.375, 0.625, 0.875)])
    assert sigma_grid(1.0, 3)[1] == pytest.approx(0.5)  # the middle point is the median, 0.5 without a shift
    noises = [p.noise for p in first]
    assert all(not torch.equal(noises[0], n) for n in noises[1:])  # each point its own noise
    assert not torch.equal(held_out_grid(samples, 1.73, seed=4)[0].noise, noises[0])


def test_the_base_is_the_lora_before_training_and_stays_the_base_after(transformer):
    grid = held_out_grid([_sample(0), _sample(1)], shift=1.73, seed=0)
    base, lora = base_and_lora_loss(transformer, transformer, grid, torch.device("cpu"), torch.float32)
    assert base == lora  # peft's B matrices start at zero: before training the LoRA is the base
    with torch.no_grad():
        originals = {n: p.clone() for n, p in transformer.named_parameters() if "lora_B" in n}
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    try:
        changed_base, changed_lora = base_and_lora_loss(transformer, transformer, grid, torch.device("cpu"), torch.float32)
        assert changed_base == base and changed_lora != base
        assert held_out_loss(transformer, grid, torch.device("cpu"), torch.float32) == changed_lora  # adapters back on
    finally:
        with torch.no_grad():
            for name, p in transformer.named_parameters():
                if name in originals:
                    p.copy_(originals[name])
