"""The Launchpad's training overrides: `ops: {trained_lora: {config: {...}}}`.

The fields are the training config's own (`trainer.config.schema.TrainConfig`): the same types (fixed
choices are its `Literal`s, so `base_model_precision: int9-quanto` is refused when the run is
launched), the same descriptions, and as defaults the values the project's config has when the
code location loads (Dagster loads it again for every run), so the Launchpad's scaffold shows
them. A field is an override when its value differs from that default; the others keep the config's.

Every asset of a run reads the same overrides (`run_overrides`): a flavour or a validation setting
changed here reaches the caches and the validation report too, not only the training.
"""

from typing import Any

import dagster as dg
from pydantic import Field, create_model

from trainer.config.schema import TrainConfig

OVERRIDE_OP = "trained_lora"
# the keys users change between runs; every one is a TrainConfig key
OVERRIDE_KEYS = (
    "model_flavour",
    "max_train_steps",
    "learning_rate",
    "lr_scheduler",
    "lr_warmup_steps",
    "gradient_accumulation_steps",
    "lora_rank",
    "lora_alpha",
    "base_model_precision",
    "seed",
    "validation_step_interval",
    "validation_resolution",
    "validation_num_inference_steps",
    "validation_guidance",
    "tracker_run_name",
)
TAG_PREFIX = "qwen-edit/"


class TrainingOverridesBase(dg.Config):
    """Launchpad overrides of the training config; a field left at its default keeps the config's value."""

    def as_overrides(self) -> dict[str, Any]:
        defaults = {name: field.default for name, field in type(self).model_fields.items()}
        return {key: value for key, value in self.model_dump().items() if value != defaults[key]}


def training_overrides_class(config: TrainConfig) -> type[TrainingOverridesBase]:
    """The Launchpad config class of a project whose training config is `config`."""
    fields = {}
    for key in OVERRIDE_KEYS:
        spec = TrainConfig.model_fields[key]
        fields[key] = (spec.annotation, Field(getattr(config, key), description=spec.description))
    return create_model("TrainingOverrides", __base__=TrainingOverridesBase, **fields)


def run_overrides(context: dg.AssetExecutionContext, config: TrainConfig, op_name: str = OVERRIDE_OP) -> dict[str, Any]:
    """The overrides this run's Launchpad config gives `trained_lora` (its op `op_name`: a project of a projects
    folder has its name in front), for any asset of the run: the keys set there whose values differ from
    `config` (the project's config, loaded as the run started)."""
    given = ((context.run.run_config.get("ops") or {}).get(op_name) or {}).get("config") or {}
    return {key: value for key, value in given.items() if key in OVERRIDE_KEYS and value != getattr(config, key)}


def load_for_run(
    context: dg.AssetExecutionContext,
    project,
    overrides: dict[str, Any] | None = None,
    op_name: str = OVERRIDE_OP,
    point: dict[str, Any] | None = None,
):
    """The project as this run sees it: `overrides`, or else the sweep `point`'s and the Launchpad's overrides
    applied. A bad config or override is a Failure carrying the trainer's one message (key, value, fix),
    not a traceback."""
    from trainer.errors import QwenEditError

    try:
        base = project.load()
        if overrides is None:
            overrides = {**(point or {}), **run_overrides(context, base.config, op_name)}
        return project.load(overrides) if overrides else base
    except QwenEditError as exc:
        raise dg.Failure(description=str(exc)) from None


def override_tags(flavour: str, overrides: dict[str, Any]) -> dict[str, str]:
    """Run tags: the flavour and each override, so the Runs list says what a run changed."""
    tags = {f"{TAG_PREFIX}flavour": flavour}
    tags.update({f"{TAG_PREFIX}{key}": str(value)[:200] for key, value in overrides.items()})
    return tags
