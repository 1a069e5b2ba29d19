"""How a sample conditions Qwen-Image-2.1's transformer (edit-2.1), with `QwenImage21Pipeline`'s own code.

Each function mirrors a step of `QwenImage21Pipeline.__call__` (diffusers 0.42.1) and calls the
pipeline's own methods (`encode_prompt`, `_encode_vae_image` through `conditioning`,
`_pack_latents`, its image processor):

- each reference is converted to RGBA and resized once, to the output's area at its own aspect
  ratio (`calculate_dimensions(output_resolution², ratio)`); that one image feeds the Qwen3-VL
  encoder (which composites the alpha over white itself) and the VAE (which reads all four
  channels). Training's "output" is the target's bucket, so references take the target's area;
- the prompt template holds one `<imageN><|vision_start|><|image_pad|><|vision_end|>` per
  reference; `encode_prompt` returns the embeddings, their mask and `image_pad_mask` (which of the
  text positions are the encoder's image slots, one per 2x2 group of latent tokens);
- latents are 64-channel, 16x, fed unpatched (`_pack_latents` is a flatten); the references'
  tokens come *before* the noisy target's, `img_shapes` lists the references then the target,
  `img_mask` is `image_pad_mask` plus one slot per 2x2 group of target tokens, and the prediction
  is the joint sequence's tail (the target's tokens).

`tests/trainer/test_parity_21.py` proves each against the pipeline.
"""

import torch
from diffusers.pipelines.qwenimage21 import pipeline_qwenimage21 as qwen21
from PIL import Image

from trainer.errors import DataError

VAE_SCALE = 16  # QwenImage21Pipeline.vae_scale_factor
SLOT_TOKENS = 4  # latent tokens per vision-language image slot (2x2)


def reference_size(reference: Image.Image, area: int) -> tuple[int, int]:
    """(width, height) the pipeline gives a reference for an output of `area` pixels."""
    width, height, _ = qwen21.calculate_dimensions(area, reference.width / reference.height)
    # a side rounds to 0 only for extreme ratios at a tiny area, where the pipeline itself fails
    return max(width, 32), max(height, 32)


def check_vision_grid(pipe, width: int, height: int) -> None:
    """The VL processor must see a reference at exactly the VAE's size (one image slot per 2x2 latent
    tokens); below its min_pixels (or above max_pixels) it resizes and the pipeline cannot run."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    processor = pipe.processor.image_processor
    factor = processor.patch_size * processor.merge_size
    low, high = processor.size["shortest_edge"], processor.size["longest_edge"]
    if smart_resize(height, width, factor, low, high) != (height, width):
        raise DataError(
            f"edit-2.1: a reference at {width}x{height} (the target's area) is outside the Qwen3-VL processor's "
            f"{low}-{high} pixels, which would resize it away from the VAE's size (QwenImage21Pipeline fails the same "
            "way); train at a larger (or smaller) resolution"
        )


def prepare_references(pipe, references: list[Image.Image], target_size: tuple[int, int]):
    """The pipeline's step 1 for an output of `target_size` (width, height): RGBA, one resize for both encoders."""
    from trainer.model.conditioning import ReferenceInputs

    area = target_size[0] * target_size[1]
    prompt_images, vae_images = [], []
    for reference in references:
        if reference.mode != "RGBA":
            reference = reference.convert("RGBA")
        width, height = reference_size(reference, area)
        check_vision_grid(pipe, width, height)
        prompt_images.append(pipe.image_processor.resize(reference, width=width, height=height))
        vae_images.append(pipe.image_processor.preprocess(reference, width=width, height=height).unsqueeze(2))
    return ReferenceInputs(prompt_images, vae_images)


@torch.no_grad()
def encode_prompt(pipe, prompt: str, prompt_images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings [T, D], mask [T] and image_pad_mask [T] (bool) exactly as `encode_prompt` returns them."""
    embeds, mask, image_pad_mask = pipe.encode_prompt(prompt=prompt, image=prompt_images, device=pipe.text_encoder.device)
    if mask is None:  # the pipeline drops an all-ones mask; keep it explicit in the cache
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    return embeds[0], mask[0], image_pad_mask[0]


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, 64, h, w] -> [B, h * w, 64], the pipeline's (plain flatten) packing."""
    batch, channels, height, width = latents.shape
    return qwen21.QwenImage21Pipeline._pack_latents(latents, batch, channels, height, width)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `pack` for latent height/width: [B, h * w, 64] -> [B, 64, h, w]."""
    return qwen21.QwenImage21Pipeline._unpack_latents(tokens, height * VAE_SCALE, width * VAE_SCALE, VAE_SCALE)[:, :, 0]


def img_shapes(target: torch.Tensor, references: list[torch.Tensor]) -> list[list[tuple[int, int, int]]]:
    """The transformer's `img_shapes` for one sample: each reference, then the target, in latent tokens."""
    return [[(1, r.shape[-2], r.shape[-1]) for r in (*references, target)]]


def img_mask(image_pad_mask: torch.Tensor, target_tokens: int) -> torch.Tensor:
    """[1, T + target_tokens / 4]: the prompt's image slots, then one slot per 2x2 group of target tokens."""
    mask = image_pad_mask.reshape(1, -1).bool()
    return torch.cat([mask, mask.new_ones(1, target_tokens // SLOT_TOKENS)], dim=1)


def predict_velocity(transformer, sample, x_t: torch.Tensor, sigma: torch.Tensor, dtype) -> torch.Tensor:
    """The transformer's velocity for the target [1, 64, h, w], called as each denoising step calls it
    (without the KV cache, which only reuses the references' keys and values across steps)."""
    device = sigma.device
    noisy = pack(x_t)
    references = [pack(r[None].to(device, torch.float32)) for r in sample.references]
    all_ones = bool(sample.prompt_embeds_mask.all())  # the cached (CPU) mask: no wait for the card
    prediction = transformer(
        hidden_states=torch.cat([*references, noisy], dim=1).to(dtype),
        timestep=sigma.to(dtype),  # the pipeline passes t / 1000 = σ
        encoder_hidden_states=sample.prompt_embeds[None].to(device, dtype),
        encoder_hidden_states_mask=None if all_ones else sample.prompt_embeds_mask[None].to(device),
        img_shapes=img_shapes(x_t[0], sample.references),
        img_mask=img_mask(sample.image_pad_mask, noisy.shape[1]).to(device),
        return_dict=False,
    )[0]
    return unpack(prediction[:, -noisy.shape[1] :], x_t.shape[-2], x_t.shape[-1])
