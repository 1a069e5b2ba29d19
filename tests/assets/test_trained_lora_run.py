"""trained_lora under Dagster on a tiny project, twice: each run in its own folder (the second never
overwrites the first), `latest` moves, the run's tags and metadata read at a glance, what the trainer
says before Pipes opens reaches the event log, and the MLflow run is named and linked (issue 16)."""

import json

import dagster as dg
import pytest

from qwen_edit_assets.assets.training import trained_lora_asset
from qwen_edit_assets.metadata import rounded
from qwen_edit_assets.resources import QwenEditProject
from tests.conftest import prepare_small_project
from trainer.tracking.loss_summary import FINAL_LOSS
from trainer.tracking.store import DESCRIPTION_TAG

pytestmark = pytest.mark.slow
LAUNCHPAD = {"ops": {"trained_lora": {"config": {"tracker_run_name": "ui-test", "learning_rate": 2e-3}}}}


def _materialise(project):
    resource = QwenEditProject(root=str(project.root), config_path=str(project.config_path), data_path=str(project.data_path))
    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize(
            [trained_lora_asset(resource)], instance=instance, raise_on_error=False, run_config=LAUNCHPAD,
            resources={"project": resource, "pipes_subprocess_client": dg.PipesSubprocessClient()},
        )
        messages = [e.user_message for e in instance.all_logs(result.run_id)]
        tags = instance.get_run_by_id(result.run_id).tags
    assert result.success, [e.event_specific_data.error.message for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    (materialization,) = result.asset_materializations_for_node("trained_lora")
    return result, materialization.metadata, messages, tags


def test_two_runs_two_folders_readable_metadata_and_a_named_linked_mlflow_run(demo_root, tmp_path, isolated_mlflow):
    from mlflow.tracking import MlflowClient

    project = prepare_small_project(tmp_path, demo_root, max_train_steps=2, report_to="mlflow", resume_from_checkpoint="latest")
    out = project.output_dir
    leftover = out / "ui-test" / ".training_summary.json.k1ll3d.tmp"  # what a save cut short by a kill leaves
    leftover.parent.mkdir(parents=True)
    leftover.write_text("{")

    result, metadata, messages, tags = _materialise(project)
    first = out / "ui-test"
    assert metadata["run_name"].value == "ui-test" and metadata["run_dir"].value == str(first)
    assert (out / "latest").resolve() == first.resolve()
    summary = json.loads((first / "training_summary.json").read_text())
    assert metadata[FINAL_LOSS].value == rounded(summary[FINAL_LOSS])  # 4 significant digits
    assert "final_loss" not in metadata and "lora_bytes" not in metadata
    assert metadata["lora_size_mb"].value == rounded((first / "lora" / "pytorch_lora_weights.safetensors").stat().st_size / 1e6, 3)
    assert (first / "pairing_manifest.json").read_bytes() == project.manifest_path.read_bytes()  # the run keeps its data
    # said by the trainer before Dagster Pipes was open: in the event log all the same
    assert any("removed 1 leftover(s) of an interrupted save" in m for m in messages), messages
    assert not leftover.exists()
    assert tags["qwen-edit/flavour"] == "edit-v2" and tags["qwen-edit/learning_rate"] == "0.002"
    assert tags["qwen-edit/tracker_run_name"] == "ui-test"

    run = MlflowClient(isolated_mlflow).get_run(metadata["mlflow_run_id"].value)
    assert run.info.run_name == "ui-test" and run.data.params["learning_rate"] == "0.002"
    assert f"[{result.run_id}](http://" in run.data.tags[DESCRIPTION_TAG] and run.data.tags["dagster_run_url"].endswith(f"/runs/{result.run_id}")
    assert run.data.params["output_dir"] == str(first)

    # the same launch again: the first run finished, so this one gets a folder of its own
    _, again, _, _ = _materialise(project)
    second = out / "ui-test-2"
    assert again["run_dir"].value == str(second) and (out / "latest").resolve() == second.resolve()
    assert (first / "lora" / "pytorch_lora_weights.safetensors").is_file() and (second / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((first / "training_summary.json").read_text()) == summary  # untouched
