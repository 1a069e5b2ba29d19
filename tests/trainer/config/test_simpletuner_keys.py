"""SimpleTuner files load unchanged (`trainer/simpletuner_keys.py`).

A user switching from SimpleTuner brings a `config.json` and `multidatabackend.json` full of
keys for features qwen-edit has no use for. Those load, and the user is told which keys had no
effect. A key whose value asks for something qwen-edit would not do is an error that says so,
and a misspelt key is still an unknown key.
"""

from pathlib import Path

import pytest

from trainer.config.parsing import load_train_config, parse_train_config
from trainer.data.dataset_config import load_dataset_config, parse_dataset_config
from trainer.errors import ConfigError
from trainer.model.flavours import FLAVOURS

V1 = FLAVOURS["edit-v1"]

# A config as SimpleTuner's Qwen-Image users write theirs (strings for numbers and booleans,
# its newer checkpoint key, tensorboard reporting, bucket and Hub settings), for an edit run.
SIMPLETUNER_CONFIG = """{
  // edit LoRA, 24 GB card
  "model_type": "lora", "model_family": "qwen_image", "model_flavour": "edit-v1", "lora_type": "standard",
  "lora_rank": 8, "lora_alpha": 8, "learning_rate": "1e-4", "gradient_checkpointing": "true",
  "--optimizer": "adamw_bf16", "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 100,
  "max_train_steps": 1000, "num_train_epochs": 0, "max_grad_norm": 0.01,
  "checkpoint_step_interval": 250, "checkpoints_total_limit": 5, "resume_from_checkpoint": "latest",
  "base_model_precision": "int8-quanto", "quantize_via": "cpu", "mixed_precision": "bf16",
  "validation_resolution": "768x768", "validation_guidance": 4.0, "validation_seed": 42,
  "validation_guidance_rescale": 0.0, "num_eval_images": 1,
  "resolution": 768, "resolution_type": "pixel_area", "minimum_image_size": 0, "aspect_bucket_rounding": 2,
  "vae_batch_size": 4, "disable_benchmark": false, "report_to": "tensorboard",
  "push_to_hub": false, "hub_model_id": "me/my-edit-lora", "webhook_config": "config/webhooks.json",
  "data_backend_config": "config/qwen_edit/multidatabackend.json",
}"""


def config_error(raw: dict) -> str:
    with pytest.raises(ConfigError) as info:
        parse_train_config(raw, "config.json")
    return str(info.value)


# --- the training config ------------------------------------------------------------------------


