"""config/accelerate/ddp.yaml under Dagster Pipes: two training processes (CPU, gloo), rank 0 alone reports."""

import dagster as dg
import pytest
import yaml

from tests.conftest import prepare_small_project
from tests.integration.servers import REPO

pytestmark = pytest.mark.integration
N_TRAIN, STEPS = 8, 4  # one epoch over two processes: each draws half the samples


def test_two_ranks_train_and_rank_0_alone_reports(demo_root, tmp_path, monkeypatch):
    from qwen_edit_assets.assets.training import trained_lora_asset
    from qwen_edit_assets.resources import QwenEditProject

    project = prepare_small_project(tmp_path, demo_root, n_train=N_TRAIN, max_train_steps=0, num_train_epochs=1)
    settings = yaml.safe_load((REPO / "config" / "accelerate" / "ddp.yaml").read_text())
    settings.update(use_cpu=True, num_processes=2)  # the same file, on this machine's CPU: two processes over gloo
    (tmp_path / "ddp-cpu.yaml").write_text(yaml.safe_dump(settings))
    monkeypatch.setenv("QWEN_EDIT_ACCELERATE_CONFIG", str(tmp_path / "ddp-cpu.yaml"))
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")

    resource = QwenEditProject(root=str(tmp_path), config_path=str(project.config_path), data_path=str(project.data_path))
    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize(
            [trained_lora_asset(resource)], instance=instance, raise_on_error=False,
            resources={"project": resource, "pipes_subprocess_client": dg.PipesSubprocessClient()},
        )
        messages = [e.user_message for e in instance.all_logs(result.run_id)]
    failures = [e.event_specific_data.error.message for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert result.success, failures
    (materialization,) = result.asset_materializations_for_node("trained_lora")  # two reporting ranks would fail the run
    assert materialization.metadata["steps"].value == STEPS
    started = [m for m in messages if "process(es)" in m]
    assert len(started) == 1 and "2 process(es)" in started[0], started  # rank 1 kept quiet
    assert (tmp_path / "out" / "latest" / "lora" / "pytorch_lora_weights.safetensors").is_file()  # in the run's folder
