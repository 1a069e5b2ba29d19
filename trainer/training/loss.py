"""The training step's arithmetic: the transformer called exactly as the pipeline's denoising step calls it."""

import torch
import torch.nn.functional as F

from trainer.data.caches import CachedSample
from trainer.model import conditioning_21
from trainer.model.conditioning import img_shapes, pack, unpack
from trainer.training.flow_matching import add_noise, velocity_target


def predict_velocity(transformer, sample: CachedSample, x_t: torch.Tensor, sigma: torch.Tensor, dtype) -> torch.Tensor:
    """The transformer's velocity for the target tokens (`pack`ed), called exactly as the pipeline's denoising step calls it."""
    if sample.image_pad_mask is not None:  # edit-2.1: Qwen-Image-2.1's own sequence layout
        return pack(conditioning_21.predict_velocity(transformer, sample, x_t, sigma, dtype))
    device = sigma.device
    noisy = pack(x_t)
    references = [pack(r[None].to(device, torch.float32)) for r in sample.references]
    # the pipeline drops an all-ones mask; asked of the cached (CPU) mask, so the host never waits for the card
    all_ones = bool(sample.prompt_embeds_mask.all())
    prediction = transformer(
        hidden_states=torch.cat([noisy, *references], dim=1).to(dtype),
        timestep=sigma.to(dtype),  # the pipeline passes t / 1000 = σ
        encoder_hidden_states=sample.prompt_embeds[None].to(device, dtype),
        encoder_hidden_states_mask=None if all_ones else sample.prompt_embeds_mask[None].to(device),
        img_shapes=img_shapes(x_t[0], [r[None] for r in sample.references]),
        return_dict=False,
    )[0]
    return prediction[:, : noisy.shape[1]]  # the target's tokens; references come after


def flow_matching_loss(
    transformer, sample: CachedSample, sigma: torch.Tensor, noise: torch.Tensor, dtype, x_t: torch.Tensor | None = None,
    masked: bool = True,
) -> torch.Tensor:
    """One sample's loss; `x_t` replaces the ground-truth noised latent (scheduled sampling).

    With a loss mask (`sample.loss_mask`, a mask dataset) and `masked`, each latent pixel's squared error is
    weighted by its mask value and the mean taken over all of them, as SimpleTuner does (not renormalised by
    the mask's area): a pixel under black contributes nothing, to the loss or to the gradient."""
    x0 = sample.target[None].to(sigma.device, torch.float32)
    x_t = add_noise(x0, noise, sigma) if x_t is None else x_t
    prediction = predict_velocity(transformer, sample, x_t, sigma, dtype)
    target = pack(velocity_target(x0, noise)).float()
    if masked and sample.loss_mask is not None:
        weights = pack(sample.loss_mask.to(sigma.device, torch.float32).expand_as(x0[0])[None])  # the tokens' layout
        return ((prediction.float() - target) ** 2 * weights).mean()
    return F.mse_loss(prediction.float(), target)


@torch.no_grad()
def rollout_input(
    transformer, sample: CachedSample, sigma: torch.Tensor, noise: torch.Tensor, offset: float, steps: int, dtype
) -> torch.Tensor:
    """Scheduled sampling: reach σ by the model's own Euler steps from a noisier σ + offset,
    so training sees the kind of input it will meet at inference (exposure bias)."""
    x0 = sample.target[None].to(sigma.device, torch.float32)
    start = torch.clamp(sigma + offset, max=1.0)
    x = add_noise(x0, noise, start)
    sigmas = torch.linspace(float(start), float(sigma), steps + 1, device=sigma.device)
    for current, following in zip(sigmas[:-1], sigmas[1:]):
        velocity = predict_velocity(transformer, sample, x, current.reshape(1), dtype).float()
        x = x + (following - current) * unpack(velocity, x.shape[-2], x.shape[-1])
    return x
