"""Flow matching as Qwen-Image trains it: x_t = (1 - σ) x0 + σ ε, and the model predicts ε - x0."""

import math

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling


def shift_sigma(u, shift: float):
    """The time shift σ = s·u / (1 + (s - 1)·u): monotone in u, σ = u at s = 1."""
    return shift * u / (1 + (shift - 1) * u)


def sample_sigma(shift: float, generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
    """One σ in (0, 1): logit-normal u, then the time shift.

    shift > 1 (the guide's 1.73) moves training towards high noise, where the edit's layout is decided.
    """
    u = compute_density_for_timestep_sampling("logit_normal", 1, logit_mean=0.0, logit_std=1.0, generator=generator)
    return shift_sigma(u, shift).to(device)


def sigma_quantile(q: float, shift: float) -> float:
    """The q-quantile of `sample_sigma`'s σ: u = sigmoid(Φ⁻¹(q)), shifted (the shift keeps the order)."""
    z = math.sqrt(2) * float(torch.erfinv(torch.tensor(2 * q - 1, dtype=torch.float64)))
    return shift_sigma(1 / (1 + math.exp(-z)), shift)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    sigma = sigma.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - sigma) * x0 + sigma * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0
