"""Validation previews (`trainer/validation.py`): every eval pair edited and scored against its
target, and the config's `validation_prompt` applied to a pair's references as an extra row."""

import json
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import write_small_project
from trainer.evaluation.validation import PROMPT_ROW, run_validation
from trainer.workflow import check_data, load_project


def test_validation_prompt_adds_an_unscored_row_on_the_first_pairs_references(demo_root, tmp_path):
    config_path, data_path = write_small_project(
        tmp_path, demo_root / "demo" / "models", n_eval=2, validation_prompt="make the background black"
    )
    project = load_project(config_path, data_path, tmp_path)
    manifest, _ = check_data(project)
    report = run_validation(project.config, manifest, None, project.validation_dir)  # the base model alone

    pairs, (prompt_row,) = report.rows[:-1], report.rows[-1:]
    assert [r.name for r in pairs] == list(manifest[manifest["split"] == "eval"]["name"])
    assert prompt_row.name == PROMPT_ROW and prompt_row.caption == "make the background black"
    assert [Image.open(p).size for p in prompt_row.references] == [Image.open(p).size for p in pairs[0].references]
    assert Image.open(prompt_row.base_image).size == project.config.validation_size
    assert prompt_row.target == "" and prompt_row.metrics == {}  # nothing to score against
    for row in pairs:
        assert set(row.metrics) == {"base_latent_mse", "base_psnr"} and Path(row.target).is_file()
    assert report.summary["base_psnr"] == pytest.approx(sum(r.metrics["base_psnr"] for r in pairs) / len(pairs))

    html = report.html_path.read_text()
    assert "make the background black" in html and Path(prompt_row.base_image).name in html
    saved = json.loads((project.validation_dir / "report.json").read_text())
    assert [r["name"] for r in saved["rows"]][-1] == PROMPT_ROW


def test_without_validation_prompt_the_report_holds_the_eval_pairs_only(demo_root, tmp_path):
    project = load_project(*write_small_project(tmp_path, demo_root / "demo" / "models", n_eval=1), tmp_path)
    manifest, _ = check_data(project)
    report = run_validation(project.config, manifest, None, project.validation_dir)
    assert [r.name for r in report.rows] == list(manifest[manifest["split"] == "eval"]["name"])
    assert all(r.metrics for r in report.rows)
