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
from trainer.config.value_checks import MAX_COUNT, MAX_SEED, MAX_SIDE, in_range, no_bool_for_number, path_text
from trainer.data.images import CropAspect, ResolutionType
from trainer.model.flavours import FlavourName, get_flavour

BaseModelPrecision = Literal[
    "no_change", "int8-quanto", "int4-quanto", "int2-quanto", "fp8-quanto", "nf4-bnb", "fp8-native"
]
AttentionBackend = Literal["native", "cudnn", "flash"]
LrScheduler = Literal[
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
]
Optimizer = Literal["adamw", "adamw_bf16", "adamw8bit"]
# validation means of the LoRA (trainer.evaluation.validation's report summary) a promotion can compare
PromotionMetric = Literal["lora_latent_mse", "lora_psnr", "lora_ssim", "lora_edit_success", "lora_preservation", "lora_pixel_shift"]


# Bounds beyond the Field ones: past them a value fails later (an overflow, a C integer, memory), so
# `check` refuses it. Non-finite floats (Infinity, NaN) are refused for every key (allow_inf_nan).
_RANGES = {
    "resolution": (0, MAX_SIDE),
    "minimum_image_size": (0, MAX_SIDE),
    "train_batch_size": (1, MAX_COUNT),
    "gradient_accumulation_steps": (1, 2**16),
    "max_train_steps": (0, MAX_COUNT),
    "num_train_epochs": (0, MAX_COUNT),
    "lr_warmup_steps": (0, MAX_COUNT),
    "lora_rank": (1, 4096),
    "seed": (0, MAX_SEED),
    "flow_schedule_shift": (0, 100),
    "flow_sigmoid_scale": (0, 100),
    "flow_beta_schedule_alpha": (0, 1000),
    "flow_beta_schedule_beta": (0, 1000),
    "scheduled_sampling_steps": (1, 1000),
    "blocks_to_swap": (0, 1000),
    "vae_batch_size": (1, 1024),
    "cache_workers": (0, 256),
    "checkpointing_steps": (1, MAX_COUNT),
    "checkpoints_total_limit": (1, MAX_COUNT),
    "validation_guidance": (0, 100),
    "validation_num_inference_steps": (1, 1000),
    "validation_step_interval": (1, MAX_COUNT),
    "validation_seed": (0, MAX_SEED),
}
_PATH_KEYS = ("pretrained_model_name_or_path", "data_backend_config", "output_dir", "resume_from_checkpoint", "lycoris_config")


class ModelKwargs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    match_target_res: bool = Field(
        False,
        description=(
            "edit-v2/v3: VAE references take the target's area (each keeping its own aspect ratio) instead of "
            "~1 megapixel; at inference see [match_target_res at inference](#match_target_res-at-inference)"
        ),
    )


