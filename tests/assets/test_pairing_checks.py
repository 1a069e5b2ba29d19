"""Bad data is a failed blocking check with the problems as a table, not a crash; sound data is a manifest
table with a column schema and a row count; the dataset folders are observed with data versions, and a
changed folder makes the manifest stale (issue 16 §7-9)."""

import dagster as dg
import pytest

from qwen_edit_assets.assets.pairing import COLUMNS, NO_ORPHANS, PAIRS_COMPLETE
from qwen_edit_assets.assets.raw_datasets import raw_asset_key
from qwen_edit_assets.definitions import build_definitions
from qwen_edit_assets.resources import QwenEditProject
from tests.conftest import write_small_project

DOWNSTREAM = {"pairing_manifest", "text_embeds", "vae_latents", "trained_lora", "validation_report", "run_comparison"}


def _defs(tmp_path, demo_root, **config):
    config_path, data_path = write_small_project(tmp_path, demo_root / "demo" / "models", n_train=3, n_eval=1, **config)
    return build_definitions(QwenEditProject(root=str(tmp_path), config_path=str(config_path), data_path=str(data_path)))


def _checks(result) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def test_a_missing_reference_fails_the_blocking_check_and_nothing_downstream_runs(demo_root, tmp_path, isolated_mlflow):
    defs = _defs(tmp_path, demo_root)
    missing = tmp_path / "data" / "train" / "reference_2" / "0001.png"
    missing.unlink()
    with dg.DagsterInstance.ephemeral() as instance:
        result = defs.resolve_implicit_global_asset_job_def().execute_in_process(instance=instance, raise_on_error=False)
    assert not result.success
    checks = _checks(result)
    assert not checks[PAIRS_COMPLETE].passed and checks[PAIRS_COMPLETE].severity == dg.AssetCheckSeverity.ERROR
    problems = checks[PAIRS_COMPLETE].metadata["problems"].value
    assert [c.name for c in problems.schema.columns] == ["severity", "file", "problem"]
    (row,) = [r.data for r in problems.records]
    assert row["severity"] == "error" and row["file"] == str(missing) and row["problem"].startswith("missing file")
    assert checks[PAIRS_COMPLETE].metadata["errors"].value == 1
    assert checks[NO_ORPHANS].passed  # evaluated, not "execution failed": nothing is wrong with the references

    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert [e.step_key for e in failures] == ["pairing_manifest"]  # Dagster's own blocking-check stop
    assert "blocking asset check" in failures[0].event_specific_data.error.message
    assert PAIRS_COMPLETE in failures[0].event_specific_data.error.message
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert not materialized & DOWNSTREAM  # not even the manifest: no later run can read a bad one
    assert not (tmp_path / "cache").exists()


def test_sound_data_is_a_manifest_table_with_its_schema_and_row_count(demo_root, tmp_path):
    defs = _defs(tmp_path, demo_root)
    raw = [k for k in defs.resolve_asset_graph().get_all_asset_keys() if k.path[0] == "raw"]
    job = defs.resolve_implicit_global_asset_job_def().get_subset(asset_selection={*raw, dg.AssetKey("pairing_manifest")})
    with dg.DagsterInstance.ephemeral() as instance:
        result = job.execute_in_process(instance=instance)
    (event,) = [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == "pairing_manifest"]
    metadata = event.materialization.metadata
    assert metadata["dagster/row_count"].value == 4 == metadata["train_pairs"].value + metadata["eval_pairs"].value
    table = metadata["manifest"].value
    assert [c.name for c in table.schema.columns] == list(COLUMNS)
    assert len(table.records) == 4 and {r.data["name"] for r in table.records} == {"0000", "0001", "0002"}
    assert all(c.description for c in table.schema.columns)
    checks = _checks(result)
    assert checks[PAIRS_COMPLETE].passed and checks[NO_ORPHANS].passed
    spec = defs.resolve_assets_def("pairing_manifest").specs_by_key[dg.AssetKey("pairing_manifest")]
    assert [c.name for c in spec.metadata["dagster/column_schema"].columns] == list(COLUMNS)  # shown before any run


def test_every_check_says_what_it_checks(demo_root, tmp_path):
    defs = _defs(tmp_path, demo_root)
    for assets_def in defs.resolve_asset_graph().assets_defs:
        for spec in assets_def.check_specs:
            assert spec.description, spec.key
    specs = {s.name: s for a in defs.resolve_asset_graph().assets_defs for s in a.check_specs}
    assert specs[PAIRS_COMPLETE].blocking and not specs[NO_ORPHANS].blocking


def test_a_changed_folder_marks_the_manifest_stale(demo_root, tmp_path):
    from dagster._utils.test.data_versions import get_stale_status_resolver
    from dagster._core.definitions.data_version import StaleStatus

    defs = _defs(tmp_path, demo_root)
    graph = defs.resolve_asset_graph()
    raw = sorted((k for k in graph.get_all_asset_keys() if k.path[0] == "raw"), key=str)
    assert all(graph.get(k).is_observable for k in raw)  # sources Dagster watches, not assets it makes
    job = defs.resolve_implicit_global_asset_job_def()
    manifest = dg.AssetKey("pairing_manifest")
    edits = raw_asset_key("edits")
    with dg.DagsterInstance.ephemeral() as instance:
        first = job.get_subset(asset_selection={*raw, manifest}).execute_in_process(instance=instance)
        observed = {e.asset_key: e for e in first.all_events if e.event_type_value == "ASSET_OBSERVATION"}
        assert set(observed) == set(raw)
        version = observed[edits].event_specific_data.asset_observation.tags["dagster/data_version"]
        assert observed[edits].event_specific_data.asset_observation.metadata["images"].value == 3

        def status():
            return get_stale_status_resolver(instance, list(graph.assets_defs)).get_status(manifest)

        assert status() == StaleStatus.FRESH
        (tmp_path / "data" / "train" / "edited" / "0003.png").write_bytes((tmp_path / "data" / "train" / "edited" / "0000.png").read_bytes())
        again = job.get_subset(asset_selection={edits}).execute_in_process(instance=instance)
        (seen,) = [e for e in again.all_events if e.event_type_value == "ASSET_OBSERVATION"]
        assert seen.event_specific_data.asset_observation.tags["dagster/data_version"] != version
        assert status() == StaleStatus.STALE  # the UI shows pairing_manifest (and what follows it) as stale


def test_the_launchpad_overrides_reach_the_data_check_and_a_bad_one_is_one_message(demo_root, tmp_path):
    """The Launchpad's flavour applies to every asset of the run: edit-v1 takes one reference per target, this
    dataset has three, so the data check (not the training, minutes later) stops with the trainer's message."""
    defs = _defs(tmp_path, demo_root)
    run_config = {"ops": {"trained_lora": {"config": {"model_flavour": "edit-v1"}}}}
    with dg.DagsterInstance.ephemeral() as instance:
        result = defs.resolve_implicit_global_asset_job_def().execute_in_process(instance=instance, run_config=run_config, raise_on_error=False)
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failure.step_key == "pairing_manifest"
    data = failure.event_specific_data
    assert data.error.cls_name == "Failure" and "edit-v1" in data.user_failure_data.description, data.user_failure_data
    assert not {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()} & DOWNSTREAM
