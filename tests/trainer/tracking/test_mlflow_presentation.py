"""What a training run looks like in MLflow (issue 16 §1-6), on a real embedded store: the experiment opens
on its runs, the run is named and linked to its Dagster run, the manifest is its dataset, validation edits
are images per step, metrics at the step they belong to, one name per concept."""

from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from tests.conftest import write_small_project
from trainer.config.schema import TrainConfig
from trainer.data.versions import manifest_version
from trainer.evaluation.validation import ValidationReport, ValidationRow, log_to_mlflow
from trainer.tracking.loss_summary import FINAL_LOSS
from trainer.tracking.mlflow_run import MlflowRun
from trainer.tracking.store import DESCRIPTION_TAG, EXPERIMENT_KIND, EXPERIMENT_KIND_TAG
from trainer.workflow import check_data, load_project

RUN_NAME = "edit-v2_seed-7_dagster-abcd1234"


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    from mlflow.tracking import MlflowClient

    return uri, MlflowClient(uri)


def _manifest(tmp_path, demo_root) -> Path:
    config, data = write_small_project(tmp_path / "project", demo_root / "demo" / "models", n_train=2, n_eval=1)
    project = load_project(config, data, tmp_path / "project")
    check_data(project)
    return project.manifest_path


def _report(folder: Path, colour: str) -> ValidationReport:
    """A validation report as trainer.evaluation.validation writes it: one pair, its images beside the HTML."""
    images = folder / "images"
    images.mkdir(parents=True)
    paths = {}
    for stage, fill in (("reference_1", "red"), ("base", "gray"), ("lora", colour), ("target", "blue")):
        paths[stage] = images / f"0000_{stage}.png"
        Image.new("RGB", (32, 32), fill).save(paths[stage])
    (folder / "report.html").write_text("<html></html>")
    row = ValidationRow("0000", "make the square blue", [str(paths["reference_1"])], str(paths["target"]),
                        str(paths["base"]), str(paths["lora"]), {"base_psnr": 10.0, "lora_psnr": 20.0})
    return ValidationReport([row], folder / "report.html", folder / "grid.png", {"base_psnr": 10.0, "lora_psnr": 20.0}, "eval")


def test_a_training_run_as_mlflow_shows_it(tmp_path, store, demo_root):
    uri, client = store
    manifest = _manifest(tmp_path, demo_root)
    lora, curve = tmp_path / "lora.safetensors", tmp_path / "loss_curve.png"
    lora.write_bytes(b"lora")
    Image.new("RGB", (8, 8)).save(curve)
    tags = {"dagster_run_id": "abcd1234", "dagster_run_url": "http://127.0.0.1:3000/runs/abcd1234", "flavour": "edit-v2"}
    run = MlflowRun(TrainConfig(tracker_run_name=RUN_NAME, seed=7), tmp_path, tags, manifest, output_dir=tmp_path / "out")
    for step in (1, 2, 3, 4):
        run.log_step(step, 1.0 / step, 1e-4)
        if step in (2, 4):  # live validation: the LoRA's edit changes from step to step
            run.log_validation(step, _report(tmp_path / f"step-{step}", "green" if step == 2 else "blue"))
    assert run.finish(SimpleNamespace(final_loss=0.25, seconds=1.0, lora_path=lora), curve) is None

    (experiment,) = [e for e in client.search_experiments() if e.name == "qwen-edit"]
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND  # MLflow 3 opens it on its runs, not on traces
    logged = client.get_run(run.run_id)
    assert logged.info.run_name == RUN_NAME
    assert "Trained by Dagster run [abcd1234](http://127.0.0.1:3000/runs/abcd1234)." in logged.data.tags[DESCRIPTION_TAG]

    # the manifest is the run's training dataset, under the same version the tags and checkpoints carry
    (dataset_input,) = logged.inputs.dataset_inputs
    assert dataset_input.dataset.name == "pairing_manifest"
    assert dataset_input.dataset.digest == manifest_version(manifest) == logged.data.tags["manifest_version"]
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "training"

    # learning_rate is a param only; the scheduled rate per step is the metric `lr`
    assert logged.data.params["learning_rate"] == "0.0001" and "learning_rate" not in logged.data.metrics
    assert [m.step for m in client.get_metric_history(run.run_id, "lr")] == [1, 2, 3, 4]
    assert logged.data.metrics[FINAL_LOSS] == 0.25 and "final_loss" not in logged.data.metrics
    assert [(m.step, m.value) for m in client.get_metric_history(run.run_id, "validation_lora_psnr")] == [(2, 20.0), (4, 20.0)]

    # one image per pair and validation step: MLflow's slider walks through them
    images = [a.path for a in client.list_artifacts(run.run_id, "images")]
    steps = sorted(int(p.split("+step+")[1].split("+")[0]) for p in images if p.startswith("images/validation~0000+") and p.endswith(".png"))
    assert steps == [2, 4], images
    assert logged.data.tags["mlflow.loggedImages"] == "True"


def test_the_final_validation_is_logged_at_the_last_step(tmp_path, store):
    uri, client = store
    # an absolute artifact location: the default is ./mlruns of the working directory (the repository)
    run = client.create_run(client.create_experiment("final", artifact_location=(tmp_path / "artifacts").as_uri()))
    log_to_mlflow(_report(tmp_path / "validation", "blue"), run.info.run_id, uri, step=40)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "validation_lora_psnr")] == [40]
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert any(p.startswith("images/validation~0000+step+40+") for p in images), images
    assert any(a.path == "validation/report.html" for a in client.list_artifacts(run.info.run_id, "validation"))
    assert client.get_run(run.info.run_id).info.status == "RUNNING"  # logging the report does not end the run


def test_an_older_experiment_is_marked_as_training_but_another_kind_is_kept(tmp_path, store):
    uri, client = store
    plain = client.create_experiment("plain")
    other = client.create_experiment("other", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    for name in ("plain", "other"):
        MlflowRun(TrainConfig(tracker_project_name=name), tmp_path, {}, output_dir=tmp_path / name).end("FINISHED")
    assert client.get_experiment(plain).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert client.get_experiment(other).tags[EXPERIMENT_KIND_TAG] == "genai_development"
