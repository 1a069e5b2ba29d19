"""The Qwen-Image Edit checkpoints we train, and how each one conditions the transformer.

One table, read by config validation, the encoders, the training loop and validation, so a
flavour's rules live in exactly one place.
"""

from dataclasses import dataclass
from typing import Literal

FlavourName = Literal["edit-v1", "edit-v2", "edit-v3"]


@dataclass(frozen=True)
class Flavour:
    name: FlavourName
    default_model: str
    pipeline_class: str  # attribute name in `diffusers`
    min_references: int
    max_references: int
    zero_cond_t: bool  # reference tokens get timestep 0 (Qwen-Image-Edit-2511)

    @property
    def is_plus(self) -> bool:
        """edit-v2 and later use QwenImageEditPlusPipeline's multi-reference conditioning."""
        return self.pipeline_class == "QwenImageEditPlusPipeline"

    def pipeline_cls(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class)


FLAVOURS: dict[str, Flavour] = {
    "edit-v1": Flavour("edit-v1", "Qwen/Qwen-Image-Edit", "QwenImageEditPipeline", 1, 1, False),
    "edit-v2": Flavour("edit-v2", "Qwen/Qwen-Image-Edit-2509", "QwenImageEditPlusPipeline", 1, 3, False),
    "edit-v3": Flavour("edit-v3", "Qwen/Qwen-Image-Edit-2511", "QwenImageEditPlusPipeline", 1, 3, True),
}


def get_flavour(name: str) -> Flavour:
    try:
        return FLAVOURS[name]
    except KeyError:
        from trainer.errors import ConfigError, suggest

        raise ConfigError(
            f"unknown model_flavour {name!r}; {suggest(name, FLAVOURS)}. Set model_flavour to one of these "
            "(edit-v1: Qwen-Image-Edit, edit-v2: Qwen-Image-Edit-2509, edit-v3: Qwen-Image-Edit-2511)"
        ) from None
