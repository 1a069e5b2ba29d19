"""How a sample conditions the transformer, computed with the diffusers pipelines' own code.

Each function mirrors a step of `QwenImageEditPipeline.__call__` / `QwenImageEditPlusPipeline.__call__`
(diffusers 0.42) and calls the pipeline's own methods (`encode_prompt`, `_encode_vae_image`,
`_pack_latents`, its image processor), so that training sees exactly what inference sees.
`tests/trainer/test_parity.py` proves it against the pipelines. edit-2.1 (`QwenImage21Pipeline`) has
its own layout, in `trainer.model.conditioning_21`; the functions here hand it over where it differs.
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
    vae_images: list[torch.Tensor]  # each [1, 3, 1, H, W] in [-1, 1] (edit-2.1: [1, 4, 1, H, W], RGBA)


@dataclass
class PromptEmbedding:
    """What the pipeline's `encode_prompt` returns for one prompt, batch dimension dropped."""

    embeds: torch.Tensor  # [T, D]
    mask: torch.Tensor  # [T]; all ones where the pipeline passes None
    image_pad_mask: torch.Tensor | None = None  # [T] bool, edit-2.1: the VL encoder's image slots


def references_take_target_area(flavour: Flavour, match_target_res: bool) -> bool:
    """edit-2.1 always sizes references to the output's area (the pipeline's `output_resolution`);
    edit-v2/v3 do with match_target_res."""
    return flavour.is_21 or (flavour.is_plus and match_target_res)


def prepare_references(
    pipe, flavour: Flavour, references: list[Image.Image], target_size: tuple[int, int] | None = None
) -> ReferenceInputs:
    """`target_size` (width, height) is used only for edit-v2/v3 with match_target_res: the VAE then
    sees each reference at the target's area instead of `VAE_IMAGE_SIZE`, at the reference's own
    aspect ratio (sides multiple of 32), which is what the pipeline does with its
    `VAE_IMAGE_SIZE` set to that area (README: match_target_res at inference). edit-2.1 needs it:
    its references (VL encoder and VAE alike) take the output's area."""
    if flavour.is_21:
        from trainer.model import conditioning_21

        if target_size is None:
            raise ValueError("edit-2.1 sizes its references by the output's area: pass target_size")
        return conditioning_21.prepare_references(pipe, references, target_size)
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
def embed_prompt(pipe, flavour: Flavour, prompt: str, refs: ReferenceInputs) -> PromptEmbedding:
    """The prompt with its references, exactly as the pipeline's `encode_prompt` encodes it."""
    if flavour.is_21:
        from trainer.model import conditioning_21

        return PromptEmbedding(*conditioning_21.encode_prompt(pipe, prompt, refs.prompt_images))
    return PromptEmbedding(*encode_prompt(pipe, flavour, prompt, refs))


@torch.no_grad()
def encode_prompt(pipe, flavour: Flavour, prompt: str, refs: ReferenceInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt embeddings [T, D] and mask [T] exactly as the pipeline's `encode_prompt` returns them
    (edit-2.1's image_pad_mask too: use `embed_prompt`)."""
    if flavour.is_21:
        embedding = embed_prompt(pipe, flavour, prompt, refs)
        return embedding.embeds, embedding.mask
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
    """The edit target at its bucket size (width, height), cropped to the bucket's aspect ratio.
    An RGBA target (edit-2.1) keeps its alpha: diffusers' "crop" resize would drop it."""
    width, height = size
    if target.mode == "RGBA":
        return pipe.image_processor.preprocess(_resize_and_crop_rgba(pipe, target, width, height), height, width).unsqueeze(2)
    return pipe.image_processor.preprocess(target, height, width, resize_mode="crop").unsqueeze(2)


def _resize_and_crop_rgba(pipe, image: Image.Image, width: int, height: int) -> Image.Image:
    """`VaeImageProcessor._resize_and_crop`'s geometry (cover, then centre-crop), alpha kept."""
    from diffusers.utils.pil_utils import PIL_INTERPOLATION

    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=PIL_INTERPOLATION[pipe.image_processor.config.resample])
    cropped = Image.new("RGBA", (width, height))
    cropped.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return cropped


def pipeline_tokens(pipe, latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] latents as `pipe`'s own `_pack_latents` lays them out (its `output_type="latent"`)."""
    batch, channels, height, width = latents.shape
    return pipe._pack_latents(latents, batch, channels, height, width)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, 16, h, w] -> [B, h/2 * w/2, 64] tokens, with the pipeline's packing. Any channel count packs
    (edit-2.1's 64 -> 256): the training loss compares every flavour's velocities in this layout."""
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