def test_a_simpletuner_config_loads_unchanged_with_its_values_read_the_simpletuner_way(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(SIMPLETUNER_CONFIG)
    config = load_train_config(path)
    assert config.learning_rate == 1e-4 and config.gradient_checkpointing is True  # strings, as SimpleTuner reads them
    assert config.checkpointing_steps == 250  # checkpoint_step_interval is SimpleTuner's newer name
    assert config.report_to == "mlflow"
    assert config.vae_batch_size == 4  # SimpleTuner's key, read (qwen-edit's default is 1): VAE caching batches
    assert config.dataset_defaults == {"resolution": 768, "resolution_type": "pixel_area", "minimum_image_size": 0}


def test_the_user_is_told_which_keys_had_no_effect_and_why(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(SIMPLETUNER_CONFIG)
    notes = "\n".join(load_train_config(path).notes)
    for key in ("aspect_bucket_rounding", "hub_model_id", "webhook_config", "num_eval_images", "disable_benchmark"):
        assert f"'{key}' (SimpleTuner) has no effect" in notes, key
    assert "report_to='tensorboard' is read as 'mlflow'" in notes
    # values that mean what qwen-edit does anyway are not worth a note
    for quiet in ("push_to_hub", "lora_type", "validation_guidance_rescale"):
        assert quiet not in notes
    assert parse_train_config({"model_flavour": "edit-v2"}).notes == ()


@pytest.mark.parametrize(
    "key, value, reason",
    [
        ("validation_lycoris_strength", 0.5, "full strength"),
        ("push_to_hub", True, "does not upload to the Hugging Face Hub"),
        ("validation_guidance_rescale", 0.7, "true CFG"),
        ("noise_offset", 0.1, "no noise offset"),
    ],
)
def test_a_value_asking_for_what_qwen_edit_does_not_do_is_an_error_saying_so(key, value, reason):
    message = config_error({"model_flavour": "edit-v1", key: value})
    assert f"{key}={value!r} is not supported" in message and reason in message


def test_a_typo_is_still_an_unknown_key_and_every_problem_is_listed_at_once():
    message = config_error({"lora_rnak": 4, "push_to_hub": True, "vae_batch_size": 1})
    assert "2 problem(s)" in message
    assert "unknown key 'lora_rnak': did you mean 'lora_rank'?" in message
    assert "push_to_hub=True is not supported" in message


def test_both_names_of_the_checkpoint_interval_must_agree():
    assert parse_train_config({"checkpoint_step_interval": 100, "checkpointing_steps": 100}).checkpointing_steps == 100
    message = config_error({"checkpoint_step_interval": 100, "checkpointing_steps": 200})
    assert "checkpoint_step_interval=100 and checkpointing_steps=200 disagree" in message


def test_simpletuner_optimizer_names_of_the_same_optimizer_are_read_as_ours():
    config = parse_train_config({"optimizer": "bnb-adamw8bit"})
    assert config.optimizer == "adamw8bit"
    assert "optimizer='bnb-adamw8bit' is read as 'adamw8bit'" in config.notes[0]
    assert "valid: adamw, adamw8bit, adamw_bf16" in config_error({"optimizer": "optimi-lion"})  # no equivalent here


# --- the dataset config ---------------------------------------------------------------------------


def edit_entries(**edit_fields) -> list[dict]:
    return [
        {"id": "edits", "type": "local", "instance_data_dir": "data/edited", "conditioning_data": ["refs"], **edit_fields},
        {"id": "refs", "type": "local", "dataset_type": "conditioning", "instance_data_dir": "data/refs"},
        {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text"},
    ]


def test_a_simpletuner_dataset_entry_loads_with_its_extra_fields_noted(tmp_path):
    path = tmp_path / "multidatabackend.json"
    path.write_text(
        """[
      {"id": "edits", "type": "local", "instance_data_dir": "data/edited", "conditioning_data": ["refs"],
       "crop": true, "crop_style": "center", "crop_aspect": "square", "maximum_image_size": 1024,
       "target_downsample_size": 1024, "metadata_backend": "discovery", "skip_file_discovery": "",
       "is_regularisation_data": false, "repeats": 2, "minimum_image_size": 256, "resolution": 512},
      {"id": "refs", "type": "local", "dataset_type": "conditioning", "instance_data_dir": "data/refs",
       "conditioning_type": "reference_strict"},
      {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": true,
       "cache_dir": "cache/text", "write_batch_size": 16},
    ]"""
    )
    config = load_dataset_config(path, V1, base_dir=tmp_path)
    edits = config.by_id("edits")
    assert (edits.crop_aspect, edits.repeats, edits.minimum_image_size, edits.resolution) == ("square", 2, 256, 512)
    notes = "\n".join(config.notes)
    for key in ("crop", "maximum_image_size", "target_downsample_size", "skip_file_discovery", "write_batch_size"):
        assert f"'{key}' (SimpleTuner) has no effect" in notes, key
    assert "(id 'edits')" in notes and "(id 'text-embeds')" in notes  # each note names its entry


@pytest.mark.parametrize(
    "key, value, reason",
    [
        ("metadata_backend", "parquet", "file lists come from scanning the folders"),
        ("probability", 0.5, "weight a dataset with repeats instead"),
        ("crop_style", "random", "centre-cropped"),
        ("is_regularisation_data", True, "no regularisation datasets"),
        ("vae_cache_clear_each_epoch", True, "cached once"),
    ],
)
def test_a_dataset_field_asking_for_other_behaviour_is_an_error_naming_the_entry(key, value, reason):
    with pytest.raises(ConfigError) as info:
        parse_dataset_config(edit_entries(**{key: value}), "multidatabackend.json", V1, Path("/project"))
    message = str(info.value)
    assert message.startswith("multidatabackend.json entry 0 (id 'edits')")
    assert f"{key}={value!r} is not supported" in message and reason in message


def test_global_dataset_settings_are_defaults_for_the_entries_that_set_none():
    defaults = {"resolution": 512, "minimum_image_size": 256, "crop_aspect": "square"}
    entries = edit_entries()
    entries[1]["resolution"] = 768  # an entry's own value wins
    config = parse_dataset_config(entries, "multidatabackend.json", V1, Path("/project"), defaults)
    edits, refs = config.by_id("edits"), config.by_id("refs")
    assert (edits.resolution, edits.minimum_image_size, edits.crop_aspect) == (512, 256, "square")
    assert (refs.resolution, refs.crop_aspect) == (768, "square")
    assert config.by_id("text-embeds").minimum_image_size is None  # cache entries hold no images
