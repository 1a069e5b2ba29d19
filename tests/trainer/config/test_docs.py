"""The README's key tables are generated from the schemas' descriptions and kept equal to them."""

from typing import Literal

import pytest
from pydantic import BaseModel, Field

from tests.conftest import REPO
from trainer.config.docs import COMMAND, key_rows, key_table, main, render_readme
from trainer.config.schema import TrainConfig
from trainer.data.dataset_config import DatasetEntry


def test_the_readme_tables_are_the_generated_ones():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert render_readme(readme) == readme, f"README.md's key tables are out of date: run `{COMMAND}`"


@pytest.mark.parametrize("model", [TrainConfig, DatasetEntry])
def test_every_key_has_a_row_with_its_description(model):
    expected = set()
    for name, field in model.model_fields.items():
        nested = field.annotation if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel) else None
        expected |= {f"{name}.{sub}" for sub in nested.model_fields} if nested else {name}  # model_kwargs.x
    rows = {key: meaning for key, _, meaning in key_rows(model)}
    assert set(rows) == expected
    assert all(meaning.strip() for meaning in rows.values())


def test_defaults_are_shown_as_users_write_them():
    rows = {key: default for key, default, _ in key_rows(TrainConfig)}
    assert rows["learning_rate"] == "`1e-4`"
    assert rows["model_flavour"] == '`"edit-v1"`'
    assert rows["gradient_checkpointing"] == "`false`"
    assert rows["max_train_steps"] == "none"
    assert rows["model_kwargs.match_target_res"] == "`false`"
    assert rows["pretrained_model_name_or_path"] == "per flavour"  # the schema's shown_default
    assert {key: default for key, default, _ in key_rows(DatasetEntry)}["id"] == "required"


class _Undocumented(BaseModel):
    documented: int = Field(1, description="says what it does")
    bare: Literal["a", "b"] = "a"


def test_a_key_without_a_description_is_refused():
    with pytest.raises(ValueError, match="_Undocumented.bare has no Field\\(description=...\\)"):
        key_table(_Undocumented)


def test_a_pipe_in_a_description_does_not_split_the_cell():
    class Piped(BaseModel):
        choice: str = Field("x", description="`a|b` or c")

    assert key_table(Piped).splitlines()[-1] == "| `choice` | `\"x\"` | `a\\|b` or c |"


def test_the_command_rewrites_a_stale_readme_and_check_says_so(tmp_path, capsys):
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    stale = readme.replace("| `lora_rank` | `16` |", "| `lora_rank` | `8` |")
    assert stale != readme
    copy = tmp_path / "README.md"
    copy.write_text(stale, encoding="utf-8")
    assert main([str(copy), "--check"]) == 1
    assert COMMAND in capsys.readouterr().err
    assert main([str(copy)]) == 0
    assert copy.read_text(encoding="utf-8") == readme
    assert main([str(copy), "--check"]) == 0


def test_text_outside_the_markers_is_kept():
    text = "intro\n<!-- config-keys:begin -->\nSTALE ROW\n<!-- config-keys:end -->\nmiddle\n" \
           "<!-- dataset-keys:begin -->\n<!-- dataset-keys:end -->\noutro\n"
    rendered = render_readme(text)
    assert rendered.startswith("intro\n<!-- config-keys:begin -->\n") and rendered.endswith("-->\noutro\n")
    assert "\nmiddle\n" in rendered and "STALE ROW" not in rendered
    assert render_readme(rendered) == rendered
