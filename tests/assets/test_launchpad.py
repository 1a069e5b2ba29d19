"""The Launchpad's training overrides: the config's own types, descriptions and current values; a choice
that does not exist is refused when the run is launched, not when it trains (issue 16 §10)."""

import typing

import dagster as dg
import pytest

from qwen_edit_assets.definitions import build_definitions
from qwen_edit_assets.launchpad import OVERRIDE_KEYS, override_tags, training_overrides_class
from qwen_edit_assets.resources import QwenEditProject
from trainer.config.schema import BaseModelPrecision, LrScheduler, TrainConfig
from trainer.model.flavours import FlavourName
from trainer.workflow import example_paths, load_project


def _preset():
    config, data = example_paths("qwen_image.edit-v2-lora")
    return config, data


def _config_fields(tmp_path) -> dict:
    config, data = _preset()
    job = build_definitions(QwenEditProject(root=str(tmp_path), config_path=str(config), data_path=str(data))).resolve_implicit_global_asset_job_def()
    ops = job.run_config_schema.config_type.fields["ops"].config_type
    return ops.fields["trained_lora"].config_type.fields["config"].config_type.fields


def test_every_field_is_the_config_key_with_its_description_and_current_value(tmp_path):
    config, data = _preset()
    current = load_project(config, data, tmp_path).config
    fields = _config_fields(tmp_path)
    assert set(fields) == set(OVERRIDE_KEYS) >= {"model_flavour", "gradient_accumulation_steps", "validation_num_inference_steps"}
    for key, field in fields.items():
        assert field.description == TrainConfig.model_fields[key].description, key
        assert field.default_value == getattr(current, key), key  # the scaffold shows what the config says


def test_fixed_choices_are_the_schemas_literals():
    overrides = training_overrides_class(TrainConfig()).model_fields
    assert overrides["base_model_precision"].annotation is BaseModelPrecision
    assert overrides["lr_scheduler"].annotation is LrScheduler
    assert overrides["model_flavour"].annotation is FlavourName
    assert set(typing.get_args(BaseModelPrecision)) >= {"int8-quanto", "nf4-bnb"}


def test_an_unknown_precision_is_refused_at_launch(tmp_path):
    config, data = _preset()
    job = build_definitions(QwenEditProject(root=str(tmp_path), config_path=str(config), data_path=str(data))).resolve_implicit_global_asset_job_def()
    with dg.DagsterInstance.ephemeral() as instance, pytest.raises(dg.DagsterInvalidConfigError, match="int9-quanto") as refused:
        job.execute_in_process(instance=instance, run_config={"ops": {"trained_lora": {"config": {"base_model_precision": "int9-quanto"}}}})
    assert "base_model_precision" in str(refused.value)
    assert not (tmp_path / "outputs").exists()  # refused before any step ran


def test_only_changed_fields_are_overrides_and_become_run_tags():
    config = TrainConfig(max_train_steps=100, learning_rate=1e-4)
    overrides = training_overrides_class(config)
    assert overrides().as_overrides() == {}
    assert overrides(max_train_steps=100, learning_rate=5e-5, lr_scheduler="cosine").as_overrides() == {"learning_rate": 5e-5, "lr_scheduler": "cosine"}
    assert override_tags("edit-v2", {"learning_rate": 5e-5}) == {"qwen-edit/flavour": "edit-v2", "qwen-edit/learning_rate": "5e-05"}
