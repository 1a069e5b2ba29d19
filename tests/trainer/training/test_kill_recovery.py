"""kill -9 of the real trainer at named points, then re-runs: the final LoRA is an uninterrupted run's.

One project is killed again and again, each re-run resuming from the newest complete checkpoint
(`resume_from_checkpoint: latest`), until a run finishes. Each kill is a real SIGKILL that the
trainer sends itself at a named point (trainer.faults), so it lands exactly there: mid-step,
mid-checkpoint-save, mid-LoRA-export, after the final checkpoint, mid-summary. The kill points
inside checkpoint saves, pruning and the LoRA export are also tried one by one, in forked
processes, by tests/trainer/training/test_checkpoints.py and tests/trainer/model/test_lora.py.
"""

import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import prepare_small_project
from trainer.faults import ENV
from trainer.model.lora import COMFYUI_WEIGHTS_NAME, LORA_WEIGHTS_NAME
from trainer.training.checkpoints import checkpoint_dirs
from trainer.workflow import training_command, training_env

pytestmark = pytest.mark.slow

SETTINGS = dict(
    max_train_steps=8, checkpointing_steps=2, checkpoints_total_limit=2, gradient_accumulation_steps=2,
    lr_scheduler="cosine", use_ema=True, ema_decay=0.9, resume_from_checkpoint="latest",
)


def _launch(project, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = training_env(project)
    if kill_at:
        env[ENV] = kill_at
    return subprocess.run(training_command(project), env=env, cwd=project.root, capture_output=True, text=True)


def _names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _assert_same_lora(expected_dir, actual_dir) -> None:
    for name in (LORA_WEIGHTS_NAME, COMFYUI_WEIGHTS_NAME, f"ema/{LORA_WEIGHTS_NAME}"):
        expected, actual = load_file(expected_dir / name), load_file(actual_dir / name)
        assert expected.keys() == actual.keys(), name
        for key in expected:
            assert torch.allclose(expected[key], actual[key], rtol=0, atol=1e-6), (name, key)


@pytest.mark.timeout(1800)
def test_killed_at_every_point_then_resumed_ends_on_the_uninterrupted_runs_lora(demo_root, tmp_path, isolated_mlflow):
    from mlflow.tracking import MlflowClient

    from trainer.training.recipe import run_training

    reference = prepare_small_project(tmp_path / "uninterrupted", demo_root, **SETTINGS)
    run_training(reference.config, reference.dataset_config, reference.manifest_path, reference.root, tags={})

    project = prepare_small_project(tmp_path / "killed", demo_root, report_to="mlflow", **SETTINGS)
    out, checkpoints, lora = project.output_dir, project.output_dir / "checkpoints", project.lora_dir
    tried, survived = [], []

    def kill(point: str, check) -> None:
        done = _launch(project, point)
        assert done.returncode != 0, f"{point}: the run was not killed\n{done.stdout}{done.stderr}"
        assert not (out / "training_summary.json").exists(), point
        check(done)
        tried.append(point)

    # mid-step 3 (after backward, before the update): checkpoint-2 is all there is
    kill("train.mid_step:3", lambda d: _expect(_names(checkpoints) == ["checkpoint-2"] and not (lora / LORA_WEIGHTS_NAME).exists()))
    # resumed from 2; killed inside the save of 4: only a hidden temp folder, which the next run removes
    kill("checkpoint.state_written:4", lambda d: _expect(
        "from step 2" in d.stdout and [n for n in _names(checkpoints) if not n.startswith(".")] == ["checkpoint-2"]
        and any(n.startswith(".checkpoint-4-") for n in _names(checkpoints))
    ))
    # resumed from 2, trained to 8; killed inside the LoRA export: no LoRA file under its name
    kill("lora.diffusers_written", lambda d: _expect(
        "from step 2" in d.stdout and "leftover" in d.stdout and _names(checkpoints) == ["checkpoint-4", "checkpoint-6"]
        and not (lora / LORA_WEIGHTS_NAME).exists() and any(n.startswith(".saving-") for n in _names(lora))
    ))
    # resumed from 6; killed after the final checkpoint, before the summary: the next run must not retrain
    kill("train.final_checkpoint_saved", lambda d: _expect(
        "from step 6" in d.stdout and _names(checkpoints) == ["checkpoint-6", "checkpoint-8"]
    ))
    # finishes from checkpoint-8 without training; killed while writing the summary (its temp file complete)
    kill("io.before_rename:training_summary.json", lambda d: _expect(
        "finishing it" in d.stdout and "from step 8" in d.stdout and any(n.startswith(".training_summary.json.") for n in _names(out))
    ))
    done = _launch(project)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "finishing it" in done.stdout and "from step 8" in done.stdout  # no step retrained after the final checkpoint
    survived = list(tried)

    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == SETTINGS["max_train_steps"]
    _assert_same_lora(reference.lora_dir, lora)
    assert not [n for n in _names(out) + _names(checkpoints) + _names(lora) if n.startswith(".") and n != ".trainer.lock"]

    # one MLflow run, continued by every resumed process: the whole loss history, finished
    client = MlflowClient(isolated_mlflow)
    runs = client.search_runs([client.get_experiment_by_name(project.config.tracker_project_name).experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"], [(r.info.run_id, r.info.status) for r in runs]
    assert runs[0].info.run_id == summary["mlflow_run_id"]
    steps = {m.step for m in client.get_metric_history(runs[0].info.run_id, "train_loss")}
    assert steps == set(range(1, SETTINGS["max_train_steps"] + 1))
    print(f"kill points tried {len(tried)}, survived {len(survived)}: {tried}")


def _expect(condition: bool) -> None:
    assert condition
