"""Malformed input never ends in a traceback (issue 15 §5, issue 18 §8).

Property-based (hypothesis): any JSON-like value for any key of the training config or of a dataset
entry, any bytes as a config file, any `--set KEY=VALUE` text is either accepted or refused with a
ConfigError that names the file and the key. Accepted values are then used the way the later stages
use them (sizes, buckets, step counts, cache folders), so a value that passes the check but would
fail later fails here. Below them, the regression cases found by hand, each failed before the fix.
"""

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from trainer.config.parsing import load_train_config, parse_override, parse_train_config
from trainer.config.schema import TrainConfig
from trainer.config.simpletuner_keys import DATASET_KEYS, KEY_ALIASES, TRAIN_KEYS
from trainer.data.dataset_config import DatasetEntry, load_dataset_config, parse_dataset_config
from trainer.errors import ConfigError, QwenEditError
from trainer.model.flavours import get_flavour
from trainer.paths import outside_root_problems
from trainer.training.data_order import micro_step_generator, micro_step_sample, training_samples
from trainer.training.flow_matching import sample_sigma

EXAMPLES = int(os.environ.get("QWEN_EDIT_FUZZ_EXAMPLES", "150"))  # raise it for a longer hunt
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# JSON values as json5 hands them over, with the edges that broke things: huge integers, Infinity
# and NaN (json5 reads both), booleans where numbers go, odd strings (NUL, '..', '~user', long names).
EDGE_TEXT = st.sampled_from(["", " ", "..", "../../x", "~nosuchuser/x", "a\x00b", "a" * 300, "Infinity", "1e999", "-1", "true"])
EDGE_NUMBERS = st.sampled_from([0, -1, 0.5, 2**31, 2**32, 2**63, 2**64, 10**30, 1e308, -1e308, float("inf"), float("-inf"), float("nan")])
SCALARS = st.one_of(
    st.none(), st.booleans(), EDGE_NUMBERS, EDGE_NUMBERS, st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30), EDGE_TEXT,
)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                      max_leaves=8)

TRAIN_NAMES = sorted({*TrainConfig.model_fields, *TRAIN_KEYS, *KEY_ALIASES})
ENTRY_NAMES = sorted({*DatasetEntry.model_fields, *DATASET_KEYS})
ENTRY_NUMBERS_AND_PATHS = ["resolution", "minimum_image_size", "repeats", "id", "instance_data_dir", "cache_dir_vae"]
FLAVOUR = get_flavour("edit-v2")


def _named(message: str, key: str) -> bool:
    key = KEY_ALIASES.get(key.removeprefix("--"), key.removeprefix("--"))
    return key in message or repr(key)[1:-1] in message


def _use_like_training(config: TrainConfig) -> None:
    """What the later stages compute from an accepted config (its dataset defaults reach every entry)."""
    config.validation_size
    config.resolved_max_train_steps(samples_per_epoch=10)
    config.lora_scale_alpha
    config.model_path
    generator = micro_step_generator(config.seed, 0, 0)
    micro_step_sample(3, 4, config.seed, 1, 0)
    assert torch.isfinite(sample_sigma(config.flow_schedule_shift, generator))
    torch.Generator().manual_seed(config.validation_seed)
    try:
        datasets = parse_dataset_config(_entries({}, {}), "multidatabackend.json", config.flavour, defaults=config.dataset_defaults)
    except ConfigError:
        return
    for entry in datasets.image_entries:
        entry.bucket(1024, 768)


@FUZZ
@given(st.dictionaries(st.sampled_from(TRAIN_NAMES) | st.text(max_size=12), VALUES, max_size=4))
def test_any_training_config_is_accepted_or_refused_naming_the_file(raw):
    try:
        config = parse_train_config(raw, source="fuzz/config.json")
    except ConfigError as exc:
        event("refused")
        assert str(exc).startswith("fuzz/config.json")
    else:
        event("accepted")
        _use_like_training(config)


