"""The MLflow Model Registry: every validated LoRA a version of the project's registered model; the
alias `champion` on the best by the promotion rule (trainer.tracking.promotion), `challenger` on a
newer one that did not beat it.

A version is registered from a run folder (training_summary.json, lora/, validation/report.json):
the LoRA files, their adapter metadata, the validation report and the training summary become an
MLflow 3 logged model of the training run (the experiment's *Models* tab, with the validation means
as its metrics), and that logged model's artifacts are the version's source, so
`mlflow.artifacts.download_artifacts("models:/<name>@champion")` fetches the champion's LoRA. The
version is tagged with what it came from: flavour, base model and revision, data version (the
manifest's), Dagster run, git revision. The store is the tracking URI's: the embedded sqlite store
or an `mlflow server` (its registry is the same URI).
"""

import contextlib
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import quote

from trainer.errors import QwenEditError, suggest
from trainer.tracking.promotion import CHALLENGER, CHAMPION, Decision, PromotionRule, decide
from trainer.tracking.store import MODEL_TRAINING_VIEW, mlflow_ui_url, redact_url, run_url

PROMOTION_FILE = "promotion.json"  # in the run folder: the decision, as shown
REPORT_FILES = ("report.json", "report.html", "validation_grid.png")  # validation/ of the run folder
LOGGED_MODEL_TYPE = "lora"
_BAD_MODEL_NAME_CHARS = "/:.%\"'"  # not allowed in a logged model's name


class RegistryError(QwenEditError):
    """Nothing to register or show (no run, not validated, no registered model), or the store did not answer."""


@dataclass(frozen=True)
class VersionView:
    """A registered version as the CLI and Dagster show it."""

    version: str
    run_id: str | None
    run_name: str
    metrics: dict[str, float]  # validation_* of its training run
    tags: dict[str, str]
    url: str  # its MLflow page
    run_url: str | None
    created_ms: int

    def value(self, rule: PromotionRule) -> float | None:
        return self.metrics.get(rule.mlflow_key)


@dataclass(frozen=True)
class Promotion:
    model_name: str
    model_url: str
    rule: PromotionRule
    decision: Decision
    new: VersionView
    previous_champion: VersionView | None  # the champion the new version was compared with (None: there was none)
    registered: bool  # False: the run's version existed already (promoted again)

    @property
    def champion(self) -> VersionView | None:
        return self.new if self.decision.promoted else self.previous_champion

    def to_json(self) -> dict:
        return {
            "registered_model": self.model_name, "registered_model_url": self.model_url, "rule": asdict(self.rule),
            "decision": self.decision.alias, "reason": self.decision.reason, "newly_registered": self.registered,
            "new": asdict(self.new), "previous_champion": asdict(self.previous_champion) if self.previous_champion else None,
        }

    def message(self) -> str:
        verb = "registered" if self.registered else "already registered as"
        return (f"{verb} version {self.new.version} of {self.model_name!r}: {self.decision.alias} "
                f"({self.decision.reason})")


@dataclass(frozen=True)
class RunFolder:
    """What registration needs from a finished, validated run folder."""

    path: Path
    summary: dict
    report: dict

    @classmethod
    def read(cls, path: Path) -> "RunFolder":
        path = Path(path)
        summary, report = path / "training_summary.json", path / "validation" / "report.json"
        if not summary.is_file():
            raise RegistryError(f"{path}: no training_summary.json: not a finished training run (train it first)")
        data = _read_json(summary)
        if not data.get("mlflow_run_id"):
            raise RegistryError(
                f"{path}: trained without an MLflow run (report_to none, or MLflow was down at the start): nothing to "
                "register; train with report_to: mlflow"
            )
        if not report.is_file():
            raise RegistryError(f"{path}: not validated yet (no validation/report.json): materialise validation_report "
                                "or run `qwen-edit train`, then promote")
        return cls(path.resolve(), data, _read_json(report))

    @property
    def mlflow_run_id(self) -> str:
        return self.summary["mlflow_run_id"]

    @property
    def lora_dir(self) -> Path:
        return self.path / "lora"


def model_url(uri: str, name: str) -> str:
    return f"{mlflow_ui_url(uri)}/#/models/{quote(name, safe='')}?{MODEL_TRAINING_VIEW}"


def version_url(uri: str, name: str, version: str) -> str:
    """The model version's page in the MLflow UI (model-training view)."""
    return f"{mlflow_ui_url(uri)}/#/models/{quote(name, safe='')}/versions/{version}?{MODEL_TRAINING_VIEW}"


