"""How a sample conditions the transformer, computed with the diffusers pipelines' own code.

Each function mirrors a step of `QwenImageEditPipeline.__call__` / `QwenImageEditPlusPipeline.__call__`
(diffusers 0.42) and calls the pipeline's own methods (`encode_prompt`, `_encode_vae_image`,
`_pack_latents`, its image processor), so that training sees exactly what inference sees.
`tests/trainer/test_parity.py` proves it against the pipelines.
"""

from dataclasses import dataclass

import torch
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit_v1
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as edit_plus
from PIL import Image

from trainer.model.flavours import Flavour

LATENT_CHANNELS = 16


@dataclass
class ReferenceInputs:
    """References prepared the pipeline's way: what the VL encoder sees and what the VAE sees."""

    prompt_images: list[Image.Image]
    vae_images: list[torch.Tensor]  # each [1, 3, 1, H, W] in [-1, 1]


def prepare_references(
    pipe, flavour: Flavour, references: list[Image.Image], target_size: tuple[int, int] | None = None
) -> ReferenceInputs:
    """`target_size` (width, height) is used only for edit-v2/v3 with match_target_res: the VAE then
    sees each reference at the target's area instead of `VAE_IMAGE_SIZE`, at the reference's own
    aspect ratio (sides multiple of 32), which is what the pipeline does with its
    `VAE_IMAGE_SIZE` set to that area (README: match_target_res at inference)."""
    if not flavour.is_plus:
        (reference,) = references
        width, height, _ = edit_v1.calculate_dimensions(1024 * 1024, reference.width / reference.height)
        resized = pipe.image_processor.resize(reference, height, width)
        vae_image = pipe.image_processor.preprocess(resized, height, width).unsqueeze(2)
        return ReferenceInputs([resized], [vae_image])
    prompt_images, vae_images = [], []
    for reference in references:
        ratio = reference.width / reference.height
        cond_w, cond_h = edit_plus.calculate_dimensions(edit_plus.CONDITION_IMAGE_SIZE, ratio)
        vae_area = edit_plus.VAE_IMAGE_SIZE if target_size is None else target_size[0] * target_size[1]
        vae_w, vae_h = edit_plus.calculate_dimensions(vae_area, ratio)
        # a side rounds to 0 only for extreme ratios at a tiny area, where the pipeline itself fails
        vae_w, vae_h = max(vae_w, 32), max(vae_h, 32)
        prompt_images.append(pipe.image_processor.resize(reference, cond_h, cond_w))
        vae_images.append(pipe.image_processor.preprocess(reference, vae_h, vae_w).unsqueeze(2))
    return ReferenceInputs(prompt_images, vae_images)


@torch.no_grad()
def encode_prompt(pipe, flavour: Flavour, prompt: str, refs: ReferenceInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt embeddings [T, D] and mask [T] exactly as the pipeline's `encode_prompt` returns them."""
    image = refs.prompt_images if flavour.is_plus else refs.prompt_images[0]
    embeds, mask = pipe.encode_prompt(prompt=prompt, image=image, device=pipe.text_encoder.device)
    if mask is None:  # the pipeline drops an all-ones mask; keep it explicit in the cache
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    return embeds[0], mask[0]


@torch.no_grad()
def encode_image_latents(pipe, image: torch.Tensor) -> torch.Tensor:
    """Normalised VAE latents [16, h, w] of a preprocessed image [1, 3, 1, H, W]."""
    vae = pipe.vae
    latents = pipe._encode_vae_image(image.to(vae.device, vae.dtype), generator=None)
    return latents[0, :, 0]


def preprocess_target(pipe, target: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """The edit target at its bucket size (width, height), cropped to the bucket's aspect ratio."""
    width, height = size
    return pipe.image_processor.preprocess(target, height, width, resize_mode="crop").unsqueeze(2)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, 16, h, w] -> [B, h/2 * w/2, 64] tokens, with the pipeline's packing."""
    batch, channels, height, width = latents.shape
    return edit_v1.QwenImageEditPipeline._pack_latents(latents, batch, channels, height, width)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `pack` for latent height/width: [B, N, 64] -> [B, 16, h, w]."""
    scale = 8  # the pipeline's helper takes pixel sizes and the VAE scale factor
    unpacked = edit_v1.QwenImageEditPipeline._unpack_latents(tokens, height * scale, width * scale, scale)
    return unpacked[:, :, 0]


def img_shapes(target: torch.Tensor, references: list[torch.Tensor]) -> list[list[tuple[int, int, int]]]:
    """The transformer's `img_shapes` for one sample: the target then each reference, in tokens."""
    shapes = [(1, t.shape[-2] // 2, t.shape[-1] // 2) for t in (target, *references)]
    return [shapes]
