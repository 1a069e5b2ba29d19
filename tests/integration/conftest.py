"""One `make ui` session (dagster dev: webserver + daemon) over a copy of the demo project, shared by the
end-to-end, sensor and browser tests, with "materialise all" launched once through the GraphQL API."""

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.integration.servers import REPO, DagsterUI, wait_until

ARTIFACTS = REPO / "test-artifacts" / "integration"
TRAIN_STEPS = 20
RUN_TIMEOUT_S = 420
TERMINAL = {"SUCCESS", "FAILURE", "CANCELED"}
PROJECT_ENV = ("QWEN_EDIT_ROOT", "QWEN_EDIT_CONFIG", "QWEN_EDIT_DATA", "MLFLOW_TRACKING_URI", "DAGSTER_HOME")


def copy_demo(demo_root: Path, root: Path) -> Path:
    """A project root holding its own copy of the demo models and data (the session's demo_root stays untouched)."""
    shutil.copytree(demo_root / "demo", root / "demo")
    return root


def instance_settings(name: str = "dagster.yaml") -> dict:
    return yaml.safe_load((REPO / "dagster_home" / name).read_text())


def instance_home(base: Path) -> Path:
    """A DAGSTER_HOME under `base` holding a copy of the repository's dagster_home/dagster.yaml."""
    home = base / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    return home


@contextmanager
def started_ui(home: Path, env: dict[str, str], log: Path, kept_log: Path) -> Iterator[DagsterUI]:
    """`make ui` with `env` (and none of the caller's project variables); stopped at the end, its log kept."""
    saved = {key: os.environ.pop(key) for key in PROJECT_ENV if key in os.environ}
    try:
        ui = DagsterUI(home, env, log=log)
    finally:
        os.environ.update(saved)
    try:
        yield ui
    finally:
        try:
            ui.stop()
        finally:
            shutil.copy(log, kept_log)


@dataclass
class UISession:
    ui: DagsterUI
    root: Path
    home: Path
    mlflow_uri: str

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        return self.ui.graphql(query, variables)

    def client(self):
        from dagster_graphql import DagsterGraphQLClient

        return DagsterGraphQLClient("127.0.0.1", port_number=self.ui.port, timeout=60)

    def run(self, run_id: str) -> dict:
        return self.graphql(RUN_QUERY, {"runId": run_id})["runOrError"]

    def wait_for_run(self, run_id: str, timeout: float = RUN_TIMEOUT_S) -> dict:
        return wait_until(lambda: (run := self.run(run_id))["status"] in TERMINAL and run, f"run {run_id} to finish",
                          timeout, interval=2, alive=self.ui.process, log=self.ui.log_path)

    def terminate_unfinished_runs(self) -> None:
        """What a person does before stopping the server: terminate what still runs, wait for it to end."""
        runs = self.graphql(UNFINISHED_RUNS_QUERY)["runsOrError"]["results"]
        for run in runs:
            self.graphql(TERMINATE_MUTATION, {"runId": run["runId"]})
        for run in runs:
            self.wait_for_run(run["runId"], timeout=120)

    def run_errors(self, run_id: str) -> str:
        events = self.graphql(RUN_ERRORS_QUERY, {"runId": run_id})["logsForRun"]["events"]
        return "\n".join(f"{e.get('stepKey')}: {e['message']}\n{(e.get('error') or {}).get('message', '')}"
                         for e in events if e["__typename"] in ("ExecutionStepFailureEvent", "RunFailureEvent"))


RUN_QUERY = """
query ($runId: ID!) {
  runOrError(runId: $runId) {
    __typename
    ... on Run { runId status jobName tags { key value } stats { ... on RunStatsSnapshot { stepsSucceeded stepsFailed materializations } } }
  }
}"""

UNFINISHED_RUNS_QUERY = """
{ runsOrError(filter: {statuses: [QUEUED, NOT_STARTED, STARTING, STARTED, CANCELING]}) { ... on Runs { results { runId } } } }"""

LAUNCH_RUN = """
mutation ($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on PythonError { message }
  }
}"""
TERMINATE_MUTATION = """
mutation ($runId: String!) {
  terminateRun(runId: $runId) { __typename ... on TerminateRunFailure { message } ... on PythonError { message } }
}"""

