"""`make ui` end to end: the webserver and daemon on our dagster.yaml, "materialise all" through the GraphQL API."""

from pathlib import Path

import pytest

from tests.integration.conftest import LAUNCH_RUN, TRAIN_STEPS, instance_settings
from tests.integration.servers import LOCATION, REPOSITORY, wait_until

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

ASSETS_QUERY = "{ assetNodes { assetKey { path } groupName isObservable isMaterializable } }"

STALE_QUERY = """
query ($path: [String!]!) {
  assetNodeOrError(assetKey: {path: $path}) { ... on AssetNode { staleStatus staleCauses { key { path } reason } } }
}"""



def launch(dagster_ui, assets: list[list[str]], run_config: dict | None = None) -> dict:
    selector = {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY, "jobName": "__ASSET_JOB",
                "assetSelection": [{"path": path} for path in assets]}
    return dagster_ui.graphql(LAUNCH_RUN, {"params": {"selector": selector, "runConfigData": run_config or {}}})["launchRun"]


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
    names = {"/".join(a["assetKey"]["path"]) for a in assets if a["isMaterializable"]}
    observed = {"/".join(a["assetKey"]["path"]) for a in assets if a["isObservable"]}
    assert {"pairing_manifest", "text_embeds", "vae_latents", "trained_lora", "validation_report"} <= names
    assert len(observed) == 8 and all(name.startswith("raw/") for name in observed)  # the folders: watched, not made
    assert materialised["jobName"] == "__ASSET_JOB"
    assert materialised["stats"]["stepsFailed"] == 0
    assert materialised["stats"]["materializations"] == len(names)
    # the overrides and the flavour on the run, where the Runs list shows them
    tags = {t["key"]: t["value"] for t in materialised["tags"]}
    assert tags["qwen-edit/flavour"] == "edit-v2" and tags["qwen-edit/max_train_steps"] == str(TRAIN_STEPS)
    # the GPU steps claimed slots of the 'gpu' pool, limited to one by dagster.yaml's default_limit
    limits = {c["concurrencyKey"]: c["slotCount"] for c in dagster_ui.graphql(INSTANCE_QUERY)["instance"]["concurrencyLimits"]}
    assert limits.get("gpu") == 1, limits


def test_trained_lora_metadata_names_the_lora_and_the_mlflow_run(dagster_ui, trained_lora_metadata, materialised):
    from mlflow.tracking import MlflowClient

    metadata = trained_lora_metadata
    lora = Path(metadata["lora_path"])
    assert lora.is_file() and lora.is_relative_to(dagster_ui.root), lora
    assert metadata["steps"] == TRAIN_STEPS
    run_id = metadata["mlflow_run_id"]
    assert metadata["mlflow_run_url"].endswith(f"/runs/{run_id}?workflowType=machine_learning")
    client = MlflowClient(dagster_ui.mlflow_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["max_train_steps"] == str(TRAIN_STEPS)  # the GraphQL run config reached the trainer
    # named from the flavour, the overrides and the Dagster run; its description links that run in this UI
    dagster_run = materialised["runId"]
    assert run.info.run_name == f"edit-v2_max_train_steps-{TRAIN_STEPS}_dagster-{dagster_run[:8]}" == metadata["run_name"]
    assert f"[{dagster_run}]({dagster_ui.ui.url}/runs/{dagster_run})" in run.data.tags["mlflow.note.content"]
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert "final_loss_mean_last_10pct" in metadata and "lora_size_mb" in metadata and "lora_bytes" not in metadata
    assert lora.parent.parent == dagster_ui.root / "outputs" / "qwen_image.edit-v2-lora" / metadata["run_name"]


def test_an_unknown_precision_is_refused_at_launch(dagster_ui, materialised):
    answer = launch(dagster_ui, [["trained_lora"]], {"ops": {"trained_lora": {"config": {"base_model_precision": "int9-quanto"}}}})
    assert answer["__typename"] == "RunConfigValidationInvalid", answer
    assert any("int9-quanto" in e["message"] and "base_model_precision" in e["message"] for e in answer["errors"]), answer


def test_a_changed_dataset_folder_marks_its_downstream_stale(dagster_ui, materialised):
    """Observing a folder after a file was added: the manifest (and what follows) is stale; removed, fresh again."""
    folder = dagster_ui.root / "demo" / "data" / "train" / "edited"
    extra = folder / "9999.txt"

    def observe_and_status() -> str:
        launched = launch(dagster_ui, [["raw", "demo_edits"]])
        assert launched["__typename"] == "LaunchRunSuccess", launched
        assert dagster_ui.wait_for_run(launched["run"]["runId"])["status"] == "SUCCESS"
        return dagster_ui.graphql(STALE_QUERY, {"path": ["pairing_manifest"]})["assetNodeOrError"]

    assert observe_and_status()["staleStatus"] == "FRESH"
    extra.write_text("a caption without an image")
    try:
        node = observe_and_status()
        assert node["staleStatus"] == "STALE", node
        assert any(c["key"]["path"] == ["raw", "demo_edits"] for c in node["staleCauses"]), node
    finally:
        extra.unlink()
    assert observe_and_status()["staleStatus"] == "FRESH"


CHECKS_QUERY = """
{
  assetNodeOrError(assetKey: {path: ["pairing_manifest"]}) {
    ... on AssetNode {
      assetChecksOrError { ... on AssetChecks { checks { name description blocking executionForLatestMaterialization { status } } } }
    }
  }
}"""


def test_the_manifest_checks_are_described_blocking_where_bad_data_must_stop_and_passed(dagster_ui, materialised):
    checks = dagster_ui.graphql(CHECKS_QUERY)["assetNodeOrError"]["assetChecksOrError"]["checks"]
    by_name = {c["name"]: c for c in checks}
    assert set(by_name) == {"pairs_complete", "no_orphan_references"}
    assert by_name["pairs_complete"]["blocking"] and not by_name["no_orphan_references"]["blocking"]
    assert all(c["description"] for c in checks)
    assert {c["executionForLatestMaterialization"]["status"] for c in checks} == {"SUCCEEDED"}
