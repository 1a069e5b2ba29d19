"""Sweeps (trainer.config.sweep): the grid in the config, its points and their names, and every way a grid
is refused (one message naming the key or point and the fix)."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trainer.config.parsing import load_train_config, parse_override, parse_train_config
from trainer.config.schema import TrainConfig
from trainer.config.sweep import MAX_POINTS, SWEEP_FIXED_KEYS, sweep_points, value_text
from trainer.errors import ConfigError


def test_points_are_every_combination_the_first_key_varying_slowest():
    points = sweep_points({"learning_rate": [1e-4, 3e-4], "lora_rank": [4, 8]})
    assert [p.key for p in points] == [
        "learning_rate=1e-4;lora_rank=4", "learning_rate=1e-4;lora_rank=8",
        "learning_rate=3e-4;lora_rank=4", "learning_rate=3e-4;lora_rank=8",
    ]
    assert points[2].overrides == {"learning_rate": 3e-4, "lora_rank": 4}


@pytest.mark.parametrize(
    "value, text",
    [(1e-4, "1e-4"), (3e-4, "3e-4"), (2.5e-5, "2.5e-5"), (-1e-4, "-1e-4"), (1.2345678e-4, "1.2345678e-4"),
     (0.01, "0.01"), (0.5, "0.5"), (4.0, "4"), (1e20, "1e20"), (0.0, "0"), (4, "4"), (True, "true"),
     (None, "null"), ("cosine", "cosine")],
)  # fmt: skip
def test_values_are_named_as_people_write_them(value, text):
    assert value_text(value) == text


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_a_float_name_reads_back_as_the_same_float(value):
    assert float(value_text(value)) == value


def test_a_grid_in_the_config_file_is_kept_in_its_order(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{\n  // two ranks, then two rates\n  "sweep": {"lora_rank": [4, 8], "learning_rate": [1e-4, 3e-4]},\n}')
    config = load_train_config(path)
    assert list(config.sweep) == ["lora_rank", "learning_rate"]
    assert sweep_points(config.sweep)[1].key == "lora_rank=4;learning_rate=3e-4"


@pytest.mark.parametrize(
    "grid, message",
    [
        ({"lerning_rate": [1e-4]}, "'lerning_rate' is not a config key; did you mean 'learning_rate'?"),
        ({"model_flavour": ["edit-v1", "edit-v2"]}, "'model_flavour' cannot be swept: the caches depend on it"),
        ({"caption_dropout_probability": [0.0, 0.1]}, "'caption_dropout_probability' cannot be swept: the caches"),
        ({"output_dir": ["a", "b"]}, "'output_dir' cannot be swept: every point writes its own run folder"),
        ({"learning_rate": []}, "learning_rate: expected a non-empty list of values, e.g. [1e-4, 3e-4]"),
        ({"learning_rate": 1e-4}, "learning_rate: expected a non-empty list of values"),
        ({"learning_rate": [[1e-4]]}, "learning_rate: each value is a number, a string, true/false or null"),
        ({"learning_rate": [1e-4, 0.0001]}, "1e-4); list each value once"),
        ({"lr_scheduler": ["cosine", "a,b"]}, "'a,b' contains ',', which a point's name cannot hold"),
        ({"seed": list(range(MAX_POINTS + 1))}, f"{MAX_POINTS + 1} points, each a full training run; a sweep has at most {MAX_POINTS}"),
        ({"seed": list(range(8)), "lora_rank": [1, 2, 4, 8, 16]}, "8 x 5 = 40 points"),
        ([1e-4], "sweep"),
        ({}, 'expected an object of config keys, each with a list of values, e.g. {"learning_rate": [1e-4, 3e-4]}'),
    ],
)
def test_a_bad_grid_is_one_message_naming_the_key_and_the_fix(grid, message):
    with pytest.raises(ConfigError) as error:
        parse_train_config({"sweep": grid}, source="config.json")
    assert message in str(error.value)
    assert str(error.value).startswith("config.json: 1 problem(s)")


def test_a_non_finite_value_is_refused():
    with pytest.raises(ConfigError, match="learning_rate: inf is not a finite number"):
        parse_train_config({"sweep": {"learning_rate": [float("inf")]}})


@pytest.mark.parametrize(
    "grid, point, message",
    [
        ({"learning_rate": [1e-4, -3e-4]}, "learning_rate=-3e-4", "learning_rate=-0.0003: Input should be greater than 0"),
        ({"lr_scheduler": ["cosine", "cosin"]}, "lr_scheduler=cosin", "did you mean 'cosine'?"),
        ({"lora_rank": [4, True]}, "lora_rank=true", "expected a number, got true"),
        # a rule over two keys: only this combination breaks it
        ({"gradient_checkpointing": [True, False], "blocks_to_swap": [2]}, "gradient_checkpointing=false;blocks_to_swap=2",
         "blocks_to_swap=2 needs gradient_checkpointing: true"),
    ],
)
def test_every_point_is_validated_as_set_would_validate_it(tmp_path, grid, point, message):
    """The same override path as `--set`: the point's values land in the file's keys, then the whole config
    is validated; the error names the file and the point."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"learning_rate": 1e-3, "sweep": grid}))
    with pytest.raises(ConfigError) as error:
        load_train_config(path)
    text = str(error.value)
    assert text.startswith(f"{path} (sweep point {point}): 1 problem(s)") and message in text, text
    assert "fix the value in the config's `sweep`" in text