@FUZZ
@given(st.sampled_from(TRAIN_NAMES), VALUES)
def test_a_bad_value_of_one_training_key_is_refused_naming_that_key(key, value):
    try:
        config = parse_train_config({key: value}, source="config.json")
    except ConfigError as exc:
        event("refused")
        assert _named(str(exc), key), str(exc)
    else:
        event("accepted")
        _use_like_training(config)


def _entries(image: dict, reference: dict) -> list:
    return [
        {"id": "edits", "instance_data_dir": "data/edited", "conditioning_data": ["refs"], **image},
        {"id": "refs", "dataset_type": "conditioning", "instance_data_dir": "data/reference", **reference},
    ]


def _use_like_pairing(config, root: Path) -> None:
    """What pairing, caching and training compute from accepted entries: folders, buckets, the epoch."""
    for entry in config.image_entries:
        config.training_set(entry, FLAVOUR)
        for width, height in ((1, 1), (4000, 3), (3, 4000), (1024, 768)):
            assert min(entry.bucket(width, height)) >= 32
        manifest = pd.DataFrame([{"split": "train", "dataset_id": entry.id, "name": "0001"}])
        training_samples(manifest, config, TrainConfig(model_flavour=FLAVOUR.name))
    outside_root_problems(TrainConfig(), config, root)


@FUZZ
@given(st.dictionaries(st.sampled_from(ENTRY_NAMES) | st.sampled_from(ENTRY_NUMBERS_AND_PATHS), VALUES, max_size=3)
       | st.dictionaries(st.text(max_size=12), VALUES, max_size=2),
       st.dictionaries(st.sampled_from(ENTRY_NAMES), VALUES, max_size=2))
def test_any_dataset_entry_is_accepted_or_refused_naming_the_file_and_key(tmp_path_factory, image, reference):
    root = tmp_path_factory.getbasetemp()
    try:
        config = parse_dataset_config(_entries(image, reference), "fuzz/multidatabackend.json", FLAVOUR, base_dir=root)
    except ConfigError as exc:
        event("refused")
        message = str(exc)
        assert message.startswith("fuzz/multidatabackend.json")
        assert any(_named(message, key) for key in [*image, *reference]) or "entry" in message, message
    else:
        event("accepted")
        _use_like_pairing(config, root)


@FUZZ
@given(st.sampled_from(ENTRY_NAMES) | st.sampled_from(ENTRY_NUMBERS_AND_PATHS), VALUES, st.booleans())
def test_a_bad_value_of_one_dataset_field_is_refused_naming_that_field(tmp_path_factory, key, value, on_reference):
    root = tmp_path_factory.getbasetemp()
    image, reference = ({}, {key: value}) if on_reference else ({key: value}, {})
    try:
        config = parse_dataset_config(_entries(image, reference), "multidatabackend.json", FLAVOUR, base_dir=root)
    except ConfigError as exc:
        event("refused")
        assert _named(str(exc), key) or key in ("conditioning_data", "dataset_type", "disabled"), str(exc)
    else:
        event("accepted")
        _use_like_pairing(config, root)


@FUZZ
@given(st.lists(VALUES, max_size=3) | VALUES)
def test_any_dataset_config_shape_is_accepted_or_refused(raw):
    try:
        parse_dataset_config(raw, "fuzz/multidatabackend.json", FLAVOUR)
    except ConfigError as exc:
        event("refused")
        assert str(exc).startswith("fuzz/multidatabackend.json")


@FUZZ
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode)
       | VALUES.map(lambda v: json.dumps(v, allow_nan=True).encode()))
def test_any_file_content_is_read_or_refused_naming_the_file(tmp_path_factory, content):
    path = tmp_path_factory.getbasetemp() / "fuzz-config.json"
    path.write_bytes(content)
    try:
        load_train_config(path)
    except ConfigError as exc:
        event("refused")
        assert str(exc).startswith(str(path))
    try:
        load_dataset_config(path, FLAVOUR)
    except ConfigError as exc:
        assert str(exc).startswith(str(path))


