"""Shared fixtures: a project root holding the tiny models and the demo dataset, built once."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")

REPO = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(items):
    """Integration tests (real servers, a browser) run after everything else: unit failures show up first."""
    items.sort(key=lambda item: item.get_closest_marker("integration") is not None)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """tmp/demo/{models/tiny-edit-v1..v3, data/} exactly as `qwen-edit demo-setup` writes them."""
    from trainer.cli import ensure_demo

    root = tmp_path_factory.mktemp("project")
    ensure_demo(root)
    return root


@pytest.fixture
def isolated_mlflow(tmp_path, monkeypatch):
    """A throwaway MLflow store: the trainer honours MLFLOW_TRACKING_URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def write_small_project(root: Path, models: Path, flavour: str = "edit-v2", n_train: int = 4, n_eval: int = 1, **config) -> tuple[Path, Path]:
    """A config.json + multidatabackend.json over a fresh small demo dataset under `root`."""
    import json

    from trainer.demo.dataset import generate_demo_dataset

    data = generate_demo_dataset(root / "data", n_train=n_train, n_eval=n_eval, size=32)
    n_refs = 1 if flavour == "edit-v1" else 3
    folders = ["reference", "reference_2", "reference_3"][:n_refs]
    entries = []
    for split, edit_id in (("train", "edits"), ("eval", "eval")):
        refs = [f"{edit_id}-{folder}" for folder in folders]
        entries.append({"id": edit_id, "instance_data_dir": str(data.folder(split, "edited")), "resolution": 32,
                        "conditioning_data": refs, "cache_dir_vae": str(root / "cache" / "vae" / edit_id)})
        entries += [{"id": ref, "dataset_type": "conditioning", "instance_data_dir": str(data.folder(split, folder))}
                    for ref, folder in zip(refs, folders)]
    settings = {
        "model_flavour": flavour,
        "pretrained_model_name_or_path": str(models / f"tiny-{flavour}"),
        "output_dir": str(root / "out"),
        "max_train_steps": 4,
        "learning_rate": 1e-3,
        "lora_rank": 4,
        "mixed_precision": "no",
        "eval_dataset_id": "eval",
        "validation_resolution": "32x32",
        "validation_num_inference_steps": 2,
        "report_to": "none",
        **({"model_kwargs": {"match_target_res": True}} if flavour != "edit-v1" else {}),
        **config,
    }
    (root / "config.json").write_text(json.dumps(settings, indent=1))
    (root / "multidatabackend.json").write_text(json.dumps(entries, indent=1))
    return root / "config.json", root / "multidatabackend.json"


def prepare_small_project(root: Path, demo_root: Path, **config):
    """A small project with its manifest checked and its caches encoded: ready to train."""
    from trainer.data.caches import build_text_cache, build_vae_cache
    from trainer.workflow import check_data, load_project

    config_path, data_path = write_small_project(root, demo_root / "demo" / "models", **config)
    project = load_project(config_path, data_path, root)
    manifest, _ = check_data(project)
    build_text_cache(manifest, project.dataset_config, project.config)
    build_vae_cache(manifest, project.dataset_config, project.config)
    return project
