"""The whole asset graph, materialised on the tiny model in a throwaway Dagster instance and MLflow store."""

import json
from pathlib import Path

import dagster as dg
import pytest
import torch

from qwen_edit_assets.definitions import build_definitions
from qwen_edit_assets.metadata import rounded
from qwen_edit_assets.resources import QwenEditProject
from trainer.workflow import example_paths

pytestmark = pytest.mark.slow
TRAIN_STEPS = 80
HELD_OUT_BAR = 0.95  # measured 0.906 (base 1.551, LoRA 1.405) on the tiny-model demo; no learning gives 1.0000


def _materialize_all(root: Path, config: Path, data: Path, run_config: dict | None = None) -> dg.ExecuteInProcessResult:
    defs = build_definitions(QwenEditProject(root=str(root), config_path=str(config), data_path=str(data)))
    job = defs.resolve_implicit_global_asset_job_def()
    with dg.DagsterInstance.ephemeral() as instance:
        return job.execute_in_process(instance=instance, run_config=run_config or {}, raise_on_error=False)


@pytest.fixture(scope="module")
def materialized(demo_root, tmp_path_factory):
    """edit-v2 preset over the demo data: every asset, with training shortened from the Launchpad."""
    import os

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        config, data = example_paths("qwen_image.edit-v2-lora")
        result = _materialize_all(demo_root, config, data, {"ops": {"trained_lora": {"config": {"max_train_steps": TRAIN_STEPS}}}})
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI") if old is None else os.environ.__setitem__("MLFLOW_TRACKING_URI", old)
    return result, (demo_root / "outputs" / "qwen_image.edit-v2-lora" / "latest").resolve(), uri  # the run's own folder


def _materialization(result: dg.ExecuteInProcessResult, key: str):
    (event,) = [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == key]
    return event.materialization


def test_every_asset_materialises(materialized):
    result, _, _ = materialized
    assert result.success
    keys = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert {"pairing_manifest", "text_embeds", "vae_latents", "trained_lora", "validation_report"} <= keys
    observed = {e.asset_key.to_user_string() for e in result.all_events if e.event_type_value == "ASSET_OBSERVATION"}
    assert len(observed) == 8 and all(k.startswith("raw/") for k in observed)  # the folders: observed, not made


def test_training_lowers_the_held_out_loss_and_the_check_says_so(materialized):
    """loss_decreased compares the LoRA with the base on the same fixed σ and noise (no-learning baseline),
    not the first and last training losses, which differ by their σ draws alone."""
    result, out, _ = materialized
    summary = json.loads((out / "training_summary.json").read_text())
    assert len(summary["loss_history"]) == TRAIN_STEPS
    base, lora = summary["held_out_base_loss"], summary["held_out_lora_loss"]
    print(f"held-out loss: base {base:.5f}, LoRA {lora:.5f}, ratio {lora / base:.4f}")
    assert lora < HELD_OUT_BAR * base, (base, lora)
    check = {c.check_name: c for c in result.get_asset_check_evaluations()}["loss_decreased"]
    assert check.passed
    assert check.metadata["held_out_lora_loss"].value == lora and check.metadata["held_out_base_loss"].value == base
    metadata = _materialization(result, "trained_lora").metadata  # shown to 4 significant digits
    assert (metadata["held_out_base_loss"].value, metadata["held_out_lora_loss"].value) == (rounded(base), rounded(lora))


def test_trained_lora_metadata_points_at_the_lora_and_the_mlflow_run(materialized):
    result, out, _ = materialized
    metadata = _materialization(result, "trained_lora").metadata
    assert Path(metadata["lora_path"].value) == out / "lora" / "pytorch_lora_weights.safetensors"
    assert metadata["steps"].value == TRAIN_STEPS
    assert metadata["mlflow_run_id"].value
    assert "/runs/" + metadata["mlflow_run_id"].value in metadata["mlflow_run_url"].value


