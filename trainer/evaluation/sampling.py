"""Generating an edit from already-encoded conditioning: the pipelines' denoising loop, step for step.

Why not call the pipeline? Its `__call__` re-encodes the references from PIL images at fixed
sizes every time; validation here reuses the cached conditioning and honours
`match_target_res`, which the pipeline cannot express. The loop below uses the pipeline
module's own `calculate_shift`/`retrieve_timesteps` and the pipeline's scheduler and
transformer, and `tests/trainer/test_parity.py` checks its output equals `pipeline(...)`.
"""

from dataclasses import dataclass

import numpy as np
import torch
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_shift, retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor

from trainer.model.conditioning import img_shapes, pack


@dataclass
class EditConditioning:
    """Everything the transformer is conditioned on for one pair (batch of one)."""

    prompt_embeds: torch.Tensor  # [1, T, D]
    prompt_embeds_mask: torch.Tensor | None  # [1, T]; None when all ones, as the pipeline passes it
    negative_prompt_embeds: torch.Tensor | None
    negative_prompt_embeds_mask: torch.Tensor | None
    references: list[torch.Tensor]  # normalised latents, each [16, h, w]


def _mask_or_none(mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if mask is None or bool(mask.all()) else mask


@torch.no_grad()
def generate_latents(
    transformer,
    scheduler,
    cond: EditConditioning,
    width: int,
    height: int,
    num_inference_steps: int,
    true_cfg_scale: float,
    generator: torch.Generator,
    vae_scale_factor: int = 8,
) -> torch.Tensor:
    """Packed output latents [1, N, 64], as `pipeline(..., output_type="latent").images`."""
    device, dtype = cond.prompt_embeds.device, cond.prompt_embeds.dtype
    latent_h, latent_w = 2 * (height // (vae_scale_factor * 2)), 2 * (width // (vae_scale_factor * 2))
    channels = transformer.config.in_channels // 4
    noise = randn_tensor((1, 1, channels, latent_h, latent_w), generator=generator, device=device, dtype=dtype)
    latents = pack(noise[:, 0])
    references = torch.cat([pack(r[None].to(device, dtype)) for r in cond.references], dim=1)
    shapes = img_shapes(noise[0, 0], [r[None] for r in cond.references])

    sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    config = scheduler.config
    mu = calculate_shift(
        latents.shape[1],
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    timesteps, _ = retrieve_timesteps(scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)
    scheduler.set_begin_index(0)
    do_cfg = true_cfg_scale > 1 and cond.negative_prompt_embeds is not None

    def predict(embeds, mask, model_input, timestep):
        out = transformer(
            hidden_states=model_input,
            timestep=timestep / 1000,
            encoder_hidden_states_mask=_mask_or_none(mask),
            encoder_hidden_states=embeds,
            img_shapes=shapes,
            attention_kwargs={},
            return_dict=False,
        )[0]
        return out[:, : latents.size(1)]

    for t in timesteps:
        model_input = torch.cat([latents, references], dim=1)
        timestep = t.expand(latents.shape[0]).to(latents.dtype)
        noise_pred = predict(cond.prompt_embeds, cond.prompt_embeds_mask, model_input, timestep)
        if do_cfg:
            negative = predict(cond.negative_prompt_embeds, cond.negative_prompt_embeds_mask, model_input, timestep)
            combined = negative + true_cfg_scale * (noise_pred - negative)
            # rescale to the conditional prediction's norm, as the pipeline does
            noise_pred = combined * (torch.norm(noise_pred, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
    return latents
