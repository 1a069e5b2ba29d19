"""Two projects in one Definitions, trained for real on the tiny model: `style` as it is, `relight` with a
2x1 sweep. Both groups materialise into their own assets, MLflow experiments, registered models and run
folders; both sweep points train (one MLflow run each, tagged with the partition key) on caches encoded
once, and run_comparison ranks them on the rule that promotion follows."""

import os

import dagster as dg
import pytest

from qwen_edit_assets.definitions import build_definitions
from qwen_edit_assets.projects import discover_projects
from tests.conftest import write_small_project

pytestmark = pytest.mark.slow
POINTS = ["learning_rate=1e-3;lora_rank=4", "learning_rate=3e-3;lora_rank=4"]
PARTITIONED = ("trained_lora", "validation_report", "promotion")  # the stages a sweep point has of its own
SMALL = {"n_train": 2, "max_train_steps": 2, "report_to": "mlflow", "checkpointing_steps": 100}


def _failures(result) -> list[str]:
    return [e.event_specific_data.error.message for e in result.all_events if e.event_type_value == "STEP_FAILURE"]


@pytest.fixture(scope="module")
def deployment(demo_root, tmp_path_factory):
    import time

    root = tmp_path_factory.mktemp("deployment")
    folder = root / "projects"
    models = demo_root / "demo" / "models"
    write_small_project(folder / "style", models, tracker_project_name="style-lora", **SMALL)
    write_small_project(folder / "relight", models, tracker_project_name="relight-lora", **SMALL,
                        sweep={"learning_rate": [1e-3, 3e-3], "lora_rank": [4]})
    uri = f"sqlite:///{root / 'mlflow.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri  # one store for the deployment, as QWEN_EDIT_ROOT/mlruns would be
    try:
        defs = build_definitions(projects=discover_projects(folder, root))
        assets = list(defs.assets)

        def materialize(selection, partition_key=None):
            started = time.monotonic()
            result = dg.materialize(assets, selection=selection, partition_key=partition_key, instance=instance,
                                    resources=defs.resources, raise_on_error=False)
            assert result.success, _failures(result)
            print(f"{selection} {partition_key or ''}: {time.monotonic() - started:.1f} s")
            return result

        with dg.DagsterInstance.ephemeral() as instance:
            results = {
                "style": materialize(dg.AssetSelection.groups("style")),
                # the first point with the project's caches, the second point alone: it reads the same caches
                POINTS[0]: materialize(dg.AssetSelection.groups("relight") - dg.AssetSelection.assets(["relight", "run_comparison"]), POINTS[0]),
                POINTS[1]: materialize(dg.AssetSelection.assets(*(["relight", s] for s in PARTITIONED)), POINTS[1]),
                "comparison": materialize(dg.AssetSelection.assets(["relight", "run_comparison"])),
            }
            yield results, instance, uri, folder
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI") if old is None else os.environ.__setitem__("MLFLOW_TRACKING_URI", old)


def _materialized(result) -> set[str]:
    return {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}


def _metadata(result, key: str, partition: str | None = None) -> dict:
    (event,) = [e for e in result.get_asset_materialization_events()
                if e.asset_key.to_user_string() == key and e.partition == partition]
    return event.materialization.metadata


def test_both_groups_materialise_each_into_its_own_assets(deployment):
    results, instance, _, _ = deployment
    stages = {"pairing_manifest", "text_embeds", "vae_latents", *PARTITIONED}
    assert _materialized(results["style"]) == {f"style/{s}" for s in stages} | {"style/run_comparison"}
    assert _materialized(results[POINTS[0]]) == {f"relight/{s}" for s in stages}
    # the caches are the project's, not the point's: encoded once, read by both points
    assert _materialized(results[POINTS[1]]) == {f"relight/{s}" for s in PARTITIONED}
    assert instance.get_latest_materialization_event(dg.AssetKey(["relight", "text_embeds"])).dagster_event.partition is None
    style_dir = _metadata(results["style"], "style/trained_lora")["run_dir"].value
    relight_dir = _metadata(results[POINTS[0]], "relight/trained_lora", POINTS[0])["run_dir"].value
    assert "/style/out/" in style_dir and "/relight/out/" in relight_dir


