"""`accelerate launch -m trainer.train`'s own argument checks: one `error:` line, exit status 2."""

import pytest

from tests.conftest import write_small_project
from trainer.errors import ConfigError
from trainer.tracking.store import parse_tag
from trainer.train import main


def test_tags_are_key_value_pairs():
    assert parse_tag("team=vision") == ("team", "vision")
    assert parse_tag("note=a=b") == ("note", "a=b")  # only the first = splits
    assert parse_tag("empty=") == ("empty", "")


@pytest.mark.parametrize("text", ["novalue", "=vision", " =x"])
def test_a_malformed_tag_is_a_config_error_with_an_example(text):
    with pytest.raises(ConfigError, match="expected KEY=VALUE with a non-empty key, e.g. --tag team=vision"):
        parse_tag(text)


def test_a_malformed_tag_stops_the_entry_point_with_one_error_line(demo_root, tmp_path, capsys):
    config, data = write_small_project(tmp_path, demo_root / "demo" / "models")
    status = main(["--config", str(config), "--data", str(data), "--manifest", str(tmp_path / "manifest.json"),
                   "--project-root", str(tmp_path), "--tag", "novalue"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.strip().splitlines() == ["error: --tag 'novalue': expected KEY=VALUE with a non-empty key, e.g. --tag team=vision"]