DOTTED = st.lists(st.sampled_from([*TRAIN_NAMES, "model_flavour", "model_kwargs", "match_target_res", ""]) | st.text(max_size=6),
                  min_size=1, max_size=3).map(".".join)
OVERRIDE_TEXT = st.tuples(DOTTED | st.text(max_size=10), st.sampled_from(["=", "", "=="]),
                          st.text(max_size=20) | VALUES.map(json.dumps)).map("".join)


@FUZZ
@given(st.lists(OVERRIDE_TEXT, min_size=1, max_size=3))
def test_any_set_override_is_applied_or_refused_naming_the_key(tmp_path_factory, texts):
    path = tmp_path_factory.getbasetemp() / "override-base.json"
    path.write_text('{"model_flavour": "edit-v2", "model_kwargs": {"match_target_res": true}, "learning_rate": 1e-4, "seed": 1}')
    try:
        overrides = dict(parse_override(text) for text in texts)
        config = load_train_config(path, overrides)
    except ConfigError as exc:
        event("refused")
        assert "override" in str(exc) or str(exc).startswith(str(path)), str(exc)
    else:
        event("accepted")
        _use_like_training(config)


# --- the regression cases (issue 15's 15 tracebacks, issue 18 §8's values) ---------------------------


def refused(raw_or_call, *names: str) -> str:
    """The ConfigError message of a training config dict (or a call); every name must be in it."""
    with pytest.raises(ConfigError) as info:
        raw_or_call() if callable(raw_or_call) else parse_train_config(raw_or_call)
    message = str(info.value)
    for name in names:
        assert name in message, message
    return message


def test_a_config_file_that_is_not_utf8_names_the_file(tmp_path):
    (tmp_path / "config.json").write_bytes(b'{"learning_rate": 1e-4, "tracker_run_name": "\xff\xfe"}')
    refused(lambda: load_train_config(tmp_path / "config.json"), "config.json", "not UTF-8", "byte 45")


def test_a_config_path_that_is_a_folder_names_it(tmp_path):
    (tmp_path / "config.json").mkdir()
    refused(lambda: load_train_config(tmp_path / "config.json"), "config.json", "is a folder")


def test_a_config_path_in_a_symlink_loop_names_it(tmp_path):
    (tmp_path / "config.json").symlink_to(tmp_path / "config.json")
    refused(lambda: load_train_config(tmp_path / "config.json"), "config.json", "cannot be read")


@pytest.mark.parametrize("depth", [40, 300, 100_000])
def test_deeply_nested_json_is_refused_without_recursing(tmp_path, depth):
    (tmp_path / "config.json").write_text('{"model_kwargs": ' + "[" * depth + "]" * depth + "}")
    refused(lambda: load_train_config(tmp_path / "config.json"), "config.json", "nested more than 32 levels")
    refused(lambda: load_dataset_config(tmp_path / "config.json", get_flavour("edit-v1")), "nested more than 32 levels")


def test_nesting_inside_strings_and_comments_is_not_counted(tmp_path):
    (tmp_path / "config.json").write_text('// [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\n{"tracker_run_name": "' + "[" * 50 + '"}')
    assert load_train_config(tmp_path / "config.json").tracker_run_name == "[" * 50


@pytest.mark.parametrize("overrides, named", [
    ({"learning_rate.x": 1}, "'learning_rate' is 0.0001"),
    ({"lora_alpha": None, "lora_alpha.x": 1}, "'lora_alpha' is None"),
    ({"model_kwargs": [1], "model_kwargs.match_target_res": True}, "'model_kwargs' is [1]"),
    ({"model_kwargs..match_target_res": True}, "without empty parts"),
    ({"model_kwargs.": True}, "without empty parts"),
])
def test_a_dotted_override_into_a_non_object_names_the_key(tmp_path, overrides, named):
    (tmp_path / "config.json").write_text('{"learning_rate": 1e-4}')
    refused(lambda: load_train_config(tmp_path / "config.json", overrides), "override", named)


