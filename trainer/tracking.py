"""MLflow: an embedded sqlite store under the project by default, a tracking server when configured.

Paths are always absolute (MLflow resolves relative sqlite URIs against the working directory).
"""

import os
from pathlib import Path

ENV_URI = "MLFLOW_TRACKING_URI"


def default_tracking_uri(root: Path) -> str:
    return f"sqlite:///{(Path(root) / 'mlruns' / 'mlflow.db').resolve()}"


def tracking_uri(root: Path) -> str:
    return os.environ.get(ENV_URI) or default_tracking_uri(root)


def ensure_experiment(name: str, uri: str, root: Path) -> str:
    """The experiment's id, created with an absolute artifact location when new."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:"):
        (Path(root) / "mlruns").mkdir(parents=True, exist_ok=True)
        location = (Path(root) / "mlruns" / "artifacts").resolve().as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


def run_url(uri: str, experiment_id: str, run_id: str, ui: str = "http://127.0.0.1:5000") -> str:
    """Where the run opens in the MLflow UI (`make mlflow-ui` serves the embedded store there)."""
    base = uri if uri.startswith("http") else ui
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