class TrainConfig(BaseModel):
    """Every key of SPEC §3, with SimpleTuner's names and meanings."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    # model
    model_type: Literal["lora"] = Field("lora", description="only LoRA training")
    model_family: Literal["qwen_image"] = Field(
        "qwen_image",
        description="the Qwen-Image family (SimpleTuner's name for it)",
    )
    model_flavour: FlavourName = Field(
        "edit-v1",
        description=(
            "`edit-v1` (Qwen-Image-Edit, 1 reference), `edit-v2` (Qwen-Image-Edit-2509, 1-3), `edit-v3` "
            "(Qwen-Image-Edit-2511, `zero_cond_t`), `edit-2.1` (Qwen-Image-2.1, 1-10, RGBA; another licence: see "
            "the flavour table)"
        ),
    )
    pretrained_model_name_or_path: str | None = Field(
        None,
        description=(
            "Hub id or local diffusers folder; defaults `Qwen/Qwen-Image-Edit`, `Qwen/Qwen-Image-Edit-2509`, "
            "`Qwen/Qwen-Image-Edit-2511`, `Qwen/Qwen-Image-2.1`"
        ),
        json_schema_extra={"shown_default": "per flavour"},
    )
    model_kwargs: ModelKwargs = Field(default_factory=ModelKwargs, description="model options (one row per key below)")

    # data
    data_backend_config: str | None = Field(None, description="path of the dataset config (or `--data`)")
    eval_dataset_id: str | None = Field(None, description="image dataset used only for validation")
    caption_dropout_probability: float = Field(
        0.0, ge=0.0, le=1.0,
        description=(
            "chance per step of training on the empty instruction (references kept); keep 0.0 for edit "
            "training"
        ),
    )
    # the cache stage (trainer.data.caches): how fast, never what it computes
    vae_batch_size: int = Field(
        1, ge=1,
        description=(
            "caching: images of one size VAE-encoded together (SimpleTuner's key). 1 keeps the latents bit-identical "
            "to the pipeline's own encode (at 1024x1024 a batch is no faster on an H200); larger batches help small "
            "images and equal them to float rounding; a batch that runs out of GPU memory is encoded in halves"
        ),
    )
    cache_workers: int = Field(
        4, ge=0,
        description=(
            "caching: threads that decode and prepare the next samples (images, the VL processor) while the "
            "GPU encodes; 0 prepares each sample in the main thread. Results are the same for any value"
        ),
    )
    # SimpleTuner's global defaults for every dataset entry that does not set its own
    resolution: float | None = Field(
        None, gt=0,
        description=(
            "default `resolution` of every dataset entry that sets none (SimpleTuner's global); entries "
            "default to 1024"
        ),
    )
    resolution_type: ResolutionType | None = Field(
        None,
        description="default `resolution_type` of the dataset entries (`pixel_area` otherwise)",
    )
    minimum_image_size: float | None = Field(
        None, ge=0,
        description="default `minimum_image_size` of the dataset entries (none: keep every target)",
    )
    crop_aspect: CropAspect | None = Field(
        None,
        description="default `crop_aspect` of the dataset entries (`preserve` otherwise)",
    )

    # optimisation
    train_batch_size: int = Field(
        1, ge=1,
        description="must be 1 for the edit models; use `gradient_accumulation_steps`",
    )
    gradient_accumulation_steps: int = Field(1, ge=1, description="samples per optimiser step")
    max_train_steps: int | None = Field(None, ge=0, description="optimiser steps; wins over epochs when > 0")
    num_train_epochs: int | None = Field(
        None, ge=0,
        description="used when `max_train_steps` is unset (default 1 epoch)",
    )
    learning_rate: float = Field(1e-4, gt=0, description="the optimiser's learning rate for the LoRA weights")
    lr_scheduler: LrScheduler = Field(
        "constant",
        description=(
            "`constant`, `constant_with_warmup`, `linear`, `cosine`, `cosine_with_restarts`, `polynomial` "
            "(diffusers' schedulers)"
        ),
    )
    lr_warmup_steps: int = Field(
        0, ge=0,
        description="optimiser steps of learning-rate warm-up (schedulers with a warm-up)",
    )
    optimizer: Optimizer = Field(
        "adamw",
        description=(
            "`adamw`; `adamw_bf16` is accepted and runs torch AdamW on float32 LoRA weights; `adamw8bit` "
            "(bitsandbytes, CUDA only)"
        ),
    )
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping (0 = off)")
    lora_type: Literal["standard", "lycoris"] = Field(
        "standard",
        description=(
            "`standard`: a peft LoRA (`use_dora` for DoRA); `lycoris`: LoKr or LoHa through peft, as `lycoris_config` "
            "says (see [Adapters](#adapters-lora-dora-lokr-loha))"
        ),
    )
    lycoris_config: str | None = Field(
        None,
        description=(
            "with lora_type `lycoris`: SimpleTuner's LyCORIS JSON file (`algo` `lokr` or `loha`, `linear_dim`, "
            "`linear_alpha`, `factor`, ...); what peft lacks is refused by name (see [Adapters](#adapters-lora-dora-lokr-loha))"
        ),
    )
    use_dora: bool = Field(
        False,
        description=(
            "DoRA (peft's `use_dora`): the LoRA plus a trained magnitude per output channel; loads with "
            "`load_lora_weights`; not with lora_type `lycoris` or `fp8-native`"
        ),
    )
    lora_rank: int = Field(16, ge=1, description="rank of the LoRA matrices")
    lora_alpha: float | None = Field(
        None, gt=0,
        description="LoRA scale = lora_alpha / lora_rank (default 1); saved in the LoRA's adapter metadata",
        json_schema_extra={"shown_default": "`lora_rank`"},
    )
    seed: int = Field(
        42,
        description="seeds the LoRA init, the data order, σ and noise (a resumed run sees the same ones)",
    )
    flow_schedule_shift: float = Field(
        1.73, ge=0,
        description=(
            "fixed time shift σ = s·u / (1 + (s-1)·u) of every drawn u; 0 = none (SimpleTuner's value for it); "
            "ignored with flow_schedule_auto_shift, as in SimpleTuner"
        ),
    )
    flow_schedule_auto_shift: bool = Field(
        False,
        description=(
            "resolution-dependent shift: each sample's σ is shifted by exp(mu), mu from its target's image token count "
            "and the model's scheduler config (base/max shift and image seq len), as the pipeline shifts its inference "
            "schedule for that size (see [Timestep sampling](#timestep-sampling))"
        ),
    )
    flow_sigmoid_scale: float = Field(
        1.0, gt=0,
        description="the default schedule's u = sigmoid(scale · z), z ~ N(0, 1) (logit-normal with std `scale`)",
    )
    flow_use_uniform_schedule: bool = Field(False, description="u uniform on (0, 1) instead of the sigmoid schedule")
    flow_use_beta_schedule: bool = Field(
        False,
        description="u ~ Beta(flow_beta_schedule_alpha, flow_beta_schedule_beta) instead of the sigmoid schedule",
    )
    flow_beta_schedule_alpha: float = Field(2.0, gt=0, description="α of the beta schedule")
    flow_beta_schedule_beta: float = Field(2.0, gt=0, description="β of the beta schedule")
    masked_loss_probability: float = Field(
        1.0, ge=0.0, le=1.0,
        description=(
            "with a `conditioning_type: mask` dataset: chance per sample that its mask weights the loss (otherwise "
            "the plain loss); 1.0 = always (see [Masked loss](#masked-loss))"
        ),
    )

    # experimental: scheduled sampling (rollout) against exposure bias; off by default
    scheduled_sampling_probability: float = Field(
        0.0, ge=0.0, le=1.0,
        description=(
            "experimental rollout: chance per step that the input at σ is reached by the model's own Euler "
            "steps from a noisier level (costs extra forward passes)"
        ),
    )
    scheduled_sampling_max_step_offset: int = Field(
        100, ge=1, le=1000,
        description="how much noisier the rollout starts, at most, in timesteps of 1000",
    )
    scheduled_sampling_steps: int = Field(2, ge=1, description="model steps in a rollout")

    # precision and memory
    mixed_precision: Literal["bf16", "fp16", "no"] = Field(
        "bf16",
        description="`bf16`, `fp16`, `no` (forced to `no` on a CPU)",
    )
    gradient_checkpointing: bool = Field(
        False,
        description=(
            "recompute each transformer block's activations in the backward pass instead of keeping them "
            "(less memory, slower)"
        ),
    )
    gradient_checkpointing_interval: int = Field(
        1, ge=1, le=1000,
        description=(
            "with gradient_checkpointing: checkpoint only every N-th transformer block (SimpleTuner's key); the "
            "others keep their activations: faster, about 1.2 GiB more per block kept for the 20B model at 1 "
            "reference x 1300 text tokens (1 = every block)"
        ),
    )
    gradient_checkpointing_keep_attention: bool = Field(
        False,
        description=(
            "with gradient_checkpointing: each checkpointed block keeps its attention output, so the backward "
            "recomputes everything but the attention (its costliest op); as much memory again as the "
            "checkpointed inputs (+3.3 GiB for the 20B model at 1 reference x 1300 text tokens); same results"
        ),
    )
    attention_backend: AttentionBackend = Field(
        "native",
        description=(
            "the attention kernel: `native` (PyTorch picks; FlashAttention-2 on GPUs), `cudnn` (cuDNN's fused "
            "attention, the fastest on Hopper), `flash` (FlashAttention-2, no masks); `cudnn`/`flash` need CUDA"
        ),
    )
    compile_transformer_blocks: bool = Field(
        False,
        description=(
            "compile the transformer block once with torch.compile (regional: one graph for all blocks, dynamic "
            "token counts, no recompiles across buckets); costs a compile of a minute or more at the start; not "
            "with blocks_to_swap or offload_activations"
        ),
    )
    base_model_precision: BaseModelPrecision = Field(
        "no_change",
        description=(
            "`int8-quanto`, `int4-quanto`, `int2-quanto`, `fp8-quanto` (optimum-quanto, weight-only), `nf4-bnb` "
            "(bitsandbytes, CUDA only), `fp8-native` (frozen weights in float8 e4m3 with per-channel scales, "
            "forward and input-gradient matmuls in fp8 (`torch._scaled_mm`, Ada/Hopper GPUs; a float32 "
            "emulation elsewhere); best with compile_transformer_blocks)"
        ),
    )
    quantize_via: Literal["cpu", "accelerator"] = Field(
        "accelerator",
        description="`cpu`: quantise before moving to the GPU",
    )
    quantize_activations: bool = Field(False, description="quanto int8 activations")
    # GPU-memory savers (trainer/memory.py): the same arithmetic, a few % slower; with int8 they fit 24 GB
    offload_activations: bool = Field(
        False,
        description=(
            "GPU only: what the forward saves for backward (with gradient checkpointing: each block's input, "
            "3.3 GiB for the 20B model at 1 reference) waits in pinned CPU memory; same results, about 3% "
            "slower"
        ),
    )
    offload_optimizer_state: bool = Field(
        False,
        description=(
            "GPU only: the AdamW state waits in pinned CPU memory between steps (0.7 GiB at rank 32); same "
            "results, a few % slower; not with `adamw8bit` or FSDP. With `int8-quanto`, gradient "
            "checkpointing and both offloads the 20B model trains in 24 GB (benchmarks/README.md)"
        ),
    )
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
    output_dir: str = Field(
        "output/models",
        description="one folder per run (`<run name>/`: LoRA, checkpoints, manifest, validation report) and `latest`, "
        "a link to the run that finished training last",
    )
    allow_paths_outside_root: bool = Field(
        False,
        description=(
            "relative paths (and the cache folders named after dataset ids) must stay inside the project root after "
            "'..' and symlinks are followed; true lifts that (absolute paths are never restricted)"
        ),
    )
    checkpointing_steps: int = Field(500, ge=1, description="save a resumable checkpoint every N optimiser steps")
    checkpoints_total_limit: int | None = Field(None, ge=1, description="keep the newest N checkpoints")
    resume_from_checkpoint: str | None = Field(
        None,
        description="`latest` or a checkpoint folder; resumes LoRA, optimiser, scheduler and step",
    )
    max_nonfinite_steps: int = Field(
        0,
        ge=0,
        le=MAX_COUNT,
        description=(
            "a NaN/inf loss or gradient stops the run at once (naming the step and sample, keeping the last good "
            "checkpoint, writing no LoRA, exit status non-zero); N > 0 instead skips up to N such steps (no update) "
            "and stops at the next one, at the cost of one host sync per step"
        ),
    )

    # EMA of the LoRA weights
    use_ema: bool = Field(
        False,
        description="keep an EMA of the LoRA weights; saved beside the LoRA in `lora/ema/` and in checkpoints",
    )
    ema_device: Literal["cpu", "accelerator"] = Field(
        "cpu",
        description="`cpu` (default: no GPU memory) or `accelerator`",
    )
    ema_decay: float = Field(
        0.999, gt=0, lt=1,
        description="diffusers' `EMAModel` decay (warms up over the first steps)",
    )

    # validation
    validation_prompt: str | None = Field(
        None,
        description=(
            "validation edits every eval pair with its own caption; this instruction is also applied to the "
            "first pair's references (an extra row, unscored: it has no target)"
        ),
    )
    validation_negative_prompt: str = Field(" ", description="encoded with the same references, as the pipeline does")
    validation_resolution: str = Field("1024x1024", description="`WIDTHxHEIGHT` or one number; 24 GB cards: `768x768`")
    validation_guidance: float = Field(4.0, ge=0, description="true classifier-free guidance scale (3.5-4.5 typical)")
    validation_num_inference_steps: int = Field(30, ge=1, description="denoising steps of each validation edit")
    validation_step_interval: int | None = Field(
        None, ge=1,
        description=(
            "also validate every N steps during training (rank 0, the live LoRA vs the base); reports in "
            "`validation/step-N`, metrics and images in MLflow"
        ),
    )
    validation_seed: int = Field(0, description="seed of the validation edits' noise")

    # tracking
    report_to: Literal["mlflow", "none"] = Field("mlflow", description="`mlflow` or `none`")
    tracker_project_name: str = Field("qwen-edit", description="MLflow experiment")
    tracker_run_name: str | None = Field(None, description="MLflow run name")
    # promotion (trainer.tracking.registry): every validated LoRA becomes a version of this registered model
    registered_model_name: str | None = Field(
        None,
        description=(
            "MLflow registered model that holds the project's LoRAs, one version per validated training run "
            "(default: tracker_project_name, with `/` and `:` as `-`)"
        ),
    )
    promotion_metric: PromotionMetric = Field(
        "lora_latent_mse",
        description=(
            "validation mean that decides whether a new version takes the `champion` alias: `lora_latent_mse` "
            "(meaningful even for random-weight models), `lora_psnr`, `lora_ssim`, `lora_edit_success`, "
            "`lora_preservation`, `lora_pixel_shift`"
        ),
    )
    promotion_direction: Literal["auto", "higher", "lower"] = Field(
        "auto",
        description=(
            "which way promotion_metric is better: `auto` (the metric's own: lower for latent_mse and pixel_shift, "
            "higher for the PSNRs and SSIM), `higher` or `lower`"
        ),
    )
    promotion_margin: float = Field(
        0.0, ge=0,
        description=(
            "how much better than the champion, in promotion_metric's unit, a new version must be to take `champion` "
            "(else it gets `challenger`)"
        ),
    )

    # the Dagster code location (README "Projects", "Sweeps"); `qwen-edit train` trains the config as it is
    sweep: dict[str, list[Any]] | None = Field(
        None,
        description=(
            'a small grid of overrides, e.g. `{"learning_rate": [1e-4, 3e-4], "lora_rank": [4, 8]}`: in Dagster '
            "trained_lora and validation_report get one partition per combination (`learning_rate=1e-4;lora_rank=4`), "
            "each an MLflow run tagged `dagster_partition`, ranked by run_comparison on promotion_metric; every point "
            "is validated as `--set` would be; at most 32 points; keys the shared caches depend on (flavour, model, "
            "data, captions) cannot be swept"
        ),
    )
    dagster_pool: str = Field(
        "gpu",
        description=(
            "the Dagster concurrency pool of this project's GPU steps (caches, training, validation); projects on "
            "one GPU share `gpu` (one step at a time, dagster_home/dagster.yaml), a project on a card of its own "
            "names its own"
        ),
    )

    _notes: tuple[str, ...] = PrivateAttr(default=())  # SimpleTuner keys read without effect

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_numbers(cls, value: Any, info) -> Any:
        return no_bool_for_number(cls, info.field_name, value)

    @field_validator(*_RANGES)
    @classmethod
    def _within_bounds(cls, value: Any, info) -> Any:
        return in_range(value, *_RANGES[info.field_name])

    @field_validator(*_PATH_KEYS)
    @classmethod
    def _openable_path(cls, value: str | None) -> str | None:
        return path_text(value)

    @field_validator("tracker_project_name")
    @classmethod
    def _experiment_name(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the MLflow experiment name cannot be empty")
        return value

    @field_validator("sweep", mode="before")
    @classmethod
    def _sweep_grid(cls, value: Any) -> dict | None:
        from trainer.config.sweep import check_grid

        return None if value is None else check_grid(value, list(cls.model_fields))

    @field_validator("dagster_pool")
    @classmethod
    def _pool_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", value):
            raise ValueError(f"{value!r}: a pool name is 1 to 64 letters, digits, '_' or '-', e.g. 'gpu' or 'gpu_1'")
        return value

    @field_validator("registered_model_name")
    @classmethod
    def _model_name(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or "/" in value or ":" in value):
            raise ValueError("an MLflow registered model name must be non-empty and contain no '/' or ':'")
        return value

    @field_validator("validation_resolution", mode="before")
    @classmethod
    def _parse_resolution(cls, value: Any) -> str:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if isinstance(value, str) and (match := re.fullmatch(r"(\d+)(?:x(\d+))?", value.strip())):
            width, height = int(match[1]), int(match[2] or match[1])
            if 0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE:
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
        if not self.gradient_checkpointing and (self.gradient_checkpointing_interval > 1 or self.gradient_checkpointing_keep_attention):
            key = "gradient_checkpointing_interval" if self.gradient_checkpointing_interval > 1 else "gradient_checkpointing_keep_attention"
            raise ValueError(f"{key} chooses what gradient checkpointing keeps: set gradient_checkpointing: true, or remove {key}")
        if self.compile_transformer_blocks and (self.blocks_to_swap or self.offload_activations):
            other = "blocks_to_swap" if self.blocks_to_swap else "offload_activations"
            raise ValueError(
                f"compile_transformer_blocks cannot be combined with {other} (its hooks run inside the blocks' "
                f"compiled graph); choose one: set compile_transformer_blocks false or remove {other}"
            )
        if self.base_model_precision == "fp8-native" and self.quantize_activations:
            raise ValueError(
                "quantize_activations is quanto's int8 activations; fp8-native quantises activations to fp8 itself: "
                "remove quantize_activations or use an int8-quanto base"
            )
        if self.model_kwargs.match_target_res and get_flavour(self.model_flavour).is_21:
            raise ValueError(
                "model_kwargs.match_target_res is for edit-v2/v3; edit-2.1 always gives its references the target's "
                "area, as QwenImage21Pipeline gives them its output's (output_resolution). Remove the key."
            )
        if self.flow_use_uniform_schedule and self.flow_use_beta_schedule:
            raise ValueError(
                "flow_use_uniform_schedule and flow_use_beta_schedule each choose how u is drawn; set one of them "
                "(or neither, for the sigmoid schedule)"
            )
        if self.lora_type == "lycoris" and self.lycoris_config is None:
            raise ValueError(
                "lora_type 'lycoris' needs lycoris_config: the path of a LyCORIS JSON file such as "
                '{"algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 16, "full_matrix": true}'
            )
        if self.use_dora and self.lora_type == "lycoris":
            raise ValueError(
                "use_dora adds DoRA to a standard LoRA; peft's LoKr and LoHa have no DoRA. Set lora_type 'standard' "
                "with use_dora, or remove use_dora"
            )
        if self.use_dora and self.base_model_precision == "fp8-native":
            raise ValueError(
                "use_dora reads the frozen weights to normalise them, and fp8-native keeps them in float8 (peft's DoRA "
                "cannot add float8 and float32): use base_model_precision 'int8-quanto' or 'no_change' with use_dora"
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
    def model_registry_name(self) -> str:
        """The registered model of the project's LoRAs: registered_model_name, else tracker_project_name."""
        return self.registered_model_name or self.tracker_project_name.replace("/", "-").replace(":", "-")

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