def test_an_override_with_a_deeply_nested_value_or_no_key_is_refused():
    refused(lambda: parse_override("model_kwargs=" + "[" * 5000), "override 'model_kwargs'", "nested")
    refused(lambda: parse_override("=1"), "key before '=' is missing")


@pytest.mark.parametrize("raw, key", [
    ({"learning_rate": float("inf")}, "learning_rate"),
    ({"learning_rate": float("nan")}, "learning_rate"),
    ({"flow_schedule_shift": float("inf")}, "flow_schedule_shift"),
    ({"max_grad_norm": float("inf")}, "max_grad_norm"),
    ({"seed": 2**64 + 1}, "seed"),
    ({"seed": -1}, "seed"),
    ({"validation_seed": 2**64}, "validation_seed"),
    ({"max_train_steps": 2**63}, "max_train_steps"),
    ({"learning_rate": True}, "learning_rate"),
    ({"max_train_steps": True}, "max_train_steps"),
    ({"lora_rank": False}, "lora_rank"),
    ({"validation_resolution": "100000x100000"}, "validation_resolution"),
    ({"output_dir": "o" * 300}, "output_dir"),
    ({"output_dir": "out\x00put"}, "output_dir"),
    ({"pretrained_model_name_or_path": "~nosuchuser123/model"}, "pretrained_model_name_or_path"),
    ({"tracker_project_name": " "}, "tracker_project_name"),
    ({"resolution": 1e308}, "resolution"),
])
def test_values_that_used_to_fail_later_are_refused_by_check(raw, key):
    refused(raw, key)


def test_json_infinity_as_users_write_it_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"learning_rate": Infinity, "flow_schedule_shift": -Infinity, "lora_alpha": NaN}')
    refused(lambda: load_train_config(tmp_path / "config.json"), "learning_rate", "flow_schedule_shift", "lora_alpha", "finite")


def test_booleans_stay_valid_for_boolean_keys():
    config = parse_train_config({"gradient_checkpointing": True, "use_ema": False, "model_kwargs": {"match_target_res": False}})
    assert config.gradient_checkpointing is True


def dataset_refused(*entry_changes: dict, named: tuple[str, ...]) -> str:
    image, reference = (list(entry_changes) + [{}])[:2]
    with pytest.raises(ConfigError) as info:
        parse_dataset_config(_entries(image, reference), "multidatabackend.json", get_flavour("edit-v1"))
    for name in named:
        assert name in str(info.value), str(info.value)
    return str(info.value)


@pytest.mark.parametrize("change, named", [
    ({"resolution": 0}, ("resolution=0", "greater than 0")),
    ({"resolution": -512}, ("resolution=-512",)),
    ({"resolution": float("nan")}, ("resolution", "finite")),
    ({"resolution": 1e308}, ("resolution=1e+308", "16384")),
    ({"resolution": 300, "resolution_type": "area"}, ("resolution=300", "area")),
    ({"resolution": True}, ("resolution", "expected a number")),
    ({"repeats": 2**63}, ("repeats",)),
    ({"minimum_image_size": float("inf")}, ("minimum_image_size",)),
    ({"instance_data_dir": "~nosuchuser123/data"}, ("instance_data_dir", "no such user")),
    ({"cache_dir_vae": "c" * 256}, ("cache_dir_vae", "255")),
    ({"id": "../../x"}, ("'../../x'", "plain name")),
    ({"id": "a/b"}, ("'a/b'",)),
    ({"id": ".."}, ("'..'",)),
])
def test_dataset_values_that_used_to_fail_later_are_refused(change, named):
    dataset_refused(change, named=named)


def test_a_project_root_in_a_symlink_loop_is_named(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(ConfigError, match="project root .*loop.*cannot be resolved"):
        parse_dataset_config(_entries({}, {}), "multidatabackend.json", get_flavour("edit-v1"), base_dir=tmp_path / "loop")


def test_every_config_error_is_a_qwen_edit_error():
    assert issubclass(ConfigError, QwenEditError)
