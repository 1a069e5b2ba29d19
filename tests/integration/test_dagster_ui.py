"""`make ui` end to end: the webserver and daemon on our dagster.yaml, "materialise all" through the GraphQL API."""

from pathlib import Path

import pytest

from tests.integration.conftest import TRAIN_STEPS, instance_settings
from tests.integration.servers import wait_until

pytestmark = pytest.mark.integration

INSTANCE_QUERY = """
{
  instance {
    runQueuingSupported
    runQueueConfig { maxConcurrentRuns }
    poolConfig { defaultPoolLimit }
    concurrencyLimits { concurrencyKey slotCount }
    daemonHealth { allDaemonStatuses { daemonType healthy required } }
  }
}"""

ASSETS_QUERY = "{ assetNodes { assetKey { path } groupName } }"


def test_dagster_dev_runs_on_our_instance_config(dagster_ui):
    """The run queue and the pool limit come from the DAGSTER_HOME's dagster.yaml; every daemon is up."""
    settings = instance_settings()["concurrency"]
    instance = dagster_ui.graphql(INSTANCE_QUERY)["instance"]
    assert instance["runQueuingSupported"]
    assert instance["runQueueConfig"]["maxConcurrentRuns"] == settings["runs"]["max_concurrent_runs"]
    assert instance["poolConfig"]["defaultPoolLimit"] == settings["pools"]["default_limit"] == 1

    def daemons_healthy():
        statuses = dagster_ui.graphql(INSTANCE_QUERY)["instance"]["daemonHealth"]["allDaemonStatuses"]
        healthy = {d["daemonType"]: d["healthy"] for d in statuses}
        return all(healthy.get(kind) for kind in ("SENSOR", "SCHEDULER", "QUEUED_RUN_COORDINATOR"))

    wait_until(daemons_healthy, "the sensor, scheduler and run queue daemons to report healthy", 90, interval=2)


def test_materialise_all_succeeds_for_every_asset(dagster_ui, materialised):
    assets = dagster_ui.graphql(ASSETS_QUERY)["assetNodes"]
    names = {"/".join(a["assetKey"]["path"]) for a in assets}
    assert {"pairing_manifest", "text_embeds", "vae_latents", "trained_lora", "validation_report"} <= names
    assert materialised["jobName"] == "__ASSET_JOB"
    assert materialised["stats"]["stepsFailed"] == 0
    assert materialised["stats"]["materializations"] == len(names)
    # the GPU steps claimed slots of the 'gpu' pool, limited to one by dagster.yaml's default_limit
    limits = {c["concurrencyKey"]: c["slotCount"] for c in dagster_ui.graphql(INSTANCE_QUERY)["instance"]["concurrencyLimits"]}
    assert limits.get("gpu") == 1, limits


def test_trained_lora_metadata_names_the_lora_and_the_mlflow_run(dagster_ui, trained_lora_metadata):
    from mlflow.tracking import MlflowClient

    metadata = trained_lora_metadata
    lora = Path(metadata["lora_path"])
    assert lora.is_file() and lora.is_relative_to(dagster_ui.root), lora
    assert metadata["steps"] == TRAIN_STEPS
    run_id = metadata["mlflow_run_id"]
    assert metadata["mlflow_run_url"].endswith(f"/runs/{run_id}")
    run = MlflowClient(dagster_ui.mlflow_uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["max_train_steps"] == str(TRAIN_STEPS)  # the GraphQL run config reached the trainer
