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
DEFAULT_UI = "http://127.0.0.1:5000"
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
    return mlflow.create_experiment(name, artifact_location=location)


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


def ui_base(uri: str, ui: str = DEFAULT_UI) -> str:
    """The MLflow UI serving `uri`: the tracking server itself, else `make mlflow-ui`'s address (no credentials)."""
    return redact_url(uri if uri.startswith("http") else ui).rstrip("/")


def run_url(uri: str, experiment_id: str, run_id: str, ui: str = DEFAULT_UI) -> str:
    """Where the run opens in the MLflow UI (`make mlflow-ui` serves the embedded store there)."""
    return f"{ui_base(uri, ui)}/#/experiments/{experiment_id}/runs/{run_id}"


def compare_url(uri: str, experiment_ids: list[str], run_ids: list[str], ui: str = DEFAULT_UI) -> str:
    """MLflow's compare page for the runs: the UI reads `?runs=[JSON]&experiments=[JSON]` (in this order)."""

    def as_json(values: list[str]) -> str:
        return quote(json.dumps([str(v) for v in values], separators=(",", ":")), safe="[],")

    return f"{ui_base(uri, ui)}/#/compare-runs?runs={as_json(run_ids)}&experiments={as_json(experiment_ids)}"


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