RUN_ERRORS_QUERY = """
query ($runId: ID!) {
  logsForRun(runId: $runId, limit: 5000) {
    ... on EventConnection {
      events {
        __typename
        ... on MessageEvent { message stepKey }
        ... on ExecutionStepFailureEvent { error { message } }
        ... on RunFailureEvent { error { message } }
      }
    }
  }
}"""


def asset_job_run_config(root: Path) -> dict:
    """Launchpad config for "materialise all": training shortened, and every step in the run worker's
    process when the job allows choosing (a process per step re-imports torch; on 2 CPU cores that
    alone costs minutes, and the GPU pool serialises those steps anyway)."""
    from qwen_edit_assets.definitions import build_definitions
    from qwen_edit_assets.resources import QwenEditProject
    from trainer.workflow import example_paths

    config, data = example_paths("qwen_image.edit-v2-lora")
    job = build_definitions(QwenEditProject(root=str(root), config_path=str(config), data_path=str(data))).resolve_implicit_global_asset_job_def()
    run_config: dict = {"ops": {"trained_lora": {"config": {"max_train_steps": TRAIN_STEPS}}}}
    if job.executor_def.name == "multi_or_in_process_executor":
        run_config["execution"] = {"config": {"in_process": {}}}
    return run_config


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def dagster_ui(demo_root, tmp_path_factory, artifacts_dir):
    """`make ui` on a temp DAGSTER_HOME holding a copy of dagster_home/dagster.yaml, over a copy of the demo
    (the default config: the bundled edit-v2 preset), MLflow in a temp sqlite store. Stopped with Ctrl-C."""
    base = tmp_path_factory.mktemp("dagster-ui")
    root = copy_demo(demo_root, base / "project")
    home = instance_home(base)
    mlflow_uri = f"sqlite:///{base / 'mlflow.db'}"
    env = {"QWEN_EDIT_ROOT": str(root), "MLFLOW_TRACKING_URI": mlflow_uri, "QWEN_EDIT_SENSOR_INTERVAL": "1"}
    with started_ui(home, env, base / "dagster-dev.log", artifacts_dir / "dagster-dev.log") as ui:  # the default project
        session = UISession(ui, root, home, mlflow_uri)
        try:
            session.graphql("mutation { setNuxSeen }")  # the "join the community" dialog would cover the screenshots
            yield session
        finally:
            session.terminate_unfinished_runs()


@pytest.fixture(scope="session")
def materialised(dagster_ui) -> dict:
    """"Materialise all" launched through the GraphQL API (`__ASSET_JOB`), polled until it ends."""
    started = time.monotonic()
    run_id = dagster_ui.client().submit_job_execution("__ASSET_JOB", run_config=asset_job_run_config(dagster_ui.root))
    run = dagster_ui.wait_for_run(run_id)
    assert run["status"] == "SUCCESS", f"materialise all ended {run['status']}:\n{dagster_ui.run_errors(run_id)}"
    return {**run, "seconds": time.monotonic() - started}


TRAINED_LORA_QUERY = """
{
  assetOrError(assetKey: {path: ["trained_lora"]}) {
    ... on Asset {
      assetMaterializations(limit: 1) {
        runId
        metadataEntries {
          __typename label
          ... on PathMetadataEntry { path }
          ... on TextMetadataEntry { text }
          ... on UrlMetadataEntry { url }
          ... on IntMetadataEntry { intValue }
          ... on FloatMetadataEntry { floatValue }
        }
      }
    }
  }
}"""


@pytest.fixture(scope="session")
def trained_lora_metadata(dagster_ui, materialised) -> dict:
    """trained_lora's latest materialisation metadata as the webserver reports it: label -> value."""
    (event,) = dagster_ui.graphql(TRAINED_LORA_QUERY)["assetOrError"]["assetMaterializations"]
    assert event["runId"] == materialised["runId"]
    keys = ("path", "text", "url", "intValue", "floatValue")
    return {e["label"]: next((e[k] for k in keys if k in e), None) for e in event["metadataEntries"]}
