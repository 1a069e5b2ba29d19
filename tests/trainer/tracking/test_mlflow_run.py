"""MLflow outages never stop training nor lose the LoRA; what could not be logged is kept and sent later.

The stores are real: an embedded sqlite store (locked by a real sqlite transaction this process
holds) and an HTTP URI nothing listens on (connection refused, as for a server that is down).
"""

import json
import socket
import sqlite3
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import prepare_small_project
from trainer.config.schema import TrainConfig
from trainer.model.lora import LORA_WEIGHTS_NAME
from trainer.tracking.mlflow_run import FLUSH_TIMEOUT_ENV, RUN_FILE, UNSENT_FILE, MlflowRun
from trainer.training.checkpoints import checkpoint_dirs
from trainer.workflow import training_command, training_env


def refused_uri(credentials: str = "") -> str:
    """An HTTP tracking URI on a port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://{credentials}127.0.0.1:{port}"


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _runs(uri: str, experiment: str = "qwen-edit") -> list:
    client = _client(uri)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def _fake_training(tmp_path: Path, steps: int = 5):
    lora, curve = tmp_path / "lora.safetensors", tmp_path / "loss_curve.png"
    lora.write_bytes(b"lora")
    curve.write_bytes(b"png")
    return SimpleNamespace(final_loss=0.25, seconds=1.0, lora_path=lora), curve, steps


def _log_a_run(run: MlflowRun, tmp_path: Path) -> str | None:
    result, curve, steps = _fake_training(tmp_path)
    for step in range(1, steps + 1):
        run.log_step(step, 1.0 / step, 1e-4)
    return run.finish(result, curve)


@pytest.fixture
def sqlite_uri(tmp_path):
    return f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"


def test_an_unreachable_server_neither_blocks_nor_fails_and_the_run_is_synced_later(tmp_path, monkeypatch, sqlite_uri):
    from trainer.cli import main as cli

    (tmp_path / "store").mkdir()
    out = tmp_path / "out"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", refused_uri("alice:hunter2@"))
    run = MlflowRun(TrainConfig(), tmp_path, {"dagster_run_id": "r1"}, output_dir=out)
    started = time.time()
    note = _log_a_run(run, tmp_path)
    assert time.time() - started < 10  # MLflow's defaults retried for minutes (349 s measured)
    assert run.run_id is None and run.url is None
    assert "did not take everything" in note and "metrics of 6 step(s)" in note and "lora, plots" in note
    assert f"qwen-edit mlflow-sync {out}" in note and "hunter2" not in note
    saved = json.loads((out / UNSENT_FILE).read_text())
    assert [op["op"] for op in saved["runs"][0]["ops"]][:2] == ["start", "metrics"]

    # the store is back (here: another one): the command sends everything, in order
    assert cli(["mlflow-sync", str(out), "--tracking-uri", sqlite_uri]) == 0
    assert not (out / UNSENT_FILE).exists()
    (synced,) = _runs(sqlite_uri)
    client = _client(sqlite_uri)
    assert synced.info.status == "FINISHED" and synced.data.tags["dagster_run_id"] == "r1"
    assert [m.step for m in client.get_metric_history(synced.info.run_id, "train_loss")] == [1, 2, 3, 4, 5]
    assert {a.path for a in client.list_artifacts(synced.info.run_id)} == {"lora", "plots"}
    assert synced.data.params["learning_rate"] == "0.0001"


@pytest.mark.slow
def test_a_store_locked_mid_run_is_caught_up_once_the_lock_is_released(tmp_path, monkeypatch, sqlite_uri):
    (tmp_path / "store").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    run = MlflowRun(TrainConfig(), tmp_path, {}, output_dir=tmp_path / "out")
    assert run.run_id is not None  # the store answered at the start
    lock = sqlite3.connect(str(tmp_path / "store" / "mlflow.db"))
    lock.execute("BEGIN EXCLUSIVE")  # another process writing for longer than sqlite waits (MLflow then fails the call)
    started = time.time()
    run.log_step(1, 1.0, 1e-4)
    while run.outbox.down_since is None and time.time() - started < 120:
        time.sleep(0.1)
    assert run.outbox.down_since is not None, "the locked store never failed a call"
    for step in range(2, 6):
        run.log_step(step, 1.0 / step, 1e-4)  # buffered: returns at once
    assert time.time() - started < 120
    lock.rollback()
    lock.close()
    result, curve, _ = _fake_training(tmp_path)
    assert run.finish(result, curve) is None  # everything reached the store once it answered again
    (logged,) = _runs(sqlite_uri)
    assert logged.info.status == "FINISHED" and logged.info.run_id == run.run_id
    history = _client(sqlite_uri).get_metric_history(logged.info.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2, 3, 4, 5]


def test_a_run_of_a_killed_process_is_marked_killed_or_continued(tmp_path, monkeypatch, sqlite_uri):
    (tmp_path / "store").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    out = tmp_path / "out"
    killed = MlflowRun(TrainConfig(), tmp_path, {}, output_dir=out)
    killed.log_step(1, 0.5, 1e-4)
    killed.outbox.wait_until_sent(60)
    first = killed.run_id
    killed.outbox.abandoned = True  # as if the process died here: the run stays RUNNING
    assert json.loads((out / RUN_FILE).read_text())["status"] == "RUNNING"

    resumed = MlflowRun(TrainConfig(), tmp_path, {}, output_dir=out, resuming=True)  # its checkpoint named no run
    assert resumed.run_id == first
    resumed.log_step(2, 0.4, 1e-4)
    resumed.outbox.wait_until_sent(60)
    resumed.outbox.abandoned = True

    fresh = MlflowRun(TrainConfig(), tmp_path, {}, output_dir=out)  # a new run on this output_dir
    assert fresh.end("FINISHED") is None
    runs = {r.info.run_id: r.info.status for r in _runs(sqlite_uri)}
    assert runs == {first: "KILLED", fresh.run_id: "FINISHED"}
    assert [m.step for m in _client(sqlite_uri).get_metric_history(first, "train_loss")] == [1, 2]  # one history


def test_params_that_changed_on_resume_are_kept_and_named(tmp_path, monkeypatch, sqlite_uri):
    (tmp_path / "store").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    first = MlflowRun(TrainConfig(max_train_steps=10), tmp_path, {}, output_dir=tmp_path / "out")
    first.end("KILLED")
    again = MlflowRun(TrainConfig(max_train_steps=20), tmp_path, {}, output_dir=tmp_path / "out", resume_run_id=first.run_id)
    assert again.end("FINISHED") is None  # MLflow params are write-once: the old value stays, no error
    (run,) = _runs(sqlite_uri)
    assert run.data.params["max_train_steps"] == "10"
    assert run.data.tags["qwen-edit/params_changed_on_resume"] == "max_train_steps"


# -- end to end: the real trainer under accelerate launch ------------------------------------------
def _train(project, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(training_command(project), env={**training_env(project), **env}, cwd=project.root, capture_output=True, text=True)


@pytest.mark.slow
def test_training_with_an_unreachable_tracking_server_finishes_and_saves_the_lora(demo_root, tmp_path):
    project = prepare_small_project(tmp_path, demo_root, max_train_steps=4, report_to="mlflow")
    started = time.time()
    done = _train(project, {"MLFLOW_TRACKING_URI": refused_uri("bob:pa55word@")})
    assert done.returncode == 0, done.stdout + done.stderr
    assert time.time() - started < 300  # before: 349 s of retries, then exit 1 without a LoRA
    assert (project.lora_dir / LORA_WEIGHTS_NAME).is_file()
    assert "is not answering" in done.stdout and "did not take everything" in done.stdout
    assert "pa55word" not in done.stdout + done.stderr
    summary = json.loads((project.output_dir / "training_summary.json").read_text())
    assert summary["steps"] == 4 and summary["mlflow_run_id"] is None
    assert (project.output_dir / UNSENT_FILE).is_file()


@pytest.mark.slow
def test_training_with_a_locked_sqlite_store_finishes_and_catches_up(demo_root, tmp_path):
    """The lock is held from before the start until the first checkpoint exists (mid-run), then released."""
    store = tmp_path / "store"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    _client(uri).search_experiments()
    project = prepare_small_project(tmp_path / "project", demo_root, max_train_steps=6, checkpointing_steps=2, report_to="mlflow")
    lock = sqlite3.connect(str(store / "mlflow.db"))
    lock.execute("BEGIN EXCLUSIVE")
    process = subprocess.Popen(
        training_command(project), env={**training_env(project), "MLFLOW_TRACKING_URI": uri, FLUSH_TIMEOUT_ENV: "120"},
        cwd=project.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.time() + 600
        while not checkpoint_dirs(project.output_dir / "checkpoints") and process.poll() is None and time.time() < deadline:
            time.sleep(0.2)
    finally:
        lock.rollback()
        lock.close()
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stdout + stderr
    assert (project.lora_dir / LORA_WEIGHTS_NAME).is_file()
    assert "database is locked" in stdout and "answers again" in stdout
    summary = json.loads((project.output_dir / "training_summary.json").read_text())
    (run,) = _runs(uri)
    assert run.info.run_id == summary["mlflow_run_id"] and run.info.status == "FINISHED"
    history = _client(uri).get_metric_history(run.info.run_id, "train_loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]


def test_logging_the_validation_report_to_a_store_that_is_down_warns_instead_of_failing(tmp_path, capsys):
    from trainer.evaluation.validation import log_to_mlflow

    report = SimpleNamespace(summary={"lora_latent_mse": 0.1}, html_path=tmp_path / "report.html", rows=[])
    started = time.time()
    assert log_to_mlflow(report, "0" * 32, refused_uri("carol:letmein@"), step=4) is None
    assert time.time() - started < 30
    warning = capsys.readouterr().err
    assert "warning: MLflow did not take the validation report" in warning and "letmein" not in warning
