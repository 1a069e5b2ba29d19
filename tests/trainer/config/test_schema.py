"""The training config (`config.json`, SPEC §3): what users may write and what they are told when
it is wrong.

Every error is a ConfigError whose message names the key at fault and, where one is close,
the value or key the user probably meant.
"""

import json

import pytest

from trainer.cli import DEMO_DIR
from trainer.config.parsing import load_train_config, parse_override, parse_train_config
from trainer.config.schema import TrainConfig
from trainer.config.simpletuner_keys import DATASET_DEFAULT_KEYS
from trainer.data.dataset_config import load_dataset_config
from trainer.demo.trained_model import DEMO_NAME
from trainer.errors import ConfigError
from trainer.workflow import EXAMPLES_DIR

EXAMPLES = sorted(p.name for p in EXAMPLES_DIR.iterdir() if (p / "config.json").is_file())

# SPEC §3, the keys the guide relies on, with the guide's values.
GUIDE_KEYS = {
    "model_type": "lora",
    "model_family": "qwen_image",
    "model_flavour": "edit-v2",
    "train_batch_size": 1,
    "gradient_accumulation_steps": 4,
    "validation_resolution": "768x768",
    "validation_guidance": 4.0,
    "validation_num_inference_steps": 30,
    "validation_step_interval": 250,
    "mixed_precision": "bf16",
    "gradient_checkpointing": True,
    "base_model_precision": "int8-quanto",
    "quantize_via": "cpu",
    "quantize_activations": False,
    "flow_schedule_shift": 1.73,
    "caption_dropout_probability": 0.0,
    "data_backend_config": "config/qwen_edit/multidatabackend.json",
    "model_kwargs": {"match_target_res": True},
    "eval_dataset_id": "edits-eval",
}
# SPEC §3, the SimpleTuner keys users bring along, with the same names and meanings.
SIMPLETUNER_KEYS = {
    "pretrained_model_name_or_path": "/models/qwen-image-edit-2509",
    "output_dir": "output/my-lora",
    "max_train_steps": 3000,
    "num_train_epochs": 0,
    "learning_rate": 1e-4,
    "lr_scheduler": "cosine",
    "lr_warmup_steps": 100,
    "optimizer": "adamw_bf16",
    "lora_rank": 32,
    "lora_alpha": 16,
    "seed": 7,
    "checkpointing_steps": 500,
    "checkpoints_total_limit": 3,
    "resume_from_checkpoint": "latest",
    "use_ema": True,
    "ema_device": "cpu",
    "validation_prompt": "make the square blue",
    "validation_negative_prompt": "blurry",
    "report_to": "mlflow",
}


def config_error(raw: dict) -> str:
    """The message a user sees for `raw`; fails the test if the config is accepted."""
    with pytest.raises(ConfigError) as info:
        parse_train_config(raw)
    return str(info.value)


# --- every key parses ------------------------------------------------------------------


def test_every_guide_and_simpletuner_key_parses_to_the_value_given():
    config = parse_train_config({**GUIDE_KEYS, **SIMPLETUNER_KEYS})
    for key, value in {**GUIDE_KEYS, **SIMPLETUNER_KEYS}.items():
        if key == "model_kwargs":
            assert config.model_kwargs.match_target_res is True
        else:
            assert getattr(config, key) == value, key


def test_the_spec_key_lists_cover_the_whole_schema_except_documented_extras():
    """A key added to the schema without a test of its parsing shows up here."""
    extras = {
        "max_grad_norm", "ema_decay", "validation_seed", "tracker_project_name", "tracker_run_name",
        "scheduled_sampling_probability", "scheduled_sampling_max_step_offset", "scheduled_sampling_steps",
        *DATASET_DEFAULT_KEYS,  # tests/trainer/test_simpletuner_keys.py
        "offload_activations", "offload_optimizer_state",  # tests/gpu/test_memory.py, below
        "allow_paths_outside_root",  # tests/trainer/test_paths.py
        "gradient_checkpointing_interval", "gradient_checkpointing_keep_attention", "attention_backend",
        "compile_transformer_blocks",  # tests/trainer/model/test_speed.py, tests/gpu/test_speed_levers.py
        "blocks_to_swap",  # tests/trainer/model/test_block_swap.py, tests/gpu/test_block_swap.py
        "max_nonfinite_steps",  # tests/trainer/training/test_guards.py
        "lora_type", "lycoris_config", "use_dora",  # tests/trainer/model/test_adapters.py, test_adapter_training.py
        "flow_schedule_auto_shift", "flow_sigmoid_scale", "flow_use_uniform_schedule", "flow_use_beta_schedule",
        "flow_beta_schedule_alpha", "flow_beta_schedule_beta",  # tests/trainer/training/test_flow_matching.py
        "masked_loss_probability",  # tests/trainer/training/test_masked_loss.py
        "sweep", "dagster_pool",  # tests/trainer/config/test_sweep.py, tests/assets/test_projects.py
        "registered_model_name", "promotion_metric", "promotion_direction", "promotion_margin",  # tests/trainer/tracking/test_promotion.py
        "vae_batch_size", "cache_workers",  # tests/trainer/data/test_cache_speed.py
    }  # fmt: skip
    assert set(TrainConfig.model_fields) == set(GUIDE_KEYS) | set(SIMPLETUNER_KEYS) | extras


