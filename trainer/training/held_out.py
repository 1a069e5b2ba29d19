"""The held-out loss: the flow-matching loss on one fixed grid of σ and noise, apart from training's draws.

Training's loss history mixes what the LoRA learnt with the σ each step happens to draw (σ draws
alone moved the demo's last-tenth / first-tenth ratio to 0.968). Evaluating the base (the adapters
switched off, which is also the LoRA before training: its B matrices start at zero) and the
trained LoRA on the same samples, σ grid and seeded noise leaves only what training changed.
The samples are training samples: the question is whether the LoRA learnt them, not whether it
generalises (the validation report answers that on the eval split).
"""

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from trainer.data.caches import CachedSample
from trainer.training.flow_matching import SigmaSchedule
from trainer.training.loss import flow_matching_loss

HELD_OUT_SAMPLES = 8  # the first training samples by name: a bounded cost on the 20B model (2 x 8 x 4 forwards)
HELD_OUT_SIGMAS = 4  # σ at the midpoints of the training distribution's quartiles


@dataclass(frozen=True)
class HeldOutPoint:
    sample: CachedSample
    sigma: torch.Tensor  # [1]
    noise: torch.Tensor  # [1, 16, h, w]


def sigma_grid(shift: SigmaSchedule | float, n: int = HELD_OUT_SIGMAS, image_seq_len: int | None = None) -> list[float]:
    """n σ weighted as training draws them: the quantiles at (i + 0.5) / n of the schedule (a number: the
    default schedule at that fixed shift). With a resolution-dependent shift the grid is the sample's own:
    `image_seq_len` is its token count."""
    schedule = shift if isinstance(shift, SigmaSchedule) else SigmaSchedule(shift=shift)
    return [schedule.quantile((i + 0.5) / n, image_seq_len) for i in range(n)]


def held_out_grid(
    samples: list[CachedSample], shift: SigmaSchedule | float, seed: int, n_sigmas: int = HELD_OUT_SIGMAS,
    seq_len_of=lambda sample: None,
) -> list[HeldOutPoint]:
    """Every sample at every σ of the grid, each with its own noise from one seeded stream.
    `seq_len_of(sample)`: its image token count, for a resolution-dependent shift."""
    generator = torch.Generator().manual_seed(seed)
    return [
        HeldOutPoint(sample, torch.tensor([sigma]), torch.randn((1, *sample.target.shape), generator=generator))
        for sample in samples
        for sigma in sigma_grid(shift, n_sigmas, seq_len_of(sample))
    ]


@torch.no_grad()
def held_out_loss(transformer, grid: list[HeldOutPoint], device: torch.device, dtype: torch.dtype) -> float:
    """The mean flow-matching loss over the grid (the transformer as training calls it)."""
    losses = [
        flow_matching_loss(transformer, point.sample, point.sigma.to(device), point.noise.to(device), dtype)
        for point in grid
    ]
    return float(torch.stack(losses).mean())


@contextmanager
def adapters_disabled(model):
    """The base model: peft's LoRA layers pass their input through unchanged until the block ends."""
    model.disable_adapters()
    try:
        yield
    finally:
        model.enable_adapters()


def base_and_lora_loss(transformer, model, grid: list[HeldOutPoint], device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """(base, LoRA) held-out losses. `transformer` is what training calls (wrapped, possibly sharded),
    `model` the diffusers model inside it, whose adapters are switched off for the base."""
    was_training = transformer.training
    transformer.eval()
    try:
        with adapters_disabled(model):
            base = held_out_loss(transformer, grid, device, dtype)
        lora = held_out_loss(transformer, grid, device, dtype)
    finally:
        transformer.train(was_training)
    return base, lora
