"""The scale-out profile: Dagster instance storage on PostgreSQL (dagster_home/dagster.postgres.yaml) and MLflow
behind `mlflow server` with PostgreSQL as its backend store; the whole graph materialises on them.

A real PostgreSQL server is started from Debian's `postgresql` package; without it these tests fail
(CI installs it), they are never skipped.
"""

import shutil

import dagster as dg
import pytest

from tests.integration.conftest import PROJECT_ENV, TRAIN_STEPS, copy_demo, instance_settings
from tests.integration.servers import REPO, MlflowServer, PostgresServer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def postgres():
    server = PostgresServer()
    try:
        for db in ("dagster", "mlflow"):
            server.create_database(db)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory):
    server = MlflowServer(postgres.url("mlflow"), tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def postgres_home(postgres, tmp_path_factory):
    """A DAGSTER_HOME whose dagster.yaml is the template, its DAGSTER_PG_* variables set as a deployment would."""
    home = tmp_path_factory.mktemp("dagster_home_pg")
    shutil.copy(REPO / "dagster_home" / "dagster.postgres.yaml", home / "dagster.yaml")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DAGSTER_PG_HOST", "127.0.0.1")
        env.setenv("DAGSTER_PG_PORT", str(postgres.port))
        env.setenv("DAGSTER_PG_USER", postgres.USER)
        env.setenv("DAGSTER_PG_PASSWORD", postgres.PASSWORD)
        env.setenv("DAGSTER_PG_DB", "dagster")
        yield home


@pytest.fixture(scope="module")
def materialised_on_postgres(demo_root, postgres_home, mlflow_server, tmp_path_factory):
    """Every asset, in process, on an instance loaded from the template; training logs to the MLflow server."""
    from qwen_edit_assets.definitions import build_definitions
    from qwen_edit_assets.resources import QwenEditProject
    from trainer.workflow import example_paths

    root = copy_demo(demo_root, tmp_path_factory.mktemp("project-pg"))
    config, data = example_paths("qwen_image.edit-v2-lora")
    defs = build_definitions(QwenEditProject(root=str(root), config_path=str(config), data_path=str(data)))
    with pytest.MonkeyPatch.context() as env:
        for key in PROJECT_ENV:
            env.delenv(key, raising=False)
        env.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
        with dg.DagsterInstance.from_config(str(postgres_home)) as instance:
            result = defs.resolve_implicit_global_asset_job_def().execute_in_process(
                instance=instance, run_config={"ops": {"trained_lora": {"config": {"max_train_steps": TRAIN_STEPS}}}},
                raise_on_error=False)
    return result, root


def test_the_template_keeps_the_gpu_limits_of_dagster_yaml():
    assert instance_settings("dagster.postgres.yaml")["concurrency"] == instance_settings("dagster.yaml")["concurrency"]
    # dagster-postgres's storage behind the reachability check (tests/integration/test_instance_unreachable.py)
    storage = instance_settings("dagster.postgres.yaml")["storage"]
    assert set(storage) == {"custom"} and storage["custom"]["class"] == "CheckedPostgresStorage"
    assert set(storage["custom"]["config"]["postgres_db"]) == {"hostname", "port", "username", "password", "db_name", "scheme"}


def test_the_graph_materialises_into_postgres(materialised_on_postgres, postgres, postgres_home):
    result, _ = materialised_on_postgres
    failures = [e.event_specific_data.error.message for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert result.success, failures
    # a fresh instance from the same dagster.yaml reads the run and the materialisations back from PostgreSQL
    with dg.DagsterInstance.from_config(str(postgres_home)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert instance.get_run_by_id(result.run_id).status == dg.DagsterRunStatus.SUCCESS
        for key in ("pairing_manifest", "text_embeds", "vae_latents", "trained_lora", "validation_report"):
            assert instance.get_latest_materialization_event(dg.AssetKey(key)).run_id == result.run_id, key
    assert postgres.query("dagster", "SELECT status FROM runs WHERE run_id = %s", (result.run_id,)) == [("SUCCESS",)]


def test_training_logged_to_the_mlflow_server(materialised_on_postgres, mlflow_server, postgres):
    from mlflow.tracking import MlflowClient

    result, root = materialised_on_postgres
    (event,) = [e for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey("trained_lora")]
    metadata = event.materialization.metadata
    run_id = metadata["mlflow_run_id"].value
    assert metadata["mlflow_run_url"].value.startswith(mlflow_server.url + "/#/experiments/")
    client = MlflowClient(mlflow_server.url)
    run = client.get_run(run_id)
    assert run.data.params["max_train_steps"] == str(TRAIN_STEPS)
    assert run.data.tags["dagster_run_id"] == result.run_id
    assert {"lora", "validation"} <= {a.path for a in client.list_artifacts(run_id)}
    # the run lives in PostgreSQL, its files in the server's artifact store (proxied: the trainer never saw the path)
    assert postgres.query("mlflow", "SELECT status FROM runs WHERE run_uuid = %s", (run_id,)) == [("FINISHED",)]
    stored = {p.name for p in mlflow_server.artifacts.rglob("*.safetensors")}
    assert "pytorch_lora_weights.safetensors" in stored
    assert not (root / "mlruns").exists()  # nothing fell back to the embedded store
