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


# -- the timestep options (SimpleTuner's keys): each distribution's quantiles against the analytic ones --------------

from scipy.stats import beta as beta_distribution  # noqa: E402

from trainer.config.parsing import parse_train_config  # noqa: E402
from trainer.errors import ConfigError  # noqa: E402
from trainer.training.flow_matching import DynamicShift, SigmaSchedule, image_seq_len, shift_sigma  # noqa: E402

QUANTILES = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)
# Qwen-Image's scheduler_config.json (the tiny model's copy of it)
QWEN_SCHEDULER = {"base_image_seq_len": 256, "max_image_seq_len": 8192, "base_shift": 0.5, "max_shift": 0.9,
                  "use_dynamic_shifting": True, "time_shift_type": "exponential", "shift": 1.0, "shift_terminal": 0.02}


def _schedule_draws(schedule: SigmaSchedule, tokens: int | None = None, seed: int = 0) -> torch.Tensor:
    return schedule.sample(torch.Generator().manual_seed(seed), tokens, n=DRAWS).double()


def _assert_quantiles(draws: torch.Tensor, expected) -> None:
    assert 0 < float(draws.min()) and float(draws.max()) < 1
    for q in QUANTILES:
        assert float(torch.quantile(draws, q)) == pytest.approx(expected(q), abs=0.012), q


@pytest.mark.parametrize("scale, shift", [(0.5, 1.0), (2.0, 1.73)])
def test_sigmoid_schedule_is_a_logit_normal_of_std_flow_sigmoid_scale(scale, shift):
    schedule = SigmaSchedule.from_config(parse_train_config({"flow_sigmoid_scale": scale, "flow_schedule_shift": shift}))
    assert schedule.distribution == "sigmoid"
    z = {q: math.sqrt(2) * torch.erfinv(torch.tensor(2 * q - 1, dtype=torch.float64)).item() for q in QUANTILES}
    analytic = lambda q: shift_sigma(1 / (1 + math.exp(-scale * z[q])), shift)  # noqa: E731
    _assert_quantiles(_schedule_draws(schedule), analytic)
    assert all(schedule.quantile(q) == pytest.approx(analytic(q), rel=1e-9) for q in QUANTILES)


@pytest.mark.parametrize("shift", [0.0, 3.0])
def test_uniform_schedule_draws_u_uniformly_then_shifts_it(shift):
    schedule = SigmaSchedule.from_config(parse_train_config({"flow_use_uniform_schedule": True, "flow_schedule_shift": shift}))
    analytic = lambda q: shift_sigma(q, shift or 1.0)  # noqa: E731  (0: no shift, as in SimpleTuner)
    _assert_quantiles(_schedule_draws(schedule), analytic)
    assert schedule.quantile(0.5) == pytest.approx(analytic(0.5))


@pytest.mark.parametrize("a, b", [(2.0, 2.0), (0.8, 3.0)])
def test_beta_schedule_draws_u_from_beta_a_b(a, b):
    schedule = SigmaSchedule.from_config(parse_train_config(
        {"flow_use_beta_schedule": True, "flow_beta_schedule_alpha": a, "flow_beta_schedule_beta": b, "flow_schedule_shift": 1.73}
    ))
    analytic = lambda q: shift_sigma(float(beta_distribution.ppf(q, a, b)), 1.73)  # noqa: E731
    _assert_quantiles(_schedule_draws(schedule), analytic)


def test_uniform_and_beta_together_are_refused_naming_both():
    with pytest.raises(ConfigError, match="flow_use_uniform_schedule and flow_use_beta_schedule"):
        parse_train_config({"flow_use_uniform_schedule": True, "flow_use_beta_schedule": True})


def test_the_default_schedule_draws_exactly_what_sample_sigma_always_drew():
    """Runs resumed across this change see the same σ: the default is still diffusers' logit-normal draw."""
    schedule = SigmaSchedule.from_config(parse_train_config({}))
    for seed in range(20):
        assert torch.equal(schedule.sample(torch.Generator().manual_seed(seed)), sample_sigma(1.73, torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("side", [256, 512, 1024, 1536])
def test_auto_shift_is_the_pipelines_dynamic_shift_for_the_buckets_token_count(side):
    """flow_schedule_auto_shift: mu from the bucket's tokens as QwenImageEditPlusPipeline computes it, applied
    as the scheduler applies it (its own time_shift), and σ's quantiles follow that shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_shift

    latent = torch.zeros(16, side // 8, side // 8)
    tokens = image_seq_len(parse_train_config({}).flavour, latent)
    assert tokens == (side // 16) ** 2  # the pipeline's latents.shape[1]: 2x2-packed tokens
    config = parse_train_config({"flow_schedule_auto_shift": True})
    schedule = SigmaSchedule.from_config(config, QWEN_SCHEDULER)
    scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER)
    mu = calculate_shift(tokens, 256, 8192, 0.5, 0.9)
    u = torch.linspace(0.02, 0.98, 25, dtype=torch.float64)
    torch.testing.assert_close(shift_sigma(u, schedule.shift_for(tokens)), scheduler.time_shift(mu, 1.0, u), rtol=1e-12, atol=0)
    analytic = lambda q: float(scheduler.time_shift(mu, 1.0, torch.tensor(SigmaSchedule(shift=1.0).quantile(q))))  # noqa: E731
    _assert_quantiles(_schedule_draws(schedule, tokens), analytic)


def test_auto_shift_moves_sigma_up_as_the_bucket_grows_and_ignores_the_fixed_shift():
    schedule = SigmaSchedule.from_config(parse_train_config({"flow_schedule_auto_shift": True, "flow_schedule_shift": 3.0}), QWEN_SCHEDULER)
    medians = [schedule.quantile(0.5, (side // 16) ** 2) for side in (256, 512, 1024, 2048)]
    assert medians == sorted(medians) and len(set(medians)) == 4
    assert schedule.shift_for(16 * 16) == pytest.approx(math.exp(0.5))  # base_image_seq_len: exp(base_shift)
    assert medians[0] == pytest.approx(shift_sigma(0.5, math.exp(0.5)))
    assert medians[0] < shift_sigma(0.5, 3.0)  # not the fixed 3.0
    with pytest.raises(ValueError, match="token count"):
        schedule.sample(torch.Generator())


def test_auto_shift_without_dynamic_shifting_uses_the_schedulers_fixed_shift():
    """A scheduler config without use_dynamic_shifting samples at its `shift` whatever the size; so does training."""
    fixed = DynamicShift.from_scheduler_config({"use_dynamic_shifting": False, "shift": 3.0})
    assert fixed.shift_for(256) == fixed.shift_for(65536) == 3.0
    linear = DynamicShift.from_scheduler_config({**QWEN_SCHEDULER, "time_shift_type": "linear"})
    assert linear.shift_for(4096) == pytest.approx(0.5 + (0.9 - 0.5) * (4096 - 256) / (8192 - 256))  # mu itself
