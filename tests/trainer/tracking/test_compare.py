"""MLflow run comparison on real runs: two short trainings that differ only in the learning rate,
logged to the embedded sqlite store and to a real `mlflow server`, compared by `compare_runs`
and by `qwen-edit compare`."""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import unquote

import pytest
from PIL import Image

from tests.conftest import REPO, prepare_small_project
from trainer.errors import QwenEditError
from trainer.evaluation.validation import log_to_mlflow, run_validation
from trainer.tracking.compare import compare_runs, write_comparison_report
from trainer.tracking.loss_summary import FINAL_LOSS, final_loss
from trainer.tracking.store import tracking_uri
from trainer.training.recipe import run_training
from trainer.workflow import load_manifest

pytestmark = pytest.mark.slow
EXPERIMENT = "compare-test"
RATES = (1e-3, 3e-4)


def _train_two_runs(root: Path, demo_root: Path) -> tuple:
    """The same project trained twice, only the learning rate changed; each run validated and logged."""
    results = []
    for index, rate in enumerate(RATES):
        project = prepare_small_project(
            root, demo_root, max_train_steps=3, report_to="mlflow", learning_rate=rate, tracker_project_name=EXPERIMENT
        )
        tags = {"dagster_run_id": f"run-{index}"} | ({"flavour": "from-the-command-line"} if index else {})
        result = run_training(project.config, project.dataset_config, project.manifest_path, project.root, tags)
        report = run_validation(project.config, load_manifest(project), project.lora_dir, project.validation_dir)
        log_to_mlflow(report, result.mlflow_run_id, tracking_uri(project.root))
        results.append(result)
    return project, results


def _git_head() -> str:
    done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def _check_comparison(comparison, project, results, ui: str) -> None:
    ids = [r.mlflow_run_id for r in results]
    assert [run.run_id for run in comparison.runs] == ids  # oldest first
    assert [run.status for run in comparison.runs] == ["FINISHED", "FINISHED"]
    assert comparison.runs[0].start_time <= comparison.runs[1].start_time
    # the same project twice: the learning rate is the one param that differs
    assert comparison.differing_params == {"learning_rate": [str(rate) for rate in RATES]}
    assert comparison.param("learning_rate") == dict(zip(ids, ["0.001", "0.0003"]))
    # the one final loss (the runs' own metric): the mean of the last 10% of steps, as in the summary and Dagster
    assert comparison.metric(FINAL_LOSS) == {r.mlflow_run_id: final_loss(r.loss_history) for r in results}
    assert [comparison.metric(FINAL_LOSS)[r.mlflow_run_id] for r in results] == [r.final_loss for r in results]
    assert comparison.metric("train_loss_best") == {r.mlflow_run_id: min(r.loss_history) for r in results}
    assert {"validation_lora_latent_mse", "validation_lora_psnr", "validation_base_latent_mse"} <= comparison.metrics.keys()
    assert all(v is not None for key in comparison.metrics for v in comparison.metrics[key])

    # each run's LoRA edit of the one eval pair, downloaded; the last run's equals the file on disk
    assert list(comparison.images) == ["0000"]
    first, last = comparison.images["0000"]
    assert first.parent.name == ids[0] and last.parent.name == ids[1] and first.is_file()
    assert last.read_bytes() == (project.validation_dir / "images" / "0000_lora.png").read_bytes()
    assert comparison.targets["0000"].is_file()

    # MLflow 3's compare page reads ?runs=[JSON]&experiments=[JSON]
    head, query = comparison.compare_url.split("?", 1)
    assert head == f"{ui}/#/compare-runs"
    runs, experiments, view = (unquote(part).split("=", 1) for part in query.split("&"))
    assert runs == ["runs", json.dumps(ids, separators=(",", ":"))]
    assert experiments == ["experiments", json.dumps([comparison.experiment_id])]
    assert view == ["workflowType", "machine_learning"]  # MLflow 3's model-training view, not its GenAI default

    # the tags every run carries; a command-line tag wins over the automatic one
    manifest = hashlib.sha256(project.manifest_path.read_bytes()).hexdigest()[:16]
    for index, run in enumerate(comparison.runs):
        assert run.tags["manifest_version"] == manifest
        assert run.tags["git_revision"] == _git_head()
        assert run.tags["dagster_run_id"] == f"run-{index}"
    assert [run.tags["flavour"] for run in comparison.runs] == ["edit-v2", "from-the-command-line"]


