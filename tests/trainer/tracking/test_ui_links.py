"""MLflow links: one configurable UI base URL for every link, never with credentials; run descriptions."""

import pytest

from trainer.tracking.store import DESCRIPTION_TAG, compare_url, experiment_url, mlflow_ui_url, run_url, with_description

SQLITE = "sqlite:////srv/project/mlruns/mlflow.db"


@pytest.fixture(autouse=True)
def no_ui_settings(monkeypatch):
    for name in ("QWEN_EDIT_MLFLOW_UI_URL", "MLFLOW_HOST", "MLFLOW_PORT"):
        monkeypatch.delenv(name, raising=False)


def test_the_embedded_store_links_to_make_mlflow_ui_on_its_port(monkeypatch):
    assert mlflow_ui_url(SQLITE) == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_PORT", "5123")
    assert mlflow_ui_url(SQLITE) == "http://127.0.0.1:5123"
    monkeypatch.setenv("MLFLOW_HOST", "0.0.0.0")  # serving every interface: reached here on loopback
    assert mlflow_ui_url(SQLITE) == "http://127.0.0.1:5123"
    monkeypatch.setenv("MLFLOW_HOST", "gpu-box.lan")
    # every link opens MLflow 3's model-training view (its default is the GenAI one, whatever the experiment's kind)
    assert run_url(SQLITE, "3", "abc") == "http://gpu-box.lan:5123/#/experiments/3/runs/abc?workflowType=machine_learning"
    assert experiment_url(SQLITE, "3") == "http://gpu-box.lan:5123/#/experiments/3?workflowType=machine_learning"
    assert compare_url(SQLITE, ["3"], ["abc"]).startswith("http://gpu-box.lan:5123/#/compare-runs?")
    assert compare_url(SQLITE, ["3"], ["abc"]).endswith("&workflowType=machine_learning")


def test_a_tracking_server_is_its_own_ui_and_an_explicit_url_wins(monkeypatch):
    server = "https://alice:pw@mlflow.example.org/"
    monkeypatch.setenv("MLFLOW_PORT", "5123")  # make mlflow-ui's port says nothing about a server
    assert mlflow_ui_url(server) == "https://mlflow.example.org"
    monkeypatch.setenv("QWEN_EDIT_MLFLOW_UI_URL", "https://ui.example.org/mlflow/")
    assert mlflow_ui_url(server) == mlflow_ui_url(SQLITE) == "https://ui.example.org/mlflow"
    assert run_url(server, "1", "r").startswith("https://ui.example.org/mlflow/#/experiments/1/runs/r?")


def test_the_description_links_the_dagster_run_or_says_the_command_line():
    tags = with_description({"dagster_run_id": "abc", "dagster_run_url": "http://127.0.0.1:3000/runs/abc", "flavour": "edit-v2",
                             "overrides": "max_train_steps=20", "manifest_version": "0123"})
    text = tags[DESCRIPTION_TAG]
    assert "Trained by Dagster run [abc](http://127.0.0.1:3000/runs/abc)." in text
    assert "`edit-v2`" in text and "`max_train_steps=20`" in text and "`0123`" in text
    assert "command line" in with_description({"flavour": "edit-v1"})[DESCRIPTION_TAG]
    assert with_description({DESCRIPTION_TAG: "mine"})[DESCRIPTION_TAG] == "mine"  # a --tag description wins
