"""The Qwen-Image checkpoints we train edits on, and how each one conditions the transformer.

One table, read by config validation, the encoders, the training loop and validation, so a
flavour's rules live in exactly one place.

edit-v1/v2/v3 are the Qwen-Image-Edit checkpoints: the 20B double-stream MMDiT, a Qwen2.5-VL
encoder and a 16-channel RGB VAE (8x). edit-2.1 is Qwen-Image-2.1: a single-stream block-causal
transformer, a Qwen3-VL encoder and a 64-channel RGBA VAE (16x), with up to 10 references; its
conditioning is `trainer.model.conditioning_21`.
"""

from dataclasses import dataclass
from typing import Literal

FlavourName = Literal["edit-v1", "edit-v2", "edit-v3", "edit-2.1"]


@dataclass(frozen=True)
class Flavour:
    name: FlavourName
    default_model: str
    pipeline_class: str  # attribute name in `diffusers`
    min_references: int
    max_references: int
    zero_cond_t: bool  # reference tokens get timestep 0 (Qwen-Image-Edit-2511)
    transformer_class: str = "QwenImageTransformer2DModel"  # attribute name in `diffusers`

    @property
    def is_plus(self) -> bool:
        """edit-v2 and later use QwenImageEditPlusPipeline's multi-reference conditioning."""
        return self.pipeline_class == "QwenImageEditPlusPipeline"

    @property
    def is_21(self) -> bool:
        """Qwen-Image-2.1 (QwenImage21Pipeline): its own sequence layout, RGBA latents, 16x VAE."""
        return self.pipeline_class == "QwenImage21Pipeline"

    @property
    def uses_conditioning_image_embeds(self) -> bool:
        """edit-v1 caches its reference's prompt embeddings in a `conditioning_image_embeds` entry;
        the others keep them in the `text_embeds` cache."""
        return self.pipeline_class == "QwenImageEditPipeline"

    @property
    def keeps_alpha(self) -> bool:
        """The VAE reads RGBA (alpha kept) rather than RGB composited on white."""
        return self.is_21

    def pipeline_cls(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class)

    def transformer_cls(self):
        import diffusers

        return getattr(diffusers, self.transformer_class)


FLAVOURS: dict[str, Flavour] = {
    "edit-v1": Flavour("edit-v1", "Qwen/Qwen-Image-Edit", "QwenImageEditPipeline", 1, 1, False),
    "edit-v2": Flavour("edit-v2", "Qwen/Qwen-Image-Edit-2509", "QwenImageEditPlusPipeline", 1, 3, False),
    "edit-v3": Flavour("edit-v3", "Qwen/Qwen-Image-Edit-2511", "QwenImageEditPlusPipeline", 1, 3, True),
    "edit-2.1": Flavour(
        "edit-2.1", "Qwen/Qwen-Image-2.1", "QwenImage21Pipeline", 1, 10, False, "QwenImage21Transformer2DModel"
    ),
}

MAX_REFERENCES = max(f.max_references for f in FLAVOURS.values())


def get_flavour(name: str) -> Flavour:
    try:
        return FLAVOURS[name]
    except KeyError:
        from trainer.errors import ConfigError, suggest

        raise ConfigError(
            f"unknown model_flavour {name!r}; {suggest(name, FLAVOURS)}. Set model_flavour to one of these "
            "(edit-v1: Qwen-Image-Edit, edit-v2: Qwen-Image-Edit-2509, edit-v3: Qwen-Image-Edit-2511, "
            "edit-2.1: Qwen-Image-2.1)"
        ) from None
