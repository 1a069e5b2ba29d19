"""Generating an edit from already-encoded conditioning: the pipelines' denoising loop, step for step.

Why not call the pipeline? Its `__call__` re-encodes the references from PIL images at fixed
sizes every time; validation here reuses the cached conditioning and honours
`match_target_res`, which the pipeline cannot express. The loop below uses the pipeline
module's own `calculate_shift`/`retrieve_timesteps` and the pipeline's scheduler and
transformer, and `tests/trainer/test_parity.py` checks its output equals `pipeline(...)`.
`generate_latents_21` is `QwenImage21Pipeline`'s loop (edit-2.1), checked by `tests/trainer/test_parity_21.py`.
"""

from dataclasses import dataclass

import numpy as np
import torch
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor

from trainer.model import conditioning_21
from trainer.model.conditioning import img_shapes, pack
from trainer.training.flow_matching import DynamicShift


@dataclass
class EditConditioning:
    """Everything the transformer is conditioned on for one pair (batch of one)."""

    prompt_embeds: torch.Tensor  # [1, T, D]
    prompt_embeds_mask: torch.Tensor | None  # [1, T]; None when all ones, as the pipeline passes it
    negative_prompt_embeds: torch.Tensor | None
    negative_prompt_embeds_mask: torch.Tensor | None
    references: list[torch.Tensor]  # normalised latents, each [16, h, w] (edit-2.1: [64, h, w])
    image_pad_mask: torch.Tensor | None = None  # [1, T] bool, edit-2.1: the VL encoder's image slots
    negative_image_pad_mask: torch.Tensor | None = None


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

    sigmas, mu = _sigmas_and_mu(scheduler, num_inference_steps, latents.shape[1])
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


def _sigmas_and_mu(scheduler, num_inference_steps: int, image_tokens: int, sample_sigmas=None):
    """The pipelines' schedule: linear sigmas (or the checkpoint's own) and the shift `mu` for `image_tokens`."""
    sigmas = sample_sigmas if sample_sigmas is not None else np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    return sigmas, DynamicShift.from_scheduler_config(scheduler.config).mu(image_tokens)


@torch.no_grad()
def generate_latents_21(
    transformer,
    scheduler,
    cond: EditConditioning,
    width: int,
    height: int,
    num_inference_steps: int,
    true_cfg_scale: float,
    generator: torch.Generator,
    sample_sigmas: list[float] | None = None,
    use_kv_cache: bool = True,
) -> torch.Tensor:
    """Packed output latents [1, h * w, 64], as `QwenImage21Pipeline(..., output_type="latent").images`.

    Its loop step for step: references' tokens before the target's, `img_mask` with the target's
    slots, the pipeline's `sample_sigmas` (its config) when set, plain true CFG (no norm rescale,
    unlike the edit pipelines), and the KV cache of the references' keys and values as the
    pipeline's default `use_kv_cache=True` (valid under `causal_condition`)."""
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

    device, dtype = cond.prompt_embeds.device, cond.prompt_embeds.dtype
    latent_h, latent_w = 2 * (height // (conditioning_21.VAE_SCALE * 2)), 2 * (width // (conditioning_21.VAE_SCALE * 2))
    channels = transformer.config.in_channels
    noise = randn_tensor((1, 1, channels, latent_h, latent_w), generator=generator, device=device, dtype=dtype)
    latents = conditioning_21.pack(noise[:, 0])
    references = torch.cat([conditioning_21.pack(r[None].to(device, dtype)) for r in cond.references], dim=1)
    shapes = conditioning_21.img_shapes(noise[0, 0], cond.references)

    sigmas, mu = _sigmas_and_mu(scheduler, num_inference_steps, latents.shape[1], sample_sigmas)
    timesteps, _ = retrieve_timesteps(scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)
    do_cfg = true_cfg_scale > 1 and cond.negative_prompt_embeds is not None
    cached = use_kv_cache and transformer.config.causal_condition
    blocks = len(transformer.transformer_blocks)
    caches = {"cond": QwenImage21KVCache(blocks) if cached else None, "uncond": QwenImage21KVCache(blocks) if cached and do_cfg else None}
    slots = {
        "cond": conditioning_21.img_mask(cond.image_pad_mask, latents.shape[1]).to(device),
        "uncond": conditioning_21.img_mask(cond.negative_image_pad_mask, latents.shape[1]).to(device) if do_cfg else None,
    }

    def predict(name, embeds, mask, model_input, timestep, kv_mode):
        with transformer.cache_context(name):
            out = transformer(
                hidden_states=model_input,
                timestep=timestep / 1000,
                encoder_hidden_states=embeds,
                encoder_hidden_states_mask=_mask_or_none(mask),
                img_shapes=shapes,
                img_mask=slots[name],
                attention_kwargs={},
                kv_cache=caches[name],
                kv_cache_mode=kv_mode,
                return_dict=False,
            )[0]
        return out[:, -latents.size(1) :]

    scheduler.set_begin_index(0)
    for i, t in enumerate(timesteps):
        kv_mode = ("extract" if i == 0 else "cached") if cached else None
        model_input = torch.cat([references, latents], dim=1)
        timestep = t.expand(latents.shape[0]).to(latents.dtype)
        noise_pred = predict("cond", cond.prompt_embeds, cond.prompt_embeds_mask, model_input, timestep, kv_mode)
        if do_cfg:
            negative = predict("uncond", cond.negative_prompt_embeds, cond.negative_prompt_embeds_mask, model_input, timestep, kv_mode)
            noise_pred = negative + true_cfg_scale * (noise_pred - negative)
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
    return latents
