"""Shared fixtures: a project root holding the tiny models and the demo dataset, built once."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")

REPO = Path(__file__).resolve().parent.parent


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
