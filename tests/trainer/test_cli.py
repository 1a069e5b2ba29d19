"""`qwen-edit`, run as users run it: the console script in a subprocess."""

import json
import subprocess
import sys

import pytest

from tests.conftest import write_small_project

QWEN_EDIT = [sys.executable, "-m", "trainer.cli"]


def _run(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([*QWEN_EDIT, *args], cwd=cwd, capture_output=True, text=True)


def test_check_reports_a_bad_config_key_with_a_suggestion(tmp_path):
    (tmp_path / "config.json").write_text('{"model_flavour": "edit-v2", // comment\n "learning_rat": 1e-4}')
    result = _run("check", "--config", "config.json", "--data", "none.json", cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown key 'learning_rat': did you mean 'learning_rate'?" in result.stderr


def test_check_lists_every_bad_pair_before_any_encoding(demo_root, tmp_path):
    config, data = write_small_project(tmp_path, demo_root / "demo" / "models", n_train=4)
    (tmp_path / "data" / "train" / "reference" / "0001.png").unlink()
    (tmp_path / "data" / "train" / "edited" / "0002.txt").write_text("")
    result = _run("check", "--config", str(config), "--data", str(data), cwd=tmp_path)
    assert result.returncode == 2
    assert str(tmp_path / "data" / "train" / "reference" / "0001.png") + ": missing file" in result.stderr
    assert str(tmp_path / "data" / "train" / "edited" / "0002.txt") in result.stderr
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_train_preset_runs_check_cache_train_validate(demo_root):
    """The bundled edit-v2 preset end to end, shortened to two steps."""
    result = _run("train", "example=qwen_image.edit-v2-lora", "--set", "max_train_steps=2",
                  "--set", "output_dir=outputs/cli-preset", "--set", "report_to=none", cwd=demo_root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = demo_root / "outputs" / "cli-preset"
    assert json.loads((out / "training_summary.json").read_text())["steps"] == 2
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "validation" / "report.html").is_file()
    assert "1/4 checking data" in result.stdout and "4/4 validating" in result.stdout


@pytest.mark.slow
def test_train_edit_v1_on_a_small_dataset(demo_root, tmp_path):
    """edit-v1's reference goes in at ~1 MP like the pipeline's, so keep the dataset tiny."""
    config, data = write_small_project(tmp_path, demo_root / "demo" / "models", flavour="edit-v1", n_train=2, n_eval=1,
                                       max_train_steps=2)
    result = _run("train", "--config", str(config), "--data", str(data), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "validation" / "report.json").read_text())
    assert [r["name"] for r in report["rows"]] == ["0000"]
    embeds = list((tmp_path / "cache" / "conditioning_image_embeds" / "edits").glob("*.safetensors"))
    assert len(embeds) == 2  # edit-v1's default conditioning-image-embeds cache (SPEC §4)
