"""The training config (`config.json`): one typed schema, the single source of truth for every key.

Users bring SimpleTuner-style JSON: `//` comments are allowed and keys may carry SimpleTuner's
`--` prefix. SimpleTuner keys with no counterpart here are accepted with a note when harmless
(`trainer.config.simpletuner_keys`). Unknown keys and bad values are errors that name the key, the
value and the closest valid option.
"""

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from trainer.config.simpletuner_keys import DATASET_DEFAULT_KEYS
from trainer.data.images import CropAspect, ResolutionType
from trainer.model.flavours import FLAVOURS, FlavourName, get_flavour

BaseModelPrecision = Literal[
    "no_change", "int8-quanto", "int4-quanto", "int2-quanto", "fp8-quanto", "nf4-bnb"
]
LrScheduler = Literal[
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
]
Optimizer = Literal["adamw", "adamw_bf16", "adamw8bit"]

# Keys whose value must be one of a fixed set; used to suggest the right value in errors.
_FIXED_CHOICES = {
    "base_model_precision": BaseModelPrecision.__args__,
    "lr_scheduler": LrScheduler.__args__,
    "optimizer": Optimizer.__args__,
    "model_flavour": tuple(FLAVOURS),
    "mixed_precision": ("bf16", "fp16", "no"),
    "quantize_via": ("cpu", "accelerator"),
    "report_to": ("mlflow", "none"),
    "model_type": ("lora",),
    "model_family": ("qwen_image",),
    "ema_device": ("cpu", "accelerator"),
    "resolution_type": ResolutionType.__args__,
    "crop_aspect": CropAspect.__args__,
}


class ModelKwargs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # edit-v2/v3: VAE references take the target's size instead of ~1 megapixel.
    match_target_res: bool = False