def test_a_config_file_may_carry_comments_trailing_commas_and_dash_dash_keys(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(
        """// my Qwen edit run
        {
          "--model_flavour": "edit-v2",   // SimpleTuner's command-line spelling
          /* a block comment */
          "--learning_rate": 5e-5,
          "lora_rank": 8,
        }
        """
    )
    config = load_train_config(path)
    assert (config.model_flavour, config.learning_rate, config.lora_rank) == ("edit-v2", 5e-5, 8)


def test_dash_dash_keys_are_accepted_in_a_dict_too():
    config = parse_train_config({"--seed": 3, "--lora_rank": 4})
    assert (config.seed, config.lora_rank) == (3, 4)


def test_overrides_win_over_the_file_even_when_the_file_uses_dash_dash(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"--learning_rate": 1e-4, "seed": 1}')
    config = load_train_config(path, overrides={"learning_rate": 3e-4})
    assert (config.learning_rate, config.seed) == (3e-4, 1)


def test_a_missing_or_malformed_file_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.json: file not found"):
        load_train_config(tmp_path / "nope.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"seed": 1,,}')
    with pytest.raises(ConfigError, match=r"broken\.json: not valid JSON"):
        load_train_config(broken)
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        load_train_config(listed)


# --- errors name the key and suggest the fix ----------------------------------------------


@pytest.mark.parametrize(
    "typo, meant",
    [("learning_rat", "learning_rate"), ("optimiser", "optimizer"), ("--lora_rnak", "lora_rank")],
)
def test_an_unknown_key_is_named_with_the_closest_valid_key(typo, meant):
    message = config_error({typo: 1})
    assert f"unknown key {typo.removeprefix('--')!r}" in message
    assert f"did you mean {meant!r}?" in message


def test_an_unknown_key_inside_model_kwargs_suggests_the_nested_key():
    message = config_error({"model_flavour": "edit-v2", "model_kwargs": {"match_target_ress": True}})
    assert "did you mean 'match_target_res'?" in message


@pytest.mark.parametrize(
    "key, bad, meant",
    [
        ("base_model_precision", "int8_quanto", "int8-quanto"),
        ("base_model_precision", "nf4", "nf4-bnb"),
        ("model_flavour", "edit_v2", "edit-v2"),
        ("lr_scheduler", "cosin", "cosine"),
        ("quantize_via", "accelerater", "accelerator"),
    ],
)
def test_a_value_outside_a_fixed_set_suggests_the_closest_valid_value(key, bad, meant):
    message = config_error({key: bad})
    assert f"{key}={bad!r} is not valid" in message
    assert f"did you mean {meant!r}?" in message


def test_a_value_far_from_every_option_lists_the_valid_values():
    message = config_error({"quantize_via": "disk"})
    assert "quantize_via='disk' is not valid: valid: accelerator, cpu" in message


def test_every_problem_of_a_config_is_reported_at_once():
    message = config_error({"learning_rat": 1, "base_model_precision": "int8_quanto", "lora_rank": 0})
    assert "3 problem(s)" in message
    assert "learning_rat" in message and "int8_quanto" in message and "lora_rank=0" in message


def test_train_batch_size_above_one_is_refused_pointing_at_gradient_accumulation():
    message = config_error({"train_batch_size": 4, "gradient_accumulation_steps": 2})
    assert "train_batch_size=4" in message
    # the same effective batch of 8, the way these models can train
    assert "gradient_accumulation_steps=8" in message and "train_batch_size=1" in message


def test_match_target_res_is_refused_for_edit_v1():
    message = config_error({"model_flavour": "edit-v1", "model_kwargs": {"match_target_res": True}})
    assert "match_target_res" in message and "edit-v2" in message
    for flavour in ("edit-v2", "edit-v3"):
        config = parse_train_config({"model_flavour": flavour, "model_kwargs": {"match_target_res": True}})
        assert config.model_kwargs.match_target_res


# --- validation_resolution ----------------------------------------------------------------


@pytest.mark.parametrize(
    "given, stored, size",
    [
        ("768", "768x768", (768, 768)),
        (1024, "1024x1024", (1024, 1024)),
        ("768x512", "768x512", (768, 512)),
        (" 1024x768 ", "1024x768", (1024, 768)),
    ],
)
def test_validation_resolution_accepts_an_edge_or_width_x_height(given, stored, size):
    config = parse_train_config({"validation_resolution": given})
    assert config.validation_resolution == stored
    assert config.validation_size == size  # (width, height)


@pytest.mark.parametrize("bad", ["big", "768x", "x512", "768*512", 1024.5, None])
def test_validation_resolution_refuses_anything_else_with_an_example(bad):
    message = config_error({"validation_resolution": bad})
    assert "validation_resolution" in message and "'1024x1024'" in message


@pytest.mark.parametrize("bad", [True, "0", "0x512"])
def test_validation_resolution_refuses_booleans_and_zero_sizes(bad):
    config_error({"validation_resolution": bad})


# --- defaults and derived values -----------------------------------------------------------


@pytest.mark.parametrize(
    "flavour, hub_id",
    [
        ("edit-v1", "Qwen/Qwen-Image-Edit"),
        ("edit-v2", "Qwen/Qwen-Image-Edit-2509"),
        ("edit-v3", "Qwen/Qwen-Image-Edit-2511"),
    ],
)
def test_the_model_path_defaults_to_the_flavours_hub_checkpoint(flavour, hub_id):
    assert parse_train_config({"model_flavour": flavour}).model_path == hub_id
    local = parse_train_config({"model_flavour": flavour, "pretrained_model_name_or_path": "/models/mine"})
    assert local.model_path == "/models/mine"


def test_defaults_match_the_guide():
    config = parse_train_config({})
    assert config.model_flavour == "edit-v1"
    assert config.train_batch_size == 1
    assert config.caption_dropout_probability == 0.0  # keep the edit instruction
    assert (config.use_ema, config.ema_device) == (False, "cpu")  # EMA, when on, lives on the CPU
    assert config.model_kwargs.match_target_res is False
    assert config.validation_size == (1024, 1024)


def test_lora_alpha_defaults_to_the_rank():
    assert parse_train_config({"lora_rank": 32}).lora_scale_alpha == 32.0
    assert parse_train_config({"lora_rank": 32, "lora_alpha": 8}).lora_scale_alpha == 8.0


@pytest.mark.parametrize(
    "keys, samples, steps",
    [
        ({"max_train_steps": 500}, 100, 500),  # max_train_steps wins...
        ({"max_train_steps": 500, "num_train_epochs": 3}, 100, 500),  # ...over epochs
        ({"num_train_epochs": 3}, 100, 300),  # else epochs x samples
        ({"num_train_epochs": 3, "gradient_accumulation_steps": 4}, 100, 75),  # / accumulation
        ({"max_train_steps": 0, "num_train_epochs": 2}, 10, 20),  # 0 means "not set"
        ({}, 10, 10),  # neither: one epoch
        ({"gradient_accumulation_steps": 8}, 3, 1),  # never zero steps
    ],
)
def test_resolved_max_train_steps(keys, samples, steps):
    assert parse_train_config(keys).resolved_max_train_steps(samples) == steps


# --- command-line overrides ---------------------------------------------------------------


@pytest.mark.parametrize(
    "text, pair",
    [
        ("learning_rate=1e-4", ("learning_rate", 1e-4)),
        ("--gradient_checkpointing=true", ("gradient_checkpointing", True)),
        ("lora_rank=16", ("lora_rank", 16)),
        ("validation_resolution=768x512", ("validation_resolution", "768x512")),  # not JSON: kept as text
        ("resume_from_checkpoint=latest", ("resume_from_checkpoint", "latest")),
        ("validation_prompt=make a=b", ("validation_prompt", "make a=b")),  # split at the first '='
        ('model_kwargs={"match_target_res": true}', ("model_kwargs", {"match_target_res": True})),
        ("tracker_run_name=null", ("tracker_run_name", None)),
    ],
)
def test_parse_override(text, pair):
    assert parse_override(text) == pair


def test_an_override_without_equals_is_refused_with_an_example():
    with pytest.raises(ConfigError, match="expected key=value, e.g. learning_rate=1e-4"):
        parse_override("learning_rate")


def test_parsed_overrides_validate_like_file_keys(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_flavour": "edit-v2"}))
    overrides = dict(parse_override(o) for o in ("--lora_rank=4", "validation_resolution=512"))
    config = load_train_config(path, overrides)
    assert (config.lora_rank, config.validation_size) == (4, (512, 512))
    with pytest.raises(ConfigError, match="did you mean 'lora_rank'"):
        load_train_config(path, dict([parse_override("lora_rnak=4")]))


# --- the bundled presets --------------------------------------------------------------------


def test_there_is_a_preset_per_documented_example():
    assert {"qwen_image.edit-v1-lora", "qwen_image.edit-v2-lora"} <= set(EXAMPLES)


@pytest.mark.parametrize("name", EXAMPLES)
def test_every_bundled_preset_validates(name, tmp_path):
    config = load_train_config(EXAMPLES_DIR / name / "config.json")
    data = load_dataset_config(EXAMPLES_DIR / name / "multidatabackend.json", config.flavour, base_dir=tmp_path)
    # the preset trains a model that `ensure_demo` puts under the project root: edit-v2 the shipped trained one
    model = DEMO_NAME if config.model_flavour == "edit-v2" else f"tiny-{config.model_flavour}"
    assert data.resolve(config.model_path) == tmp_path / DEMO_DIR / "models" / model
    assert config.eval_dataset_id is not None
    assert data.by_id(config.eval_dataset_id).dataset_type == "image"
    for entry in data.image_entries:
        tset = data.training_set(entry, config.flavour)
        for folder in (tset.target_dir, *tset.reference_dirs):
            assert folder.is_relative_to(tmp_path / DEMO_DIR / "data"), folder


@pytest.mark.parametrize("name", EXAMPLES)
def test_every_bundled_preset_pairs_cleanly_on_the_demo_data(name, tmp_path):
    from trainer.data.pairing import build_manifest
    from trainer.demo.dataset import generate_demo_dataset

    demo = generate_demo_dataset(tmp_path / DEMO_DIR / "data", n_train=3, n_eval=1)  # as ensure_demo lays it out
    config = load_train_config(EXAMPLES_DIR / name / "config.json")
    data = load_dataset_config(EXAMPLES_DIR / name / "multidatabackend.json", config.flavour, base_dir=tmp_path)
    manifest, report = build_manifest(data, config.flavour, config.eval_dataset_id)
    assert manifest["split"].value_counts().to_dict() == {"train": demo.n_train, "eval": demo.n_eval}
    assert report.errors == [] and report.warnings == []


def test_a_dotted_override_sets_a_nested_key(tmp_path):
    from trainer.config.parsing import load_train_config, parse_override

    path = tmp_path / "config.json"
    path.write_text('{"model_flavour": "edit-v2"}')
    config = load_train_config(path, dict([parse_override("model_kwargs.match_target_res=true")]))
    assert config.model_kwargs.match_target_res is True


def test_epochs_round_up_to_whole_optimiser_steps():
    from trainer.config.parsing import parse_train_config

    config = parse_train_config({"num_train_epochs": 1, "gradient_accumulation_steps": 4})
    assert config.resolved_max_train_steps(10) == 3


def test_every_key_of_the_schema_is_documented_in_the_readme():
    from tests.conftest import REPO

    readme = (REPO / "README.md").read_text()
    missing = [key for key in TrainConfig.model_fields if f"`{key}`" not in readme and f"`{key}." not in readme]
    assert missing == []


def test_scheduled_sampling_is_off_by_default_and_bounded():
    config = parse_train_config({})
    assert config.scheduled_sampling_probability == 0.0
    assert "scheduled_sampling_probability" in config_error({"scheduled_sampling_probability": 1.5})


def test_the_optimizer_state_offload_is_for_torch_adamw_only():
    assert parse_train_config({"offload_optimizer_state": True, "optimizer": "adamw"}).offload_optimizer_state
    message = config_error({"offload_optimizer_state": True, "optimizer": "adamw8bit"})
    assert "offload_optimizer_state" in message and "adamw8bit" in message
