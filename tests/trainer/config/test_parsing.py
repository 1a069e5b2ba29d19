"""Choices for "did you mean" come from the schemas' Literal types: no hand-kept lists to drift."""

from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict

from trainer.config.parsing import literal_choices, parse_train_config, validate_model
from trainer.config.schema import TrainConfig
from trainer.data.dataset_config import DatasetEntry
from trainer.errors import ConfigError


def test_the_training_config_choices_are_its_literal_types():
    choices = literal_choices(TrainConfig)
    assert set(choices) >= {  # the keys of the hand list this replaced (new Literal keys join by themselves)
        "model_type", "model_family", "model_flavour", "resolution_type", "crop_aspect", "lr_scheduler",
        "optimizer", "mixed_precision", "base_model_precision", "quantize_via", "ema_device", "report_to",
    }
    assert choices["model_flavour"] == ("edit-v1", "edit-v2", "edit-v3", "edit-2.1")
    assert choices["resolution_type"] == ("pixel_area", "area", "pixel")  # from `ResolutionType | None`
    assert choices["mixed_precision"] == ("bf16", "fp16", "no")
    assert "seed" not in choices and "model_kwargs" not in choices  # not Literal-typed


def test_the_dataset_entry_choices_are_its_literal_types():
    choices = literal_choices(DatasetEntry)
    assert set(choices) >= {
        "type", "dataset_type", "caption_strategy", "resolution_type", "crop_aspect", "conditioning_type",
        "conditioning_multidataset_sampling",
    }
    assert choices["conditioning_multidataset_sampling"] == ("combined", "random")  # from `Literal[...] | None`


class _Nested(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["fast", "exact"] = "exact"


class _Toy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    colour: Literal["red", "green"] | None = None
    shapes: list[Literal["square", "circle"]] | None = None
    nested: _Nested = _Nested()


@pytest.mark.parametrize(
    "raw, line",
    [
        ({"colour": "gren"}, "colour='gren' is not valid: did you mean 'green'?"),
        ({"shapes": ["sqare"]}, "is not valid: did you mean 'square'?"),
        ({"nested": {"mode": "fats"}}, "nested.mode='fats' is not valid: did you mean 'fast'?"),
    ],
)
def test_a_new_literal_key_suggests_its_values_without_any_list_to_update(raw, line):
    with pytest.raises(ConfigError) as refused:
        validate_model(_Toy, raw, "toy.json", [])
    assert line in str(refused.value)


def test_a_training_config_value_outside_its_literal_suggests_the_closest():
    with pytest.raises(ConfigError, match="ema_device='acclerator' is not valid: did you mean 'accelerator'?"):
        parse_train_config({"ema_device": "acclerator"})
