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
    """The bundled edit-v2 preset end to end, shortened to two steps, in a run folder named after the overrides."""
    result = _run("train", "example=qwen_image.edit-v2-lora", "--set", "max_train_steps=2",
                  "--set", "output_dir=outputs/cli-preset", "--set", "report_to=none", cwd=demo_root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    outputs = demo_root / "outputs" / "cli-preset"
    out = outputs / "edit-v2_max_train_steps-2"  # where the run goes (output_dir, report_to) is not in its name
    assert (outputs / "latest").resolve() == out.resolve()
    assert json.loads((out / "training_summary.json").read_text())["steps"] == 2
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "validation" / "report.html").is_file() and (out / "pairing_manifest.json").is_file()
    assert "1/4 checking data" in result.stdout and "4/4 validating" in result.stdout
    # it ends with what the run measured: the one final loss, and validation base vs LoRA
    assert "final_loss_mean_last_10pct: " in result.stdout
    lines = result.stdout.splitlines()
    means = lines[lines.index("validation means:") + 1:]
    assert means[0].split() == ["metric", "base", "LoRA"] and any(line.split()[0] == "latent_mse" for line in means[1:])


@pytest.mark.slow
def test_train_edit_v1_on_a_small_dataset(demo_root, tmp_path, monkeypatch):
    """edit-v1's reference goes in at ~1 MP like the pipeline's, so keep the dataset tiny. Named, tagged, twice:
    the second run never overwrites the first."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    config, data = write_small_project(tmp_path, demo_root / "demo" / "models", flavour="edit-v1", n_train=2, n_eval=1,
                                       max_train_steps=2, report_to="mlflow")
    for _ in range(2):
        result = _run("train", "--config", str(config), "--data", str(data), "--run-name", "v1 small", "--tag", "team=vision", cwd=tmp_path)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    first, second = tmp_path / "out" / "v1-small", tmp_path / "out" / "v1-small-2"
    for out in (first, second):
        report = json.loads((out / "validation" / "report.json").read_text())
        assert [r["name"] for r in report["rows"]] == ["0000"]
    assert (tmp_path / "out" / "latest").resolve() == second.resolve()
    embeds = list((tmp_path / "cache" / "conditioning_image_embeds" / "edits").glob("*.safetensors"))
    assert len(embeds) == 2  # edit-v1's default conditioning-image-embeds cache (SPEC §4)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("qwen-edit").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["v1 small", "v1 small"]
    assert all(r.data.tags["team"] == "vision" and "command line" in r.data.tags["mlflow.note.content"] for r in runs)
    assert sorted(r.data.params["output_dir"] for r in runs) == [str(first), str(second)]
    # each run ended registered and promoted: the second, equal to the first, is not better than it
    assert "promotion: registered version 2 of 'qwen-edit': challenger" in result.stdout
    aliases = client.get_registered_model("qwen-edit").aliases
    assert {alias: str(version) for alias, version in aliases.items()} == {"champion": "1", "challenger": "2"}