def promote_run(run_dir: Path, config, uri: str) -> Promotion:
    """Register the run's LoRA (once: a run already registered keeps its version), compare it with the
    champion on `config`'s rule and move the aliases; the decision is also written to run_dir/promotion.json."""
    from trainer.io import atomic_write_json

    folder = RunFolder.read(run_dir)
    rule = PromotionRule.from_config(config)
    name = config.model_registry_name
    with registry_client(uri) as client:
        mlflow_run = _training_run(client, folder, uri)
        version, registered = _version_of_run(client, name, folder, mlflow_run, config, uri)
        new = _view(client, uri, name, version)
        champion_version = _aliases(client, name).get(CHAMPION)
        previous = None
        if champion_version == new.version:
            decision = Decision(True, f"version {new.version} already holds {CHAMPION}")
        else:
            previous = _view(client, uri, name, client.get_model_version(name, champion_version)) if champion_version else None
            decision = decide(rule, new.value(rule), previous.value(rule) if previous else None)
            if previous is not None:
                decision = Decision(decision.promoted, f"{decision.reason} (champion: version {previous.version})")
            client.set_registered_model_alias(name, decision.alias, new.version)
            if decision.promoted and _aliases(client, name).get(CHALLENGER) == new.version:
                client.delete_registered_model_alias(name, CHALLENGER)  # one version never holds both
            for key, value in {"promotion": decision.alias, "promotion_reason": decision.reason[:5000],
                               "promotion_rule": rule.describe()}.items():  # the latest decision about it
                client.set_model_version_tag(name, new.version, key, value)
    promotion = Promotion(name, model_url(uri, name), rule, decision, new, previous, registered)
    atomic_write_json(folder.path / PROMOTION_FILE, promotion.to_json())
    return promotion


def standing(uri: str, name: str) -> tuple[VersionView | None, VersionView | None]:
    """The versions holding `champion` and `challenger` (None where the alias is unset)."""
    with registry_client(uri) as client:
        _registered_model(client, name, uri)
        aliases = _aliases(client, name)
        return tuple(
            _view(client, uri, name, client.get_model_version(name, aliases[alias])) if alias in aliases else None
            for alias in (CHAMPION, CHALLENGER)
        )


@contextlib.contextmanager
def registry_client(uri: str):
    """An MlflowClient on `uri` (tracking and registry) with short HTTP timeouts; a store that does not
    answer is one RegistryError naming it (credentials stripped)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from trainer.tracking.mlflow_run import HTTP_DEFAULTS, _describe, _mlflow_environment

    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise RegistryError(f"no MLflow store at {uri}: nothing has been trained and registered there yet")
    saved = {key: os.environ.get(key) for key in HTTP_DEFAULTS}
    _mlflow_environment()
    try:
        yield MlflowClient(tracking_uri=uri, registry_uri=uri)
    except MlflowException as exc:
        raise RegistryError(f"MLflow at {redact_url(uri)}: {_describe(exc)}") from None
    except OSError as exc:  # the network's (requests' errors are OSErrors)
        raise RegistryError(f"MLflow at {redact_url(uri)} is not answering ({_describe(exc)})") from None
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def _training_run(client, folder: RunFolder, uri: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(folder.mlflow_run_id)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(
                f"{folder.path}: its MLflow run {folder.mlflow_run_id} is not in the store at {redact_url(uri)} "
                "(trained with another MLFLOW_TRACKING_URI?)"
            ) from None
        raise


def _registered_model(client, name: str, uri: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    names = [model.name for model in client.search_registered_models(max_results=100)]
    known = suggest(name, names) if names else "there is none yet"
    raise RegistryError(
        f"no registered model {name!r} at {redact_url(uri)} ({known}): `qwen-edit promote` registers a trained, "
        "validated run (registered_model_name / tracker_project_name name it)"
    )


def _aliases(client, name: str) -> dict[str, str]:
    return {alias: str(version) for alias, version in (client.get_registered_model(name).aliases or {}).items()}


def _version_of_run(client, name: str, folder: RunFolder, mlflow_run, config, uri: str):
    """The run's version of `name`: the existing one, else a new one. Returns (version, newly registered)."""
    run_id = mlflow_run.info.run_id
    existing = [v for v in client.search_model_versions(f"run_id = '{run_id}'") if v.name == name]
    if existing:
        return min(existing, key=lambda v: int(v.version)), False
    _ensure_registered_model(client, name, config)
    tags = version_tags(mlflow_run, folder)
    metrics = _validation_metrics(client, run_id, folder)
    model = client.create_logged_model(
        mlflow_run.info.experiment_id, name=_logged_model_name(folder.path.name), source_run_id=run_id, tags=tags,
        params={key: tags[key] for key in ("lora_rank", "lora_alpha", "base_model", "flavour")}, model_type=LOGGED_MODEL_TYPE,
    )
    client.log_model_artifacts(model.model_id, str(folder.lora_dir), "lora")
    with tempfile.TemporaryDirectory(prefix="qwen-edit-registry-") as extras:
        _write_extras(Path(extras), folder)
        client.log_model_artifacts(model.model_id, extras)
    # the run's own points again, now naming the model: the store keeps one copy in the run's history
    client.log_batch(run_id, metrics=[_with_model(metric, model.model_id) for metric in metrics])
    client.finalize_logged_model(model.model_id, "READY")
    experiment_id = mlflow_run.info.experiment_id
    version = client.create_model_version(
        name, source=model.artifact_location, run_id=run_id, tags={**tags, "logged_model_id": model.model_id},
        run_link=run_url(uri, experiment_id, run_id), model_id=model.model_id,
        description=f"LoRA of run {folder.path.name!r} ({tags['flavour']} on {tags['base_model']}, data {tags['data_version']})",
    )
    return version, True