def test_each_project_logs_to_its_own_mlflow_experiment(deployment):
    from mlflow.tracking import MlflowClient

    results, _, uri, _ = deployment
    client = MlflowClient(uri)
    runs = {}
    for name in ("style-lora", "relight-lora"):
        experiment = client.get_experiment_by_name(name)
        assert experiment is not None, name
        runs[name] = client.search_runs([experiment.experiment_id])
    assert len(runs["style-lora"]) == 1 and len(runs["relight-lora"]) == 2
    style_run = _metadata(results["style"], "style/trained_lora")["mlflow_run_id"].value
    assert [r.info.run_id for r in runs["style-lora"]] == [style_run]
    assert runs["style-lora"][0].data.tags["dagster_project"] == "style"
    assert "dagster_partition" not in runs["style-lora"][0].data.tags


def test_each_sweep_point_is_one_mlflow_run_tagged_with_its_partition(deployment):
    from mlflow.tracking import MlflowClient

    results, _, uri, _ = deployment
    client = MlflowClient(uri)
    for point in POINTS:
        metadata = _metadata(results[point], "relight/trained_lora", point)
        run = client.get_run(metadata["mlflow_run_id"].value)
        assert run.data.tags["dagster_partition"] == point
        assert metadata["sweep_point"].value == {"learning_rate": float(point.split("=")[1].split(";")[0]), "lora_rank": 4}
        assert float(run.data.params["learning_rate"]) == metadata["sweep_point"].value["learning_rate"]
        assert run.data.params["lora_rank"] == "4"
        # the report of this point validated this point's LoRA, into this point's MLflow run
        report = _metadata(results[point], "relight/validation_report", point)
        assert report["run_name"].value == metadata["run_name"].value
        assert "validation_lora_latent_mse" in run.data.metrics
    names = {_metadata(results[p], "relight/trained_lora", p)["run_name"].value for p in POINTS}
    assert len(names) == 2  # one run folder per point


def test_run_comparison_ranks_both_points_with_their_metrics(deployment):
    from mlflow.tracking import MlflowClient

    results, _, uri, _ = deployment
    metadata = _metadata(results["comparison"], "relight/run_comparison")
    assert metadata["runs"].value == 2
    ranked = metadata["ranked_points"].value
    assert sorted(r["point"] for r in ranked) == POINTS and [r["rank"] for r in ranked] == [1, 2]
    client = MlflowClient(uri)
    mse = {r["point"]: client.get_run(r["mlflow_run_id"]).data.metrics["validation_lora_latent_mse"] for r in ranked}
    assert ranked[0]["point"] == min(mse, key=mse.get)  # the promotion metric (lora_latent_mse): lower is better
    assert metadata["best_point"].value == ranked[0]["point"]
    assert metadata["points_without_a_run"].value == []
    table = metadata["ranking"].value
    assert all(point in table for point in POINTS) and "validation_lora_latent_mse (lower is better)" in table


def test_each_project_has_its_own_registered_model_and_the_best_point_is_its_champion(deployment):
    """Promotion (issue 13 part 1) per project: `style-lora` holds style's LoRA, `relight-lora` both points'; the
    point run_comparison ranks first is the one promotion made champion (the same metric, lower is better)."""
    from mlflow.tracking import MlflowClient

    results, _, uri, _ = deployment
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert {m.name for m in client.search_registered_models()} == {"style-lora", "relight-lora"}
    style_versions = client.search_model_versions("name = 'style-lora'")
    assert [v.run_id for v in style_versions] == [_metadata(results["style"], "style/trained_lora")["mlflow_run_id"].value]
    relight_runs = {p: _metadata(results[p], "relight/trained_lora", p)["mlflow_run_id"].value for p in POINTS}
    assert sorted(v.run_id for v in client.search_model_versions("name = 'relight-lora'")) == sorted(relight_runs.values())
    best = _metadata(results["comparison"], "relight/run_comparison")["best_point"].value
    assert client.get_model_version_by_alias("relight-lora", "champion").run_id == relight_runs[best]
    for point in POINTS:
        decision = _metadata(results[point], "relight/promotion", point)["decision"].value
        assert decision == ("champion" if point == best or point == POINTS[0] else "challenger")
