"""A `user:pass@` in MLFLOW_TRACKING_URI reaches MLflow (the client sends it) but nothing shown or stored.

A real `mlflow server` (sqlite backend) and the real `trained_lora` asset (Dagster Pipes around
`accelerate launch`): the run URL in training_summary.json and in the asset's metadata, the
trainer's output and MLflow's own params and tags carry no credentials.
"""

import json

import dagster as dg
import pytest

from tests.conftest import prepare_small_project
from tests.integration.servers import MlflowServer

pytestmark = pytest.mark.integration

SECRET = "s3cr3t-pa55"


def test_credentials_in_the_tracking_uri_are_in_no_url_log_or_metadata(demo_root, tmp_path, monkeypatch, capfd):
    from mlflow.tracking import MlflowClient

    from qwen_edit_assets.definitions import build_definitions
    from qwen_edit_assets.resources import QwenEditProject

    server = MlflowServer(f"sqlite:///{tmp_path / 'server.db'}", tmp_path)
    try:
        uri = server.url.replace("http://", f"http://trainer:{SECRET}@")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        project = prepare_small_project(tmp_path / "project", demo_root, max_train_steps=2, report_to="mlflow")
        resource = QwenEditProject(root=str(project.root), config_path=str(project.config_path), data_path=str(project.data_path))
        job = build_definitions(resource).resolve_implicit_global_asset_job_def().get_subset(asset_selection={dg.AssetKey("trained_lora")})
        with dg.instance_for_test() as instance:
            result = job.execute_in_process(instance=instance, raise_on_error=False)
        printed = capfd.readouterr()  # the trainer subprocess writes to this process's stdout and stderr
        assert result.success, [e.message for e in result.all_events if e.is_failure]
        metadata = result.asset_materializations_for_node("trained_lora")[-1].metadata
        run_dir = project.output_dir / "latest"  # the run's own folder
        summary = json.loads((run_dir / "training_summary.json").read_text())
        assert summary["mlflow_run_url"].startswith(server.url + "/#/experiments/")
        assert metadata["mlflow_run_url"].value == summary["mlflow_run_url"]
        logs = [str(e.message) for e in result.all_events]
        stored = json.dumps(summary) + json.dumps({k: str(v.value) for k, v in metadata.items()}) + "\n".join(logs)
        stored += printed.out + printed.err
        stored += (run_dir / "mlflow_run.json").read_text()
        run = MlflowClient(server.url).get_run(summary["mlflow_run_id"])
        stored += json.dumps(run.data.params) + json.dumps(run.data.tags)
        assert SECRET not in stored and "trainer:" not in stored
        assert run.info.status == "FINISHED"
    finally:
        server.stop()
