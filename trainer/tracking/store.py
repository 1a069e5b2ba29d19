"""MLflow: an embedded sqlite store under the project by default, a tracking server when configured.

Paths are always absolute (MLflow resolves relative sqlite URIs against the working directory).
"""

import json
import os
import subprocess
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from trainer.data.versions import manifest_version

ENV_URI = "MLFLOW_TRACKING_URI"
_SECRET_QUERY_KEYS = ("password", "passwd", "pwd", "token", "secret", "key", "signature", "credential")
UI_URL_ENV = "QWEN_EDIT_MLFLOW_UI_URL"  # where people open the MLflow UI, when neither of the two below says it
UI_HOST_ENV, UI_PORT_ENV = "MLFLOW_HOST", "MLFLOW_PORT"  # `make mlflow-ui`'s address (the Makefile exports both)
# MLflow 3 opens an experiment without this tag in its GenAI view (traces); ours hold training runs
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
DESCRIPTION_TAG = "mlflow.note.content"  # the run's description on its MLflow page (markdown)
# MLflow 3.17's UI picks its GenAI or model-training view from a global toggle (default GenAI, kept in the
# browser), not from the experiment's kind; this query parameter opens our links in the model-training view
MODEL_TRAINING_VIEW = "workflowType=machine_learning"
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


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
    return mlflow.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})


def mark_training_experiment(client, experiment) -> None:
    """An experiment created before the kind tag existed (or by hand) opens on its runs too; a kind set by
    someone else is kept."""
    if EXPERIMENT_KIND_TAG not in (experiment.tags or {}):
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


def redact_url(url: str) -> str:
    """`url` without credentials, for anything shown or stored: `user:pass@` dropped, secret query values `***`.

    The tracking URI itself (with its credentials) stays in the environment, where MLflow reads it.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if not parts.netloc and not parts.query:
        return url  # a path, or sqlite:///...
    netloc = parts.netloc.rpartition("@")[2]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_is_secret(k) for k, _ in pairs):
            query = urlencode([(k, "***" if _is_secret(k) else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _is_secret(key: str) -> bool:
    return any(word in key.lower() for word in _SECRET_QUERY_KEYS)


def mlflow_ui_url(uri: str | None = None) -> str:
    """The one base URL of every MLflow link: a tracking server is its own UI; the embedded store's UI
    is `make mlflow-ui`'s address (MLFLOW_HOST, MLFLOW_PORT); QWEN_EDIT_MLFLOW_UI_URL wins over both
    (a proxy, another host name). Never with credentials."""
    explicit = os.environ.get(UI_URL_ENV)
    if explicit:
        return redact_url(explicit).rstrip("/")
    if uri and uri.startswith(("http://", "https://")):
        return redact_url(uri).rstrip("/")
    host = os.environ.get(UI_HOST_ENV) or "127.0.0.1"
    if host in ("0.0.0.0", "::"):  # listening everywhere: this machine reaches it on loopback
        host = "127.0.0.1"
    return f"http://{host}:{os.environ.get(UI_PORT_ENV) or '5000'}"


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """Where the run opens in the MLflow UI (its model-training view)."""
    return f"{mlflow_ui_url(uri)}/#/experiments/{experiment_id}/runs/{run_id}?{MODEL_TRAINING_VIEW}"


def experiment_url(uri: str, experiment_id: str) -> str:
    """The experiment's runs (not its traces)."""
    return f"{mlflow_ui_url(uri)}/#/experiments/{experiment_id}?{MODEL_TRAINING_VIEW}"


def compare_url(uri: str, experiment_ids: list[str], run_ids: list[str]) -> str:
    """MLflow's compare page for the runs: the UI reads `?runs=[JSON]&experiments=[JSON]` (in this order)."""

    def as_json(values: list[str]) -> str:
        return quote(json.dumps([str(v) for v in values], separators=(",", ":")), safe="[],")

    return f"{mlflow_ui_url(uri)}/#/compare-runs?runs={as_json(run_ids)}&experiments={as_json(experiment_ids)}&{MODEL_TRAINING_VIEW}"


def git_revision(*folders: Path) -> str:
    """`git rev-parse HEAD` of the first folder inside a git checkout; "unknown" when none is."""
    for folder in folders:
        try:
            done = subprocess.run(
                ["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip()
    return "unknown"


def parse_tag(text: str) -> tuple[str, str]:
    """`KEY=VALUE` from `--tag` on the command line: an MLflow run tag."""
    from trainer.errors import ConfigError

    key, equals, value = text.partition("=")
    if not equals or not key.strip():
        raise ConfigError(f"--tag {text!r}: expected KEY=VALUE with a non-empty key, e.g. --tag team=vision")
    return key.strip(), value


def run_tags(flavour: str, project_root: Path, manifest_path: Path | None) -> dict[str, str]:
    """The tags every training run carries: flavour, manifest version, git revision (project, else this package)."""
    return {
        "flavour": flavour,
        "manifest_version": manifest_version(manifest_path) if manifest_path else "unknown",
        "git_revision": git_revision(project_root, PACKAGE_ROOT),
    }


def with_description(tags: dict[str, str]) -> dict[str, str]:
    """`tags` plus the run's description (unless one is given): who launched it, linking the Dagster run."""
    if DESCRIPTION_TAG in tags:
        return tags
    lines = []
    if tags.get("dagster_run_id"):
        run = tags["dagster_run_id"]
        link = f"[{run}]({tags['dagster_run_url']})" if tags.get("dagster_run_url") else f"`{run}`"
        lines.append(f"Trained by Dagster run {link}.")
    else:
        lines.append("Trained from the command line (`qwen-edit train`).")
    details = [f"flavour `{tags['flavour']}`"] if tags.get("flavour") else []
    if tags.get("overrides"):
        details.append(f"overrides `{tags['overrides']}`")
    if tags.get("manifest_version"):
        details.append(f"data `{tags['manifest_version']}`")
    if details:
        lines.append(", ".join(details).capitalize() + ".")
    return {**tags, DESCRIPTION_TAG: "\n\n".join(lines)}