def test_lora_loads_into_a_fresh_diffusers_pipeline_and_changes_its_output(materialized, demo_root):
    from diffusers import QwenImageEditPlusPipeline

    from trainer.data.images import load_rgb

    _, out, _ = materialized
    pipe = QwenImageEditPlusPipeline.from_pretrained(demo_root / "demo" / "models" / "trained-edit-v2")  # the preset's model
    pipe.set_progress_bar_config(disable=True)
    reference = load_rgb(demo_root / "demo" / "data" / "eval" / "reference" / "0000.png")

    def edit():
        return pipe(image=[reference], prompt="make the square blue", height=64, width=64, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(0), output_type="latent").images

    before = edit()
    pipe.load_lora_weights(str(out / "lora"))
    after = edit()
    assert pipe.get_list_adapters() == {"transformer": ["default_0"]}
    assert not torch.allclose(before, after, atol=1e-4)


def test_report_covers_every_eval_pair(materialized, demo_root):
    result, out, _ = materialized
    report = json.loads((out / "validation" / "report.json").read_text())
    eval_names = sorted(p.stem for p in (demo_root / "demo" / "data" / "eval" / "edited").glob("*.png"))
    assert sorted(r["name"] for r in report["rows"]) == eval_names
    assert report["source_split"] == "eval"
    html = (out / "validation" / "report.html").read_text()
    for row in report["rows"]:
        for image in (*row["references"], row["base_image"], row["lora_image"], row["target"]):
            assert Path(image).is_file() and Path(image).name in html
    assert _materialization(result, "validation_report").metadata["pairs"].value == len(eval_names)


def test_mlflow_run_has_params_loss_history_and_artifacts(materialized):
    from mlflow.tracking import MlflowClient

    result, _, uri = materialized
    run_id = _materialization(result, "trained_lora").metadata["mlflow_run_id"].value
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.data.params["model_flavour"] == "edit-v2"
    assert run.data.params["max_train_steps"] == str(TRAIN_STEPS)  # the Launchpad override reached the trainer
    assert run.data.tags["dagster_run_id"] == result.run_id
    assert len(client.get_metric_history(run_id, "train_loss")) == TRAIN_STEPS
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"lora", "plots", "validation"} <= artifacts
    assert any(a.path.endswith("report.html") for a in client.list_artifacts(run_id, "validation"))
    assert "validation_lora_latent_mse" in run.data.metrics


def test_one_data_version_in_dagster_mlflow_and_the_checkpoint(materialized):
    """The manifest's id is the same on pairing_manifest, on trained_lora, in MLflow and in the checkpoint."""
    from mlflow.tracking import MlflowClient

    from trainer.training.checkpoints import load_checkpoint

    result, out, uri = materialized
    dagster_version = _materialization(result, "pairing_manifest").tags["dagster/data_version"]
    lora = _materialization(result, "trained_lora").metadata
    run = MlflowClient(uri).get_run(lora["mlflow_run_id"].value)
    checkpoint = load_checkpoint(out / "checkpoints" / f"checkpoint-{TRAIN_STEPS}")
    assert dagster_version == run.data.tags["manifest_version"] == checkpoint.data_version == lora["data_version"].value


def test_promotion_registers_the_validated_lora_as_the_first_champion(materialized):
    """The end of the graph: the LoRA validation_report validated is version 1 of the project's registered model,
    tagged with the Dagster run that trained it; the asset's metadata says so and links its MLflow page."""
    from mlflow.tracking import MlflowClient

    result, _, uri = materialized
    metadata = _materialization(result, "promotion").metadata
    assert metadata["decision"].value == "champion" and metadata["version"].value == 1
    assert "no champion yet" in metadata["reason"].value
    version = MlflowClient(uri).get_model_version_by_alias("qwen-edit-demo", "champion")  # tracker_project_name
    assert version.run_id == _materialization(result, "trained_lora").metadata["mlflow_run_id"].value
    assert version.tags["dagster_run_id"] == result.run_id and version.tags["flavour"] == "edit-v2"
    assert metadata["version_url"].value.endswith("/#/models/qwen-edit-demo/versions/1?workflowType=machine_learning")
