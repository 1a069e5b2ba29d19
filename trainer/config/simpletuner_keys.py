"""SimpleTuner keys that qwen-edit reads without needing them, so users' files load unchanged.

A SimpleTuner `config.json` or `multidatabackend.json` carries keys for features that have no
counterpart here (Hub uploads, webhooks, batch sizes of its encoders ...). Each such key is
listed with why it has no effect. It is accepted, with a note, when its value asks for nothing
that qwen-edit would silently not do; otherwise it is an error that says so. Keys that nobody
knows are still errors (the schemas forbid them), so a typo is never mistaken for one of these.
"""

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ForeignKey:
    """A SimpleTuner key with no effect in qwen-edit."""

    why: str  # what qwen-edit does instead
    accepts: tuple | None = None  # the values that mean the same here; None: any value

    def problem(self, key: str, value: Any) -> str | None:
        if self.accepts is None or value in self.accepts:
            return None
        allowed = " or ".join(repr(v) for v in self.accepts)
        return f"{key}={value!r} is not supported: {self.why}. Set it to {allowed} or remove it"


_NO_HUB = "qwen-edit does not upload to the Hugging Face Hub; publish output_dir/lora yourself"

TRAIN_KEYS: dict[str, ForeignKey] = {
    "write_batch_size": ForeignKey("cache files are written one per sample"),
    "disable_benchmark": ForeignKey("there is no startup benchmark"),
    "aspect_bucket_rounding": ForeignKey("bucket sides are rounded to multiples of 32, as the pipelines round theirs"),
    "num_eval_images": ForeignKey("validation edits every pair of the eval split"),
    "num_validation_images": ForeignKey("validation edits every pair of the eval split"),
    "webhook_config": ForeignKey("progress is reported to Dagster and MLflow"),
    "compress_disk_cache": ForeignKey("caches are uncompressed safetensors files"),
    "offload_during_startup": ForeignKey("encoders are loaded only while caching and freed before training"),
    "hub_model_id": ForeignKey(_NO_HUB),
    "push_to_hub": ForeignKey(_NO_HUB, (False,)),
    "push_checkpoints_to_hub": ForeignKey(_NO_HUB, (False,)),
    "validation_lycoris_strength": ForeignKey(
        "validation applies the adapter at full strength (scale it at inference with set_adapters)", (1, 1.0)
    ),
    "attention_mechanism": ForeignKey("the transformer uses PyTorch's scaled-dot-product attention", ("diffusers",)),
    "base_model_default_dtype": ForeignKey("unquantised base weights are kept in bf16", ("bf16",)),
    "validation_guidance_rescale": ForeignKey(
        "validation uses the pipeline's true CFG, which rescales to the conditional norm itself", (0, 0.0)
    ),
    "noise_offset": ForeignKey("flow-matching edit training adds no noise offset", (0, 0.0)),
    "validation_torch_compile": ForeignKey("validation runs eagerly", (False,)),
    "validation_prompt_library": ForeignKey("edits need reference images: validation uses the eval pairs (eval_dataset_id)"),
    "user_prompt_library": ForeignKey("edits need reference images: validation uses the eval pairs (eval_dataset_id)"),
}

DATASET_KEYS: dict[str, ForeignKey] = {
    "crop": ForeignKey("targets are centre-cropped to their bucket's aspect ratio (a few pixels at most, with crop_aspect 'preserve')"),
    "crop_style": ForeignKey("targets are centre-cropped", ("center", "centre")),
    "maximum_image_size": ForeignKey("images are resized straight to their bucket size"),
    "target_downsample_size": ForeignKey("images are resized straight to their bucket size"),
    "metadata_backend": ForeignKey("file lists come from scanning the folders", ("discovery",)),
    "skip_file_discovery": ForeignKey("folders are scanned on every manifest build (fast: 100k files in seconds)"),
    "preserve_data_backend_cache": ForeignKey("the manifest is rebuilt from the folders every time"),
    "scan_for_errors": ForeignKey("the pairing manifest always checks every file"),
    "hash_filenames": ForeignKey("cache files are named after their sample and keyed by content"),
    "write_batch_size": ForeignKey("cache files are written one per sample"),
    "vae_cache_clear_each_epoch": ForeignKey("VAE latents are cached once and reused", (False,)),
    "is_regularisation_data": ForeignKey("edit training has no regularisation datasets", (False,)),
    "probability": ForeignKey(
        "samples are drawn uniformly from all datasets; weight a dataset with repeats instead", (1, 1.0)
    ),
}

# Global defaults that SimpleTuner applies to every dataset entry that does not set its own.
DATASET_DEFAULT_KEYS = ("resolution", "resolution_type", "minimum_image_size", "crop_aspect")

KEY_ALIASES = {"checkpoint_step_interval": "checkpointing_steps"}  # SimpleTuner's newer name

# Values under another name: (key, SimpleTuner's value) -> (ours, what the note says)
VALUE_ALIASES: dict[tuple[str, str], tuple[str, str]] = {
    ("optimizer", "bnb-adamw8bit"): ("adamw8bit", "the same bitsandbytes AdamW8bit"),
    ("report_to", "tensorboard"): ("mlflow", "qwen-edit tracks runs in MLflow"),
    ("report_to", "wandb"): ("mlflow", "qwen-edit tracks runs in MLflow"),
}


@dataclass
class Translation:
    """A raw config with the foreign keys taken out, what was noted and what cannot be accepted."""

    raw: dict[str, Any]
    notes: list[str]
    problems: list[str]


def translate(raw: dict[str, Any], foreign: dict[str, ForeignKey], source: str, aliases: bool = False) -> Translation:
    """Take SimpleTuner-only keys out of `raw`; rename aliases (training config only)."""
    kept, notes, problems = {}, [], []
    for key, value in raw.items():
        if aliases and key in KEY_ALIASES:
            ours = KEY_ALIASES[key]
            if ours in raw and raw[ours] != value:
                problems.append(f"{key}={value!r} and {ours}={raw[ours]!r} disagree; they are one setting, keep {ours}")
            kept.setdefault(ours, value)
            continue
        if aliases and isinstance(value, str) and (key, value) in VALUE_ALIASES:
            ours, why = VALUE_ALIASES[key, value]
            notes.append(f"{source}: {key}={value!r} is read as {ours!r} ({why})")
            kept[key] = ours
            continue
        if key not in foreign:
            kept[key] = value
            continue
        spec = foreign[key]
        if problem := spec.problem(key, value):
            problems.append(problem)
        elif spec.accepts is None:  # a value among `accepts` means what qwen-edit does anyway: nothing to say
            notes.append(f"{source}: {key!r} (SimpleTuner) has no effect: {spec.why}")
    return Translation(kept, notes, problems)
