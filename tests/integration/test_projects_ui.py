"""`make ui` over a projects folder (QWEN_EDIT_PROJECTS): the webserver shows one group per project with its
pools, the sweep's partitions, and a partitioned training launched through GraphQL (as the UI's
"Materialize" of one partition sends it) trains that point, tags its MLflow run and reports the promotion
decision in the asset's metadata."""

import time

import pytest

from tests.conftest import write_small_project
from tests.integration.conftest import LAUNCH_RUN, UISession, instance_home, started_ui
from tests.integration.servers import LOCATION, REPOSITORY

pytestmark = pytest.mark.integration
POINTS = ["learning_rate=1e-3;lora_rank=4", "learning_rate=3e-3;lora_rank=4"]
SMALL = {"n_train": 2, "max_train_steps": 2, "report_to": "mlflow", "checkpointing_steps": 100}

ASSETS_QUERY = "{ assetNodes { assetKey { path } groupName pools partitionKeys backfillPolicy { policyType maxPartitionsPerRun } } }"
MATERIALIZATIONS = """
query ($path: [String!]!, $partitions: [String!]) {
  assetOrError(assetKey: {path: $path}) {
    ... on Asset {
      assetMaterializations(partitions: $partitions) {
        runId partition
        metadataEntries { label ... on TextMetadataEntry { text } ... on UrlMetadataEntry { url } ... on IntMetadataEntry { intValue } }
      }
    }
  }
}"""


@pytest.fixture(scope="module")
def projects_ui(demo_root, tmp_path_factory, artifacts_dir):
    """`make ui` on a temp DAGSTER_HOME over two projects: `style`, and `relight` with a 2x1 sweep."""
    base = tmp_path_factory.mktemp("projects-ui")
    folder = base / "projects"
    models = demo_root / "demo" / "models"
    write_small_project(folder / "style", models, tracker_project_name="style-lora", **SMALL)
    write_small_project(folder / "relight", models, tracker_project_name="relight-lora", **SMALL,
                        sweep={"learning_rate": [1e-3, 3e-3], "lora_rank": [4]})
    home = instance_home(base)
    uri = f"sqlite:///{base / 'mlflow.db'}"
    env = {"QWEN_EDIT_ROOT": str(base), "QWEN_EDIT_PROJECTS": str(folder), "MLFLOW_TRACKING_URI": uri}
    with started_ui(home, env, base / "dagster-dev.log", artifacts_dir / "dagster-dev-projects.log") as ui:  # no single config
        session = UISession(ui, base, home, uri)
        try:
            yield session
        finally:
            session.terminate_unfinished_runs()


def test_the_webserver_shows_one_group_per_project_with_its_pools_and_the_sweep(projects_ui):
    nodes = {"/".join(n["assetKey"]["path"]): n for n in projects_ui.graphql(ASSETS_QUERY)["assetNodes"]}
    assert {n["groupName"] for n in nodes.values()} == {"style", "relight"}
    assert all(key.startswith(f"{n['groupName']}/") for key, n in nodes.items())
    for project in ("style", "relight"):
        assert nodes[f"{project}/trained_lora"]["pools"] == ["gpu"]  # one card: every project's GPU steps queue together
    assert nodes["relight/trained_lora"]["partitionKeys"] == POINTS
    assert nodes["relight/validation_report"]["partitionKeys"] == POINTS
    # "Launch backfill" of the grid: one run per point, which the gpu pool then trains one at a time
    for stage in ("trained_lora", "validation_report", "promotion"):
        assert nodes[f"relight/{stage}"]["backfillPolicy"] == {"policyType": "MULTI_RUN", "maxPartitionsPerRun": 1}, stage
    assert nodes["relight/text_embeds"]["partitionKeys"] == [] and nodes["style/trained_lora"]["partitionKeys"] == []


@pytest.mark.slow
def test_a_partitioned_training_launched_through_the_webserver_trains_its_point(projects_ui):
    from mlflow.tracking import MlflowClient

    point = POINTS[1]
    stages = ["pairing_manifest", "text_embeds", "vae_latents", "trained_lora", "validation_report", "promotion"]
    selector = {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY, "jobName": "__ASSET_JOB",
                "assetSelection": [{"path": ["relight", stage]} for stage in stages]}
    params = {
        "selector": selector,
        # the prefixed project's own Launchpad section; a key the sweep does not vary
        "runConfigData": {"ops": {"relight__trained_lora": {"config": {"seed": 7}}}},
        "executionMetadata": {"tags": [{"key": "dagster/partition", "value": point}]},
    }
    started = time.monotonic()
    launched = projects_ui.graphql(LAUNCH_RUN, {"params": params})["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]
    run = projects_ui.wait_for_run(run_id)
    print(f"partitioned run through the webserver: {time.monotonic() - started:.1f} s")
    assert run["status"] == "SUCCESS", projects_ui.run_errors(run_id)
    tags = {t["key"]: t["value"] for t in run["tags"]}
    assert tags["dagster/partition"] == point and tags["qwen-edit/project"] == "relight"

    def metadata(stage: str) -> dict:
        (event,) = projects_ui.graphql(MATERIALIZATIONS, {"path": ["relight", stage], "partitions": [point]})["assetOrError"]["assetMaterializations"]
        assert event["runId"] == run_id and event["partition"] == point
        return {e["label"]: e.get("text") or e.get("url") or e.get("intValue") for e in event["metadataEntries"]}

    trained = metadata("trained_lora")
    mlflow_run = MlflowClient(projects_ui.mlflow_uri).get_run(trained["mlflow_run_id"])
    assert mlflow_run.data.tags["dagster_partition"] == point
    assert mlflow_run.data.params["learning_rate"] == "0.003" and mlflow_run.data.params["seed"] == "7"
    promotion = metadata("promotion")  # the first LoRA of relight's registered model: no champion to beat yet
    assert promotion["decision"] == "champion" and promotion["registered_model"] == "relight-lora"
    assert "no champion yet" in promotion["reason"]
    # the other point was not trained
    other = projects_ui.graphql(MATERIALIZATIONS, {"path": ["relight", "trained_lora"], "partitions": [POINTS[0]]})
    assert other["assetOrError"]["assetMaterializations"] == []


RELOAD = """
mutation ($name: String!) {
  reloadRepositoryLocation(repositoryLocationName: $name) { __typename ... on PythonError { message } }
}"""


def test_a_new_project_folder_appears_after_reload(projects_ui):
    """What *Reload* on the code location does (Deployment page): the folder is read again, the new project
    is a new group; the others stay as they were."""
    from tests.integration.servers import wait_until

    write_small_project(projects_ui.root / "projects" / "product-swap", projects_ui.root / "models",
                        tracker_project_name="product-swap-lora", n_train=1)
    reloaded = projects_ui.graphql(RELOAD, {"name": LOCATION})["reloadRepositoryLocation"]
    assert reloaded["__typename"] == "WorkspaceLocationEntry", reloaded

    def all_three_groups() -> bool:
        try:
            found = {n["groupName"] for n in projects_ui.graphql(ASSETS_QUERY)["assetNodes"]}
        except AssertionError:  # an answer with errors while the location reloads
            return False
        return found == {"style", "relight", "product_swap"}

    wait_until(all_three_groups, "the new project's group", 180, interval=2, alive=projects_ui.ui.process, log=projects_ui.ui.log_path)
