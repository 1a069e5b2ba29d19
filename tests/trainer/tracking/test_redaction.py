"""Credentials never leave the environment: URLs shown or stored (training_summary.json, Dagster
metadata, logs, reports) and the MLflow errors the trainer prints carry none."""

import pytest

from trainer.tracking.store import compare_url, redact_url, run_url


@pytest.fixture(autouse=True)
def no_ui_settings(monkeypatch):
    for name in ("QWEN_EDIT_MLFLOW_UI_URL", "MLFLOW_HOST", "MLFLOW_PORT"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    "url, shown",
    [
        ("http://alice:s3cr3t@mlflow.example:5000", "http://mlflow.example:5000"),
        ("https://token-only@mlflow.example/base", "https://mlflow.example/base"),
        ("postgresql+psycopg2://mlflow:pw@db:5432/mlflow", "postgresql+psycopg2://db:5432/mlflow"),
        ("https://host/x?token=abc&experiment=1", "https://host/x?token=***&experiment=1"),
        ("sqlite:////srv/mlruns/mlflow.db", "sqlite:////srv/mlruns/mlflow.db"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("databricks", "databricks"),
    ],
)
def test_credentials_are_stripped(url, shown):
    assert redact_url(url) == shown


def test_run_and_compare_urls_of_a_server_with_credentials_have_none():
    uri = "http://alice:s3cr3t@mlflow.example:5000/"
    for url in (run_url(uri, "3", "abc"), compare_url(uri, ["3"], ["abc", "def"])):
        assert "s3cr3t" not in url and "alice" not in url and url.startswith("http://mlflow.example:5000/#/")


def test_mlflow_error_messages_are_shown_without_credentials():
    from trainer.tracking.mlflow_run import _describe

    error = ConnectionError("API request to http://alice:s3cr3t@mlflow.example:5000/api/2.0/mlflow/runs/create failed")
    assert "s3cr3t" not in _describe(error) and "mlflow.example:5000" in _describe(error)