def _ensure_registered_model(client, name: str, config) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(
            name, tags={"experiment": config.tracker_project_name},
            description=f"LoRAs of the qwen-edit project {config.tracker_project_name!r}: one version per validated "
            f"training run; `{CHAMPION}` is the best by the promotion rule, `{CHALLENGER}` the latest that did not beat it.",
        )
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def version_tags(mlflow_run, folder: RunFolder) -> dict[str, str]:
    """What the LoRA came from, from its training run's tags and params (the values it trained with)."""
    from trainer.model.flavours import get_flavour

    tags, params = mlflow_run.data.tags, mlflow_run.data.params
    flavour = tags.get("flavour") or params.get("model_flavour", "edit-v1")
    base = params.get("pretrained_model_name_or_path") or get_flavour(flavour).default_model
    adapter = adapter_metadata(folder.lora_dir / "pytorch_lora_weights.safetensors")
    return {
        "flavour": flavour,
        "base_model": base,
        "base_model_revision": base_model_revision(base),
        "data_version": tags.get("manifest_version", "unknown"),
        "dagster_run_id": tags.get("dagster_run_id") or "none (command line)",
        "git_revision": tags.get("git_revision", "unknown"),
        "run_name": folder.path.name,
        "lora_rank": str(adapter.get("r", params.get("lora_rank", "unknown"))),
        "lora_alpha": str(adapter.get("lora_alpha", params.get("lora_alpha", "unknown"))),
    }


def adapter_metadata(lora_file: Path) -> dict:
    """The peft adapter config saved in the LoRA's safetensors metadata (without the `transformer.` prefix)."""
    from safetensors import safe_open

    with safe_open(str(lora_file), framework="pt") as handle:
        raw = (handle.metadata() or {}).get("lora_adapter_metadata")
    data = json.loads(raw) if raw else {}
    return {key.removeprefix("transformer."): value for key, value in data.items()}


def base_model_revision(base: str) -> str:
    """The Hub commit of the base model's snapshot in the local Hugging Face cache; "local folder" for a
    folder outside it (its weights are not hashed)."""
    path = Path(base)
    if path.is_absolute() or path.exists():
        parts = path.resolve().parts
        return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else "local folder"
    try:
        from trainer.model.loading import cached_snapshot

        snapshot = cached_snapshot(base)
    except Exception:  # an id the Hub client refuses: no revision to name
        return "unknown"
    return snapshot.name if snapshot is not None else "not in the local Hugging Face cache"


def _validation_metrics(client, run_id: str, folder: RunFolder) -> list:
    """The run's validation means at its last step, each as MLflow holds it; means the run lacks (MLflow was
    down when the report was logged) are logged now, from the run folder's report."""
    from mlflow.entities import Metric

    step = int(folder.summary.get("steps", 0))
    metrics = []
    for key, value in folder.report.get("summary", {}).items():
        name = f"validation_{key}"
        points = [m for m in client.get_metric_history(run_id, name) if m.step == step]
        if points:
            metrics.append(max(points, key=lambda m: m.timestamp))
        elif isinstance(value, int | float) and math.isfinite(value):
            metrics.append(Metric(name, float(value), int(time.time() * 1000), step))
    return metrics


def _with_model(metric, model_id: str):
    from mlflow.entities import Metric

    return Metric(metric.key, metric.value, metric.timestamp, metric.step, model_id=model_id)


def _write_extras(out: Path, folder: RunFolder) -> None:
    """adapter_metadata.json, training_summary.json and the validation report, beside lora/ in the model."""
    import shutil

    (out / "adapter_metadata.json").write_text(
        json.dumps(adapter_metadata(folder.lora_dir / "pytorch_lora_weights.safetensors"), indent=1, sort_keys=True)
    )
    shutil.copyfile(folder.path / "training_summary.json", out / "training_summary.json")
    (out / "validation").mkdir()
    for name in REPORT_FILES:
        if (folder.path / "validation" / name).is_file():
            shutil.copyfile(folder.path / "validation" / name, out / "validation" / name)


def _view(client, uri: str, name: str, version) -> VersionView:
    from mlflow.exceptions import MlflowException

    metrics, run_link, run_name = {}, None, version.tags.get("run_name", "")
    if version.run_id:
        try:
            run = client.get_run(version.run_id)
            metrics = {k: v for k, v in run.data.metrics.items() if k.startswith("validation_")}
            run_link = run_url(uri, run.info.experiment_id, run.info.run_id)
            run_name = run_name or run.info.run_name
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise  # a deleted run: the version is shown without its metrics
    return VersionView(str(version.version), version.run_id, run_name, metrics, dict(version.tags), version_url(uri, name, str(version.version)),
                       run_link, int(version.creation_timestamp or 0))


def _logged_model_name(run_name: str) -> str:
    return "lora-" + "".join("-" if c in _BAD_MODEL_NAME_CHARS else c for c in run_name)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise RegistryError(f"{path}: not readable as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise RegistryError(f"{path}: not a JSON object")
    return data