class TrainConfig(BaseModel):
    """Every key of SPEC §3, with SimpleTuner's names and meanings."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # model
    model_type: Literal["lora"] = "lora"
    model_family: Literal["qwen_image"] = "qwen_image"
    model_flavour: FlavourName = "edit-v1"
    pretrained_model_name_or_path: str | None = None  # default: the flavour's Hub checkpoint
    model_kwargs: ModelKwargs = Field(default_factory=ModelKwargs)

    # data
    data_backend_config: str | None = None
    eval_dataset_id: str | None = None
    caption_dropout_probability: float = Field(0.0, ge=0.0, le=1.0)
    # SimpleTuner's global defaults for every dataset entry that does not set its own
    resolution: float | None = Field(None, gt=0)
    resolution_type: ResolutionType | None = None
    minimum_image_size: float | None = Field(None, ge=0)
    crop_aspect: CropAspect | None = None

    # optimisation
    train_batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_train_steps: int | None = Field(None, ge=0)
    num_train_epochs: int | None = Field(None, ge=0)
    learning_rate: float = Field(1e-4, gt=0)
    lr_scheduler: LrScheduler = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    optimizer: Optimizer = "adamw"
    max_grad_norm: float = Field(1.0, ge=0)
    lora_rank: int = Field(16, ge=1)
    lora_alpha: float | None = Field(None, gt=0)  # default: lora_rank (scale 1)
    seed: int = 42
    flow_schedule_shift: float = Field(1.73, gt=0)

    # experimental: scheduled sampling (rollout) against exposure bias; off by default
    scheduled_sampling_probability: float = Field(0.0, ge=0.0, le=1.0)
    scheduled_sampling_max_step_offset: int = Field(100, ge=1, le=1000)  # in timesteps of 1000
    scheduled_sampling_steps: int = Field(2, ge=1)

    # precision and memory
    mixed_precision: Literal["bf16", "fp16", "no"] = "bf16"
    gradient_checkpointing: bool = False
    base_model_precision: BaseModelPrecision = "no_change"
    quantize_via: Literal["cpu", "accelerator"] = "accelerator"
    quantize_activations: bool = False
    # GPU-memory savers (trainer/memory.py): the same arithmetic, a few % slower; with int8 they fit 24 GB
    offload_activations: bool = False
    offload_optimizer_state: bool = False
    blocks_to_swap: int = Field(
        0,
        ge=0,
        description=(
            "block swap (trainer/model/block_swap.py): this many transformer blocks keep their frozen weights in "
            "pinned CPU memory and are copied to the GPU just before they run, overlapped with the compute "
            "(0.32 GiB each with int8-quanto, 0.64 with bf16); the same results, for cards that cannot hold "
            "the base. Needs gradient_checkpointing. `qwen-edit check --gpu-memory GB` predicts the peak"
        ),
    )

    # outputs, checkpoints
    output_dir: str = "output/models"
    checkpointing_steps: int = Field(500, ge=1)
    checkpoints_total_limit: int | None = Field(None, ge=1)
    resume_from_checkpoint: str | None = None  # "latest" or a checkpoint folder

    # EMA of the LoRA weights
    use_ema: bool = False
    ema_device: Literal["cpu", "accelerator"] = "cpu"
    ema_decay: float = Field(0.999, gt=0, lt=1)

    # validation
    validation_prompt: str | None = None
    validation_negative_prompt: str = " "
    validation_resolution: str = "1024x1024"
    validation_guidance: float = Field(4.0, ge=0)
    validation_num_inference_steps: int = Field(30, ge=1)
    validation_step_interval: int | None = Field(None, ge=1)
    validation_seed: int = 0

    # tracking
    report_to: Literal["mlflow", "none"] = "mlflow"
    tracker_project_name: str = "qwen-edit"
    tracker_run_name: str | None = None

    _notes: tuple[str, ...] = PrivateAttr(default=())  # SimpleTuner keys read without effect

    @field_validator("validation_resolution", mode="before")
    @classmethod
    def _parse_resolution(cls, value: Any) -> str:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if isinstance(value, str) and (match := re.fullmatch(r"(\d+)(?:x(\d+))?", value.strip())):
            width, height = int(match[1]), int(match[2] or match[1])
            if width > 0 and height > 0:
                return f"{width}x{height}"
        raise ValueError(f"expected 'WIDTHxHEIGHT' such as '1024x1024' or '768x768', got {value!r}")

    @model_validator(mode="after")
    def _check_combinations(self) -> "TrainConfig":
        if self.train_batch_size != 1:
            raise ValueError(
                f"train_batch_size={self.train_batch_size}: the Qwen-Image Edit models train with "
                "train_batch_size 1 (samples have different reference counts and sizes). For a larger "
                f"effective batch set gradient_accumulation_steps={self.train_batch_size * self.gradient_accumulation_steps} "
                "and train_batch_size=1."
            )
        if self.offload_optimizer_state and self.optimizer == "adamw8bit":
            raise ValueError(
                "offload_optimizer_state moves torch AdamW's state; adamw8bit keeps bitsandbytes' own (already 4x "
                "smaller) state on the GPU. Use one of the two: optimizer 'adamw' with offload_optimizer_state, or "
                "adamw8bit without it."
            )
        if self.blocks_to_swap and not self.gradient_checkpointing:
            raise ValueError(
                f"blocks_to_swap={self.blocks_to_swap} needs gradient_checkpointing: true (block swap copies each "
                "block's weights to the GPU for its forward and again for its recomputation in the backward; without "
                "checkpointing the activations of the 20B model far outweigh the weights it saves)"
            )
        if self.model_kwargs.match_target_res and not get_flavour(self.model_flavour).is_plus:
            raise ValueError(
                "model_kwargs.match_target_res applies to edit-v2 and edit-v3 only; edit-v1 feeds its "
                "single reference at ~1 megapixel like QwenImageEditPipeline. Remove the key or use "
                "model_flavour 'edit-v2'."
            )
        return self

    # Derived values, so that callers never re-derive defaults.
    @property
    def flavour(self):
        return get_flavour(self.model_flavour)

    @property
    def notes(self) -> tuple[str, ...]:
        """What parsing noted (SimpleTuner keys without effect here), for the user to see."""
        return self._notes

    @property
    def dataset_defaults(self) -> dict[str, Any]:
        """Values every dataset entry inherits unless it sets its own (SimpleTuner's globals)."""
        return {key: getattr(self, key) for key in DATASET_DEFAULT_KEYS if getattr(self, key) is not None}

    @property
    def model_path(self) -> str:
        return self.pretrained_model_name_or_path or self.flavour.default_model

    @property
    def lora_scale_alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else float(self.lora_rank)

    @property
    def validation_size(self) -> tuple[int, int]:
        """(width, height) of validation outputs."""
        width, height = (int(v) for v in self.validation_resolution.split("x"))
        return width, height

    def resolved_max_train_steps(self, samples_per_epoch: int, world_size: int = 1) -> int:
        """max_train_steps wins when set and > 0; otherwise epochs x optimizer steps per epoch.

        Each optimizer step consumes world_size x accumulation samples (every process draws its
        own), so an epoch, each sample once, takes samples / (world_size x accumulation) steps.
        """
        if self.max_train_steps:
            return self.max_train_steps
        epochs = self.num_train_epochs or 1
        per_step = self.gradient_accumulation_steps * world_size
        return max(1, math.ceil(epochs * samples_per_epoch / per_step))
