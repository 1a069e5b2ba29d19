"""Flow matching as Qwen-Image trains it: x_t = (1 - σ) x0 + σ ε, and the model predicts ε - x0.

σ is drawn as SimpleTuner draws it: u from a base distribution on (0, 1) (`sigmoid`, its default and the
logit-normal of SD3; `uniform`; `beta`), then the time shift σ = s·u / (1 + (s - 1)·u). The shift is fixed
(`flow_schedule_shift`) or follows the sample's size as the pipeline's dynamic shift does
(`flow_schedule_auto_shift`: s = exp(mu), mu from the image token count and the scheduler config).
"""

import math
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling

Distribution = Literal["sigmoid", "uniform", "beta"]


def shift_sigma(u, shift: float):
    """The time shift σ = s·u / (1 + (s - 1)·u): monotone in u, σ = u at s = 1."""
    return shift * u / (1 + (shift - 1) * u)


@dataclass(frozen=True)
class DynamicShift:
    """The pipeline's resolution-dependent shift, from its scheduler config (`scheduler_config.json`).

    The Qwen-Image pipelines compute mu = calculate_shift(image tokens, base/max seq len, base/max shift) and
    the scheduler shifts its σ grid by exp(mu) (`time_shift_type` exponential) or mu (linear); a scheduler
    without `use_dynamic_shifting` uses its fixed `shift` whatever the size. The terminal stretch
    (`shift_terminal`) rescales the inference grid so its last step lands there: it has no meaning for
    one σ drawn at a time, so training leaves it out.
    """

    base_seq_len: int = 256
    max_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15
    time_shift_type: str = "exponential"
    use_dynamic_shifting: bool = True
    shift: float = 1.0

    @classmethod
    def from_scheduler_config(cls, config: dict) -> "DynamicShift":
        # the pipelines read these with the same defaults (`self.scheduler.config.get(..., 256)`)
        return cls(
            base_seq_len=config.get("base_image_seq_len", 256),
            max_seq_len=config.get("max_image_seq_len", 4096),
            base_shift=config.get("base_shift", 0.5),
            max_shift=config.get("max_shift", 1.15),
            time_shift_type=config.get("time_shift_type", "exponential"),
            use_dynamic_shifting=bool(config.get("use_dynamic_shifting", False)),
            shift=float(config.get("shift", 1.0)),
        )

    def mu(self, image_seq_len: int) -> float:
        """The pipelines' `calculate_shift` for `image_seq_len` image tokens (what they hand the scheduler)."""
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_shift

        return calculate_shift(image_seq_len, self.base_seq_len, self.max_seq_len, self.base_shift, self.max_shift)

    def shift_for(self, image_seq_len: int) -> float:
        if not self.use_dynamic_shifting:
            return self.shift
        mu = self.mu(image_seq_len)
        return math.exp(mu) if self.time_shift_type == "exponential" else mu


