"""σ sampling: a logit-normal u, then the time shift σ = s·u / (1 + (s - 1)·u)."""

import math
from functools import cache

import pytest
import torch

from trainer.training.flow_matching import add_noise, sample_sigma, sigma_quantile, velocity_target

DRAWS = 10_000


@cache
def _draws(shift: float, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.cat([sample_sigma(shift, generator).reshape(1) for _ in range(DRAWS)])


def _logit_normal_quantile(q: float) -> float:
    """u = sigmoid(z), z ~ N(0, 1): u's q-quantile is sigmoid(Φ⁻¹(q))."""
    z = math.sqrt(2) * torch.erfinv(torch.tensor(2 * q - 1, dtype=torch.float64)).item()
    return 1 / (1 + math.exp(-z))


@pytest.mark.parametrize("shift", [1.0, 1.73, 3.0, 0.5])
def test_the_shift_maps_each_u_to_s_u_over_1_plus_s_minus_1_u(shift):
    """u is the generator's next standard normal through a sigmoid; σ is the shift formula of that u."""
    for seed in range(50):
        u = torch.sigmoid(torch.normal(0.0, 1.0, size=(1,), generator=torch.Generator().manual_seed(seed)))
        sigma = sample_sigma(shift, torch.Generator().manual_seed(seed))
        assert torch.allclose(sigma, shift * u / (1 + (shift - 1) * u), rtol=1e-6, atol=0), (seed, u, sigma)


@pytest.mark.parametrize("shift", [1.0, 1.73])
def test_sigma_follows_the_shifted_logit_normal_distribution(shift):
    """Empirical quantiles of σ against the analytic ones (the shift is monotone, so it maps quantiles).
    With the guide's 1.73 the median σ is 0.634: training leans to high noise, where the layout is decided."""
    sigmas = _draws(shift).double()
    assert 0 < float(sigmas.min()) and float(sigmas.max()) < 1
    for q in (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95):
        u = _logit_normal_quantile(q)
        expected = shift * u / (1 + (shift - 1) * u)
        assert float(torch.quantile(sigmas, q)) == pytest.approx(expected, abs=0.01), (q, expected)
        assert sigma_quantile(q, shift) == pytest.approx(expected, rel=1e-9)  # the held-out grid's σ


def test_noising_and_the_velocity_target():
    x0, noise = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    sigma = torch.tensor([0.0, 1.0])
    noisy = add_noise(x0, noise, sigma)
    assert torch.equal(noisy[0], x0[0]) and torch.equal(noisy[1], noise[1])
    assert torch.equal(velocity_target(x0, noise), noise - x0)