def _check_report(comparison, out: Path) -> None:
    report = write_comparison_report(comparison, out)
    text = report.read_text()
    assert report == out / "report.md" and "| learning_rate | 0.001 | 0.0003 |" in text
    assert "grid_0000.png" in text and comparison.compare_url in text
    assert 'src="grid_0000.png"' in (out / "report.html").read_text()
    with Image.open(out / "grid_0000.png") as grid:
        assert grid.width == 64 + 3 * 160  # the pair's name, one column per run, then the target


def test_compare_two_learning_rates(demo_root, tmp_path, isolated_mlflow, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    project, results = _train_two_runs(tmp_path / "project", demo_root)

    comparison = compare_runs(isolated_mlflow, EXPERIMENT, last_n=5, out_dir=tmp_path / "comparison")
    _check_comparison(comparison, project, results, "http://127.0.0.1:5000")
    _check_report(comparison, tmp_path / "comparison")
    assert [run.run_id for run in compare_runs(isolated_mlflow, EXPERIMENT, last_n=1).runs] == [results[1].mlflow_run_id]
    with pytest.raises(QwenEditError, match=f"no MLflow experiment 'nothing-here'.*the experiments there: Default, {EXPERIMENT}"):
        compare_runs(isolated_mlflow, "nothing-here")

    from mlflow.tracking import MlflowClient

    metrics = MlflowClient(isolated_mlflow).get_run(results[0].mlflow_run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics  # system metrics work offline

    # the Dagster asset over the same store
    import dagster as dg

    from qwen_edit_assets.assets.comparison import run_comparison
    from qwen_edit_assets.resources import QwenEditProject

    resource = QwenEditProject(root=str(project.root), config_path=str(project.config_path), data_path=str(project.data_path))
    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize([run_comparison], resources={"project": resource}, instance=instance)
    (event,) = result.get_asset_materialization_events()
    metadata = event.materialization.metadata
    assert metadata["runs"].value == 2 and metadata["differing_params"].value == ["learning_rate"]
    assert "| learning_rate | 0.001 | 0.0003 |" in metadata["comparison"].value
    assert metadata["mlflow_compare_url"].value == comparison.compare_url
    assert "data:image/png;base64," in metadata["grid"].value
    assert (project.output_dir / "comparison" / "report.html").is_file()

    # the command line: experiment from the config, tracking URI from MLFLOW_TRACKING_URI
    command = [str(Path(sys.executable).parent / "qwen-edit"), "compare", "--config", str(project.config_path), "--last", "2"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    (row,) = [line for line in done.stdout.splitlines() if line.startswith("| learning_rate |")]
    assert row == "| learning_rate | 0.001 | 0.0003 |"
    assert FINAL_LOSS in done.stdout and comparison.compare_url in done.stdout
    assert (tmp_path / "outputs" / "comparison" / "report.md").is_file()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real tracking server (sqlite backend, proxied artifacts) on a free local port."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(tmp_path / "artifacts")],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.time() + 90
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "mlflow server did not come up:\n" + (tmp_path / "server.log").read_text()
            time.sleep(0.25)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def test_compare_through_a_tracking_server(demo_root, tmp_path, mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    project, results = _train_two_runs(tmp_path / "project", demo_root)
    assert all(r.mlflow_run_url.startswith(mlflow_server) for r in results)
    comparison = compare_runs(mlflow_server, EXPERIMENT, out_dir=tmp_path / "comparison")
    _check_comparison(comparison, project, results, mlflow_server)
    _check_report(comparison, tmp_path / "comparison")
    assert any((tmp_path / "artifacts").rglob("0000_lora.png"))  # the artifacts went through the server