@dataclass(frozen=True)
class SigmaSchedule:
    """How training draws each σ. The defaults are the guide's: logit-normal u, fixed shift 1.73."""

    distribution: Distribution = "sigmoid"
    sigmoid_scale: float = 1.0  # u = sigmoid(scale · z), z ~ N(0, 1): the logit-normal's std
    beta: tuple[float, float] = (2.0, 2.0)
    shift: float = 1.73  # fixed shift; 0 (SimpleTuner's "none") or 1 leave u unshifted
    dynamic: DynamicShift | None = None  # set: the shift follows the image token count instead

    @classmethod
    def from_config(cls, config, scheduler_config: dict | None = None) -> "SigmaSchedule":
        """`scheduler_config` (the pipeline's scheduler config) is needed with flow_schedule_auto_shift only."""
        distribution = (
            "uniform" if config.flow_use_uniform_schedule else "beta" if config.flow_use_beta_schedule else "sigmoid"
        )
        dynamic = None
        if config.flow_schedule_auto_shift:
            if scheduler_config is None:
                raise ValueError("flow_schedule_auto_shift needs the pipeline's scheduler config")
            dynamic = DynamicShift.from_scheduler_config(scheduler_config)
        return cls(
            distribution, config.flow_sigmoid_scale, (config.flow_beta_schedule_alpha, config.flow_beta_schedule_beta),
            config.flow_schedule_shift, dynamic,
        )

    def shift_for(self, image_seq_len: int | None) -> float:
        if self.dynamic is not None:
            if image_seq_len is None:
                raise ValueError("a resolution-dependent shift needs the sample's image token count")
            return self.dynamic.shift_for(image_seq_len)
        return self.shift if self.shift > 0 else 1.0

    def sample(self, generator: torch.Generator, image_seq_len: int | None = None, n: int = 1) -> torch.Tensor:
        """n σ in (0, 1), shape [n], from the generator's next draws (training draws one per micro-step)."""
        if self.distribution == "sigmoid":
            # diffusers' logit-normal: the generator's next standard normal, times the scale, through a sigmoid
            u = compute_density_for_timestep_sampling(
                "logit_normal", n, logit_mean=0.0, logit_std=self.sigmoid_scale, generator=generator
            )
        elif self.distribution == "uniform":
            u = torch.rand(n, generator=generator)
        else:  # inverse-CDF: one uniform draw per σ, so the generator alone fixes it (resumes see the same σ)
            from scipy.stats import beta

            q = torch.rand(n, generator=generator, dtype=torch.float64)
            u = torch.from_numpy(beta.ppf(q.numpy(), *self.beta)).float()
        return shift_sigma(u, self.shift_for(image_seq_len))

    def base_quantile(self, q: float) -> float:
        """The q-quantile of u, before the shift."""
        if self.distribution == "sigmoid":
            z = math.sqrt(2) * float(torch.erfinv(torch.tensor(2 * q - 1, dtype=torch.float64)))
            return 1 / (1 + math.exp(-self.sigmoid_scale * z))
        if self.distribution == "uniform":
            return q
        from scipy.stats import beta

        return float(beta.ppf(q, *self.beta))

    def quantile(self, q: float, image_seq_len: int | None = None) -> float:
        """The q-quantile of σ (the shift is monotone, so it maps u's quantiles to σ's)."""
        return shift_sigma(self.base_quantile(q), self.shift_for(image_seq_len))


def image_seq_len(flavour, latent: torch.Tensor) -> int:
    """The pipeline's `latents.shape[1]` for a target latent [C, h, w]: 2x2-packed tokens for the edit models,
    one token per latent pixel for Qwen-Image-2.1 (its 16x VAE's latents are not patched)."""
    height, width = latent.shape[-2:]
    return height * width if flavour.is_21 else (height // 2) * (width // 2)


def training_sigma_schedule(config) -> SigmaSchedule:
    """The schedule a TrainConfig asks for; with flow_schedule_auto_shift it reads the model's scheduler config
    (`<model>/scheduler/scheduler_config.json`, the one the pipeline samples with)."""
    scheduler_config = None
    if config.flow_schedule_auto_shift:
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler_config = dict(FlowMatchEulerDiscreteScheduler.load_config(config.model_path, subfolder="scheduler"))
    return SigmaSchedule.from_config(config, scheduler_config)


def sample_sigma(shift: float, generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
    """One σ in (0, 1): logit-normal u, then the time shift (the default schedule at `shift`).

    shift > 1 (the guide's 1.73) moves training towards high noise, where the edit's layout is decided.
    """
    return SigmaSchedule(shift=shift).sample(generator).to(device)


def sigma_quantile(q: float, shift: float) -> float:
    """The q-quantile of `sample_sigma`'s σ: u = sigmoid(Φ⁻¹(q)), shifted (the shift keeps the order)."""
    return SigmaSchedule(shift=shift).quantile(q)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    sigma = sigma.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - sigma) * x0 + sigma * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0
