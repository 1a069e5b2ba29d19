"""new_pairs_sensor under the real daemon: switched on, it remembers the folders; a new pair launches `retrain`."""

import shutil
from pathlib import Path

import pytest

from tests.integration.conftest import TERMINAL, TERMINATE_MUTATION
from tests.integration.servers import LOCATION, REPOSITORY, wait_until

pytestmark = pytest.mark.integration

SELECTOR = {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY, "sensorName": "new_pairs_sensor"}

START = """
mutation ($selector: SensorSelector!) {
  startSensor(sensorSelector: $selector) { __typename ... on Sensor { sensorState { status } } ... on PythonError { message } }
}"""

STOP = """
mutation ($id: String!) {
  stopSensor(id: $id) { __typename ... on StopSensorMutationResult { instigationState { status } } }
}"""

TICKS = """
query ($selector: SensorSelector!) {
  sensorOrError(sensorSelector: $selector) {
    ... on Sensor { id minIntervalSeconds sensorState { id status ticks(limit: 20) { id status cursor skipReason runIds error { message } } } }
  }
}"""


def _ticks(dagster_ui) -> list[dict]:
    return dagster_ui.graphql(TICKS, {"selector": SELECTOR})["sensorOrError"]["sensorState"]["ticks"]


def _add_pair(root, name: str) -> list:
    """A new pair in the demo training set: a copy of pair 0000 under a new name in every folder."""
    train = root / "demo" / "data" / "train"
    added = [Path(shutil.copy(train / "edited" / "0000.txt", train / "edited" / f"{name}.txt"))]
    for folder in ("edited", "reference", "reference_2", "reference_3"):
        added.append(Path(shutil.copy(train / folder / "0000.png", train / folder / f"{name}.png")))
    return added


def _terminate(dagster_ui, run_id: str) -> None:
    """Terminates the run and waits for it to end; a run still starting cannot be reached yet, so retry."""
    answers = []

    def terminated() -> bool:
        if dagster_ui.run(run_id)["status"] in TERMINAL:
            return True
        answers.append(dagster_ui.graphql(TERMINATE_MUTATION, {"runId": run_id})["terminateRun"])
        return answers[-1]["__typename"] == "TerminateRunSuccess"

    try:
        wait_until(terminated, f"terminating run {run_id}", 60, interval=1)
    except AssertionError as error:
        raise AssertionError(f"{error}\nterminateRun answered: {answers[-3:]}") from None
    assert dagster_ui.wait_for_run(run_id, timeout=120)["status"] in TERMINAL


def test_a_new_pair_makes_the_daemon_launch_retrain(dagster_ui, materialised):
    sensor = dagster_ui.graphql(TICKS, {"selector": SELECTOR})["sensorOrError"]
    assert sensor["minIntervalSeconds"] == 1  # QWEN_EDIT_SENSOR_INTERVAL reached the code location
    assert sensor["sensorState"]["status"] == "STOPPED"  # off until someone switches it on
    started = dagster_ui.graphql(START, {"selector": SELECTOR})["startSensor"]
    assert started["__typename"] == "Sensor", started

    added, run_id = [], None
    try:
        # first evaluation: nothing requested, the folders' versions become the cursor
        first = wait_until(lambda: [t for t in _ticks(dagster_ui) if t["status"] != "STARTED"], "the sensor's first tick", 90, interval=1)
        assert first[-1]["status"] == "SKIPPED" and first[-1]["cursor"], first
        assert "first evaluation" in first[-1]["skipReason"]

        added = _add_pair(dagster_ui.root, "0100")
        launched = wait_until(lambda: [t for t in _ticks(dagster_ui) if t["status"] == "SUCCESS" or t["error"]],
                              "a tick that requests a run", 90, interval=1)
        assert not launched[0]["error"], launched[0]["error"]
        (run_id,) = launched[0]["runIds"]
        run = dagster_ui.run(run_id)
        assert run["jobName"] == "retrain"
        tags = {t["key"]: t["value"] for t in run["tags"]}
        assert tags["dagster/sensor_name"] == "new_pairs_sensor"
        assert "demo-edits" in tags["qwen-edit/changed"].split(",")
    finally:
        stopped = dagster_ui.graphql(STOP, {"id": sensor["id"]})["stopSensor"]
        assert stopped["instigationState"]["status"] == "STOPPED", stopped
        if run_id:  # seen: stop it rather than retrain for minutes
            _terminate(dagster_ui, run_id)
        for path in added:
            path.unlink()
