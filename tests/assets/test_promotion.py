"""The promotion asset: the decision, both versions' metrics and their MLflow pages in its metadata."""

import json

import dagster as dg
import pytest

from qwen_edit_assets.assets.promotion import promotion_asset
from qwen_edit_assets.resources import QwenEditProject
from tests.conftest import tracking_uri_env

pytestmark = pytest.mark.slow  # conftest's promoted_runs trains three times (shared with test_registry)


def _materialize_promotion(project_resource: QwenEditProject, run_name: str) -> dg.ExecuteInProcessResult:
    """promotion alone, after a validation_report materialisation that names the run folder (as the asset records it)."""
    with dg.instance_for_test() as instance:
        instance.report_runless_asset_event(dg.AssetMaterialization("validation_report", metadata={"run_name": run_name}))
        return dg.materialize([promotion_asset()], resources={"project": project_resource}, instance=instance, raise_on_error=False)


def _resource(project, config_path=None) -> QwenEditProject:
    return QwenEditProject(root=str(project.root), config_path=str(config_path or project.config_path), data_path=str(project.data_path))


def test_the_metadata_holds_the_decision_both_versions_and_their_links(promoted_runs):
    project = promoted_runs.project
    with tracking_uri_env(promoted_runs.uri):
        result = _materialize_promotion(_resource(project), "worse")
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    metadata = result.asset_materializations_for_node("promotion")[-1].metadata
    assert metadata["decision"].value == "challenger" and metadata["version"].value == 2
    assert metadata["newly_registered"].value is False  # registered when it was trained: one version per run
    assert metadata["champion_version"].value == 3 and metadata["previous_champion_version"].value == 3
    worse, better = (promoted_runs.steps[i][0].new.metrics["validation_lora_latent_mse"] for i in (1, 2))
    assert metadata["new_lora_latent_mse"].value == worse
    assert metadata["previous_champion_lora_latent_mse"].value == better
    assert "not lower by more than the margin 0" in metadata["reason"].value
    assert metadata["version_url"].value.endswith("/#/models/promotion-demo/versions/2?workflowType=machine_learning")
    assert metadata["previous_champion_url"].value.endswith("/#/models/promotion-demo/versions/3?workflowType=machine_learning")
    assert metadata["registered_model_url"].value.endswith("/#/models/promotion-demo?workflowType=machine_learning")
    assert "/runs/" in metadata["mlflow_run_url"].value
    table = metadata["comparison"].value
    assert "| metric | new: version 2 | champion: version 3 |" in table and "| lora_latent_mse (decides) |" in table


def test_without_mlflow_nothing_is_registered_and_the_run_does_not_fail(promoted_runs, tmp_path):
    project = promoted_runs.project
    config = json.loads(project.config_path.read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "report_to": "none"}))
    with tracking_uri_env(promoted_runs.uri):
        result = _materialize_promotion(_resource(project, tmp_path / "config.json"), "first")
    assert result.success
    assert result.asset_materializations_for_node("promotion")[-1].metadata["decision"].value == "not registered (report_to: none)"


def test_a_run_folder_that_cannot_be_registered_fails_with_the_one_message(promoted_runs):
    with tracking_uri_env(promoted_runs.uri):
        result = _materialize_promotion(_resource(promoted_runs.project), "never-trained")
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    message = failure.step_failure_data.error.message
    assert "no training_summary.json" in message and "never-trained" in message and "Traceback" not in message