def test_the_keys_a_sweep_may_not_vary_are_config_keys():
    assert set(SWEEP_FIXED_KEYS) <= set(TrainConfig.model_fields)


def test_the_overrides_of_a_point_reach_the_trainer_as_set_reads_them(tmp_path):
    """training_command writes a point's values so that `--set` parses them back to the same values."""
    from trainer.workflow import load_project, training_command
    from tests.conftest import write_small_project

    config, data = write_small_project(tmp_path, tmp_path / "models", n_train=1)
    overrides = {"learning_rate": 3e-4, "use_ema": True, "validation_step_interval": None, "lr_scheduler": "cosine", "lora_rank": 8}
    command = training_command(load_project(config, data, tmp_path), overrides, num_processes=1)
    given_back = dict(parse_override(command[i + 1]) for i, arg in enumerate(command) if arg == "--set")
    assert given_back == overrides


def test_a_path_override_reaches_the_trainer_as_the_path_itself(tmp_path):
    """An output_dir handed in as a Path (as the tests and the assets do) is text on the command line, not JSON."""
    from trainer.workflow import load_project, training_command
    from tests.conftest import write_small_project

    config, data = write_small_project(tmp_path, tmp_path / "models", n_train=1)
    command = training_command(load_project(config, data, tmp_path), {"output_dir": tmp_path / "out"}, num_processes=1)
    assert command[command.index("--set") + 1] == f"output_dir={tmp_path / 'out'}"


_DERIVED = {  # TrainConfig properties the cache code reads, and the keys they come from
    "flavour": {"model_flavour"},
    "model_path": {"pretrained_model_name_or_path", "model_flavour"},
    "dataset_defaults": {"resolution", "resolution_type", "minimum_image_size", "crop_aspect"},
}


class _Recording:
    """A TrainConfig that records which of its attributes are read."""

    def __init__(self, config):
        object.__setattr__(self, "_config", config)
        object.__setattr__(self, "read", set())

    def __getattr__(self, name):
        self.read.add(name)
        return getattr(self._config, name)


def test_the_cache_keys_read_no_key_a_sweep_may_vary(tmp_path):
    """The points share the caches: every config key a cache file's key or path depends on must be one a sweep
    refuses. Recorded from the cache code itself, so a new cache-relevant key shows up here."""
    from tests.conftest import write_small_project
    from trainer.data.caches import sample_paths, text_key, vae_key
    from trainer.data.pairing import build_manifest
    from trainer.workflow import load_project

    config_path, data_path = write_small_project(tmp_path, tmp_path / "models", n_train=2, caption_dropout_probability=0.1)
    project = load_project(config_path, data_path, tmp_path)
    manifest, _ = build_manifest(project.dataset_config, project.config.flavour, project.config.eval_dataset_id)
    recording = _Recording(project.config)
    for row in manifest.to_dict("records"):
        sample_paths(project.dataset_config, recording, row)
        text_key(recording, project.dataset_config, row)
        vae_key(recording, project.dataset_config, row)
    read = set()
    for name in recording.read:
        read |= _DERIVED.get(name, {name})
    assert "caption_dropout_probability" in read  # the recording sees what the keys depend on
    assert read <= set(SWEEP_FIXED_KEYS), f"cache keys read sweepable config keys: {sorted(read - set(SWEEP_FIXED_KEYS))}"
