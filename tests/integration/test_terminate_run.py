"""*Terminate* in the Dagster UI (the webserver's `terminateRun` mutation, what the button sends) while
`trained_lora` trains with two accelerate ranks (config/accelerate/ddp.yaml on the CPU, gloo): the launcher
and every rank end within a bound, the run ends CANCELED, and no process of the training is left."""

import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import prepare_small_project
from tests.integration.conftest import LAUNCH_RUN, RUN_ERRORS_QUERY, TERMINATE_MUTATION, instance_home, started_ui
from tests.integration.servers import LOCATION, REPO, REPOSITORY, DagsterUI, wait_until

pytestmark = pytest.mark.integration
STOP_WITHIN_S = 60  # from the mutation to the last rank gone (the trainer's own shutdown, on 2 busy cores)



@pytest.fixture(scope="module")
def ddp_ui(demo_root, tmp_path_factory, artifacts_dir):
    """`make ui` on a small project whose training runs as two CPU processes (QWEN_EDIT_ACCELERATE_CONFIG) and
    would take hours: it only ends when terminated."""
    base = tmp_path_factory.mktemp("terminate")
    # two training pairs (one per rank) keep the caching short
    project = prepare_small_project(base, demo_root, n_train=2, max_train_steps=1_000_000, checkpointing_steps=1_000_000)
    settings = yaml.safe_load((REPO / "config" / "accelerate" / "ddp.yaml").read_text())
    settings.update(use_cpu=True, num_processes=2)
    (base / "ddp-cpu.yaml").write_text(yaml.safe_dump(settings))
    home = instance_home(base)
    env = {"QWEN_EDIT_ROOT": str(base), "QWEN_EDIT_CONFIG": str(project.config_path), "QWEN_EDIT_DATA": str(project.data_path),
           "QWEN_EDIT_ACCELERATE_CONFIG": str(base / "ddp-cpu.yaml"), "ACCELERATE_USE_CPU": "true",
           "MLFLOW_TRACKING_URI": f"sqlite:///{base / 'mlflow.db'}"}
    # stopping it fails if anything of its session is left
    with started_ui(home, env, base / "dagster-dev.log", artifacts_dir / "dagster-dev-terminate.log") as ui:
        yield ui, base


def training_processes(marker: str) -> dict[str, int]:
    """The launcher ('launcher') and each rank ('rank 0', 'rank 1') of trainings whose environment names `marker`."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() not in b"\0".join(environ) or b"trainer.train" not in cmdline or state == "Z":
            continue
        rank = next((v[5:].decode() for v in environ if v.startswith(b"RANK=")), None)
        found[f"rank {rank}" if rank is not None else "launcher" if b"accelerate" in cmdline else f"pid {entry.name}"] = int(entry.name)
    return found


def messages(ui: DagsterUI, run_id: str) -> list[str]:
    return [e.get("message") or "" for e in ui.graphql(RUN_ERRORS_QUERY, {"runId": run_id})["logsForRun"]["events"]]


@pytest.mark.slow
def test_terminate_stops_every_rank_and_leaves_nothing_running(ddp_ui):
    ui, base = ddp_ui
    selector = {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY, "jobName": "__ASSET_JOB",
                "assetSelection": [{"path": ["trained_lora"]}]}
    launched = ui.graphql(LAUNCH_RUN, {"params": {"selector": selector, "runConfigData": {}}})["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]

    def both_ranks_training():
        found = training_processes(str(base))
        # rank 0 reports once the accelerator is prepared, which both ranks pass together (gloo)
        started = any("2 process(es)" in m for m in messages(ui, run_id))
        return {"launcher", "rank 0", "rank 1"} <= set(found) and started and found

    running = wait_until(both_ranks_training, "both ranks training", 300, interval=1, alive=ui.process, log=ui.log_path)
    time.sleep(2)  # a few steps in: the ranks are inside the training loop's collectives

    terminated = ui.graphql(TERMINATE_MUTATION, {"runId": run_id})["terminateRun"]
    assert terminated["__typename"] == "TerminateRunSuccess", terminated
    asked = time.monotonic()
    wait_until(lambda: not any(Path(f"/proc/{pid}").exists() and _alive(pid) for pid in running.values()),
               f"the launcher and both ranks {running} to end", STOP_WITHIN_S, interval=0.5)
    stopped_after = time.monotonic() - asked
    print(f"terminate -> every rank gone: {stopped_after:.1f}s ({running})")

    status = wait_until(lambda: (s := ui.graphql("query ($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }",
                                                  {"id": run_id})["runOrError"]["status"]) in ("CANCELED", "FAILURE", "SUCCESS") and s,
                        "the run to end", 120, interval=1)
    assert status == "CANCELED", (status, "\n".join(messages(ui, run_id))[-3000:])
    assert training_processes(str(base)) == {}  # no orphan: nothing of any training of this project runs


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
