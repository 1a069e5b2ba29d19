"""Validation previews (`trainer/validation.py`): every eval pair edited and scored against its
target, and the config's `validation_prompt` applied to a pair's references as an extra row."""

import json
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import write_small_project
from trainer.evaluation.validation import PROMPT_ROW, run_validation
from trainer.workflow import check_data, load_project

EDIT_METRICS = ("latent_mse", "psnr", "ssim", "edit_success", "preservation", "pixel_shift", "shift_x", "shift_y")


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
        assert set(row.metrics) == {f"base_{m}" for m in EDIT_METRICS} and Path(row.target).is_file()
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


def test_the_report_scores_base_and_lora_side_by_side(demo_root, tmp_path):
    """Means and per-pair metrics as metric | base | LoRA tables in the HTML, the same numbers in report.json."""
    from trainer.evaluation.validation import ValidationRow, mean_metrics, metrics_table

    rows = [ValidationRow("a", "x", [], "t", metrics={"base_psnr": 10.0, "lora_psnr": 20.0, "base_pixel_shift": 1.0, "lora_pixel_shift": 3.0}),
            ValidationRow("b", "x", [], "t", metrics={"base_psnr": 12.0, "lora_psnr": 30.0, "base_pixel_shift": 0.0, "lora_pixel_shift": 0.0,
                                                      "base_edit_success": 5.0, "lora_edit_success": 25.0})]
    summary = mean_metrics(rows)
    assert summary == {"base_psnr": 11.0, "lora_psnr": 25.0, "base_pixel_shift": 0.5, "lora_pixel_shift": 1.5,
                       "base_edit_success": 5.0, "lora_edit_success": 25.0}  # a metric a pair lacks is averaged over the others
    table = metrics_table(summary)
    assert "<th>base</th><th>LoRA</th>" in table
    assert "<tr><td>psnr</td><td>11.0000</td><td><b>25.0000</b></td></tr>" in table  # higher is better
    assert "<tr><td>pixel_shift</td><td><b>0.5000</b></td><td>1.5000</td></tr>" in table  # lower is better

    project = load_project(*write_small_project(tmp_path, demo_root / "demo" / "models", n_eval=1), tmp_path)
    manifest, _ = check_data(project)
    report = run_validation(project.config, manifest, None, project.validation_dir)
    html = report.html_path.read_text()
    for name in ("edit_success", "preservation", "pixel_shift", "ssim"):
        assert f"<td>{name}</td>" in html
    saved = json.loads((project.validation_dir / "report.json").read_text())
    assert saved["summary"] == pytest.approx(report.summary)
