"""Credentials come from the environment and are never written anywhere (issue 15 §6).

Fake secrets are set in the environment the way a deployment sets real ones; the whole asset graph
then runs on a small project (check, caches, an accelerate-launched training that logs to MLflow,
validation, comparison). No secret may appear in the MLflow store (params, tags, metrics), its
artifacts, the output folder (summary, manifest, report, LoRA), Dagster's metadata and logs, or the
processes' output. The servers the project starts listen on 127.0.0.1 unless told otherwise.
"""

import subprocess
from pathlib import Path

import dagster as dg
import pytest

from qwen_edit_assets.definitions import build_definitions
from qwen_edit_assets.resources import QwenEditProject
from tests.conftest import REPO, write_small_project

SECRETS = {
    "MLFLOW_TRACKING_PASSWORD": "fake-mlflow-password-5ecr3t-a1",
    "MLFLOW_TRACKING_TOKEN": "fake-mlflow-token-5ecr3t-b2",
    "AWS_SECRET_ACCESS_KEY": "fake-aws-secret-5ecr3t-c3",
    "HF_TOKEN": "hf_fake5ecr3tTokenD4",
    "DAGSTER_PG_PASSWORD": "fake-postgres-5ecr3t-e5",
}


def files_holding(root: Path, needles: list[bytes]) -> dict[str, list[str]]:
    """Every file under `root` (the sqlite store and its -wal included) that contains a needle."""
    found = {}
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            if hits := [n.decode() for n in needles if n in data]:
                found[str(path.relative_to(root))] = hits
    return found


@pytest.mark.slow
def test_no_secret_from_the_environment_reaches_any_store_log_or_metadata(demo_root, tmp_path, monkeypatch, capfd):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    (tmp_path / "mlruns").mkdir()
    config, data = write_small_project(tmp_path, demo_root / "demo" / "models", n_train=2, n_eval=1,
                                       max_train_steps=2, report_to="mlflow")
    defs = build_definitions(QwenEditProject(root=str(tmp_path), config_path=str(config), data_path=str(data)))
    with dg.DagsterInstance.ephemeral() as instance:
        result = defs.resolve_implicit_global_asset_job_def().execute_in_process(instance=instance, raise_on_error=False)
        events = instance.all_logs(result.run_id)
    assert result.success, [e.message for e in events if e.is_dagster_event and e.dagster_event.is_failure]
    assert (tmp_path / "out" / "latest" / "lora" / "pytorch_lora_weights.safetensors").is_file()  # the run's own folder
    logged = {p.name for p in (tmp_path / "mlruns" / "artifacts").rglob("*") if p.is_file()}
    assert {"pytorch_lora_weights.safetensors", "report.html"} <= logged  # what the grep below covers

    needles = [value.encode() for value in SECRETS.values()]
    assert files_holding(tmp_path, needles) == {}  # MLflow store + artifacts, outputs, caches, manifest
    dagster_text = "\n".join(
        f"{event.user_message} {event.dagster_event.event_specific_data if event.dagster_event else ''}" for event in events
    )
    metadata = [str(m.metadata) for m in (e.materialization for e in result.get_asset_materialization_events())]
    output = capfd.readouterr()
    for value in SECRETS.values():
        assert value not in dagster_text and value not in "".join(metadata)
        assert value not in output.out and value not in output.err


@pytest.mark.parametrize("target, flag", [("ui", "--host 127.0.0.1"), ("mlflow-ui", "--host 127.0.0.1")])
def test_servers_listen_on_localhost_unless_configured(target, flag):
    """`make -n` prints the commands: the default host, and the one a user sets on purpose."""
    default = subprocess.run(["make", "-n", "-C", str(REPO), target], capture_output=True, text=True)
    assert flag in default.stdout and "0.0.0.0" not in default.stdout, default.stdout + default.stderr
    variable = "DAGSTER_HOST" if target == "ui" else "MLFLOW_HOST"
    chosen = subprocess.run(["make", "-n", "-C", str(REPO), target, f"{variable}=0.0.0.0"], capture_output=True, text=True)
    assert "--host 0.0.0.0" in chosen.stdout, chosen.stdout + chosen.stderr
