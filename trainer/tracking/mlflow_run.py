"""Rank 0's MLflow run for training: nothing MLflow does can stop training or lose the LoRA.

Training never calls MLflow itself: it appends calls ("ops": plain dicts) to an outbox that a
background thread sends in order. While the store is unreachable, locked or read-only the
thread keeps them and retries with back-off, so they are written when the store is back; HTTP
requests get short timeouts and few retries (MLFLOW_HTTP_REQUEST_TIMEOUT / _MAX_RETRIES, unless
set). At the end the outbox is given time to drain (FLUSH_TIMEOUT_ENV seconds once the store
stops answering); what could not be sent is named in one message and kept in
`output_dir/mlflow_unsent.json`, which `qwen-edit mlflow-sync OUTPUT_DIR` sends later.

A resumed run continues the MLflow run its checkpoint names (one loss history, not two). The run
id is also kept in `output_dir/mlflow_run.json` while the run is open: a run whose process was
killed is marked KILLED when the next run on that output_dir starts (unless it is resumed).
"""

import collections
import functools
import json
import logging
import os
import sys
import threading
import time
import warnings
from pathlib import Path

from trainer.config.schema import TrainConfig
from trainer.tracking.loss_summary import FINAL_LOSS
from trainer.tracking.store import (
    EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, mark_training_experiment, redact_url, run_tags, run_url, tracking_uri,
    with_description,
)

RUN_FILE = "mlflow_run.json"
UNSENT_FILE = "mlflow_unsent.json"
FLUSH_TIMEOUT_ENV = "QWEN_EDIT_MLFLOW_FLUSH_TIMEOUT"
FLUSH_TIMEOUT_S = 30.0  # at the end, how long to keep retrying a store that does not answer
UPLOAD_TIMEOUT_S = 1800.0  # ... and how long to wait while it does (a large LoRA upload)
START_TIMEOUT_S = 60.0  # at the start, how long to wait for the run to exist while the store answers
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
_REJECTED = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"}  # retrying won't help
_MAX_BACKOFF_S = 30.0
# errors of the call itself, not of the store (a local file gone, a value MLflow's client refuses): retrying won't help
_LOCAL_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, ValueError, TypeError, KeyError)


class MlflowRun:
    """Rank 0's MLflow run: params at the start, a loss history per step, artifacts at the end."""

    def __init__(
        self, config: TrainConfig, project_root: Path, tags: dict[str, str], manifest_path: Path | None = None,
        *, output_dir: Path | None = None, resume_run_id: str | None = None, resuming: bool = False,
    ):
        """`resume_run_id`: the run the resumed checkpoint names; `resuming` without one: the run of the
        process that wrote the checkpoints (mlflow_run.json), killed before its run id reached one."""
        _mlflow_environment()
        self.uri = tracking_uri(project_root)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        location = None
        if self.uri.startswith("sqlite:"):
            (Path(project_root) / "mlruns").mkdir(parents=True, exist_ok=True)
            location = (Path(project_root) / "mlruns" / "artifacts").resolve().as_uri()
        params = {k: v for k, v in config.model_dump().items() if v is not None}
        params["model_kwargs"] = json.dumps(params.get("model_kwargs", {}))
        self.writer = _Writer(self.uri, self.output_dir / RUN_FILE if self.output_dir else None)
        self.outbox = _Outbox(self.writer)
        previous = self._killed_run()
        if previous and resuming and not resume_run_id:
            resume_run_id = previous
        elif previous and previous != resume_run_id:
            self.outbox.put({"op": "mark", "run_id": previous, "status": "KILLED"})
        self.outbox.put({
            "op": "start",
            "experiment": config.tracker_project_name,
            "artifact_location": location,
            "run_name": config.tracker_run_name,
            # command-line tags win; the description links the Dagster run that launched this one
            "tags": with_description({**run_tags(config.model_flavour, project_root, manifest_path), **tags}),
            "params": {k: str(v)[:500] for k, v in params.items()},
            "resume_run_id": resume_run_id,
        })
        if manifest_path is not None:
            self.outbox.put({"op": "input", "path": str(manifest_path)})  # the run's dataset, in MLflow's Datasets
        self.outbox.start()
        # so the first checkpoint already names the run; a store that fails is not waited for
        self.outbox.wait_until_sent(START_TIMEOUT_S)

    @property
    def run_id(self) -> str | None:
        """None until the store has created the run (it may be down at the start)."""
        return self.writer.run_id

    @property
    def url(self) -> str | None:
        if not (self.writer.run_id and self.writer.experiment_id):
            return None
        return run_url(self.uri, self.writer.experiment_id, self.writer.run_id)

    def log_step(self, step: int, loss: float, lr: float) -> None:
        # `lr`, not `learning_rate`: that name is the config's param (MLflow shows params and metrics side by side)
        self.log_metrics({"train_loss": loss, "lr": lr}, step)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        self.outbox.put({"op": "metrics", "step": step, "time_ms": int(time.time() * 1000), "metrics": dict(metrics)})

    def log_artifact(self, path: Path, artifact_path: str) -> None:
        self.outbox.put({"op": "artifact", "path": str(path), "artifact_path": artifact_path})

    def log_validation(self, step: int, report) -> None:
        """Metrics and images at `step` (MLflow's charts and image slider over the steps), the report as artifacts."""
        from trainer.tracking.validation_images import pair_strips

        strips = pair_strips(report)  # written before the folder is queued for upload
        self.log_metrics({f"validation_{k}": v for k, v in report.summary.items()}, step)
        self.log_artifact(report.html_path.parent, f"validation/step-{step}")
        for key, strip in strips.items():
            self.outbox.put({"op": "image", "path": str(strip), "key": key, "step": step})

    def finish(self, result, curve: Path) -> str | None:
        """`result` is the recipe's TrainResult. Returns a message when something could not be logged."""
        self.log_metrics({FINAL_LOSS: result.final_loss, "train_seconds": result.seconds})
        self.log_artifact(result.lora_path, "lora")
        self.log_artifact(curve, "plots")
        return self.end("FINISHED")

    def end(self, status: str = "FINISHED", timeout: float | None = None) -> str | None:
        """Close the run with `status` (FINISHED, FAILED, KILLED); wait for the outbox within the timeouts."""
        self.outbox.put({"op": "end", "status": status})
        unsent = self.outbox.close(_flush_timeout() if timeout is None else timeout)
        if not unsent:
            return None
        return self._report_unsent(unsent)

    def _killed_run(self) -> str | None:
        """The run of a process that was killed on this output_dir (its run file still says RUNNING)."""
        record = _read_json(self.output_dir / RUN_FILE) if self.output_dir else None
        if not record or record.get("status") != "RUNNING" or record.get("tracking_uri") != redact_url(self.uri):
            return None
        return record.get("run_id")

    def _report_unsent(self, unsent: list[dict]) -> str:
        counts = collections.Counter(op["op"] for op in unsent)
        steps = sorted({op["step"] for op in unsent if op["op"] == "metrics"})
        parts = []
        if counts["start"]:
            parts.append("the run itself (params, tags)")
        if steps:
            parts.append(f"metrics of {len(steps)} step(s) ({steps[0]}..{steps[-1]})")
        if counts["artifact"]:
            parts.append(f"{counts['artifact']} artifact(s): " + ", ".join(op["artifact_path"] for op in unsent if op["op"] == "artifact"))
        if counts["end"]:
            parts.append("the run's final status")
        where = ""
        if self.output_dir is not None:
            from trainer.io import atomic_write_json

            path = self.output_dir / UNSENT_FILE
            earlier = (_read_json(path) or {}).get("runs", [])  # an earlier run's, not yet synced
            atomic_write_json(path, {"runs": [*earlier, {"run_id": self.writer.run_id, "ops": unsent}]})
            where = f"; they are kept in {path}: send them with `qwen-edit mlflow-sync {self.output_dir}` once the store is back"
        error = self.outbox.last_error or "no answer"
        return (
            f"MLflow at {redact_url(self.uri)} did not take everything ({error}); not logged: {'; '.join(parts)}"
            f"{where}. The LoRA and training_summary.json are saved as usual"
        )


def outage_tolerant(what: str):
    """For the MLflow calls after training (the validation report): an outage prints what was not
    logged instead of failing that stage; the files it would have logged are on disk either way."""

    def wrap(function):
        @functools.wraps(function)
        def call(*args, **kwargs):
            saved = {key: os.environ.get(key) for key in HTTP_DEFAULTS}
            for key, value in HTTP_DEFAULTS.items():
                os.environ.setdefault(key, value)
            from mlflow.exceptions import MlflowException

            try:
                return function(*args, **kwargs)
            except (MlflowException, OSError) as exc:  # the store's or the network's; a bug still raises
                print(f"warning: MLflow did not take {what} ({_describe(exc)}); it is not in the MLflow run", file=sys.stderr, flush=True)
                return None
            finally:
                for key, value in saved.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value

        return call

    return wrap


def sync_unsent(output_dir: Path, uri: str) -> list[tuple[str | None, int]]:
    """`qwen-edit mlflow-sync`: send what training runs could not; returns (run id, calls sent) per run."""
    from trainer.errors import QwenEditError
    from trainer.io import atomic_write_json

    _mlflow_environment()
    path = Path(output_dir) / UNSENT_FILE
    saved = _read_json(path)
    if saved is None or not isinstance(saved.get("runs"), list):
        raise QwenEditError(f"{path}: nothing to send (no such file, or not one qwen-edit wrote)")
    runs, done = list(saved["runs"]), []
    while runs:
        writer = _Writer(uri, None)
        writer.run_id = runs[0].get("run_id")
        ops = list(runs[0].get("ops", []))
        try:
            while ops:
                batch = _take_batch(ops)
                writer.apply(batch)
                del ops[: len(batch)]
        except Exception as exc:  # still not answering: keep what is left for next time
            atomic_write_json(path, {"runs": [{"run_id": writer.run_id, "ops": ops}, *runs[1:]]})
            raise QwenEditError(f"MLflow at {redact_url(uri)}: {_describe(exc)}; {len(ops)} call(s) of that run left in {path}") from None
        done.append((writer.run_id, len(runs[0].get("ops", []))))
        runs.pop(0)
    path.unlink()
    return done


class _Writer:
    """Applies ops to the store, in order; raises when the store does not take one."""

    def __init__(self, uri: str, run_file: Path | None):
        self.uri = uri
        self.run_file = run_file
        self.client = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.monitor = None

    def apply(self, batch: list[dict]) -> None:
        if self.client is None:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(self.uri)
        kind = batch[0]["op"]
        if kind == "metrics":
            from mlflow.entities import Metric

            metrics = [Metric(k, float(v), op["time_ms"], op["step"]) for op in batch for k, v in op["metrics"].items()]
            self.client.log_batch(self.run_id, metrics=metrics)
        elif kind == "start":
            self._start(batch[0])
        elif kind == "artifact":
            path = Path(batch[0]["path"])
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path=batch[0]["artifact_path"])
            else:
                self.client.log_artifact(self.run_id, str(path), artifact_path=batch[0]["artifact_path"])
        elif kind == "image":
            from PIL import Image

            with Image.open(batch[0]["path"]) as image:
                self.client.log_image(self.run_id, image.convert("RGB"), key=batch[0]["key"], step=batch[0]["step"], synchronous=True)
        elif kind == "input":
            self._log_manifest_input(Path(batch[0]["path"]))
        elif kind == "end":
            if self.monitor is not None:
                self.monitor.finish()
                self.monitor = None
            self.client.set_terminated(self.run_id, status=batch[0]["status"])
            self._record(batch[0]["status"])
        elif kind == "mark":
            from mlflow.exceptions import MlflowException

            try:
                run = self.client.get_run(batch[0]["run_id"])
            except MlflowException as exc:
                if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                    return  # deleted, or in another store: nothing to mark
                raise
            if run.info.status == "RUNNING":
                self.client.set_terminated(batch[0]["run_id"], status=batch[0]["status"])
                print(f"MLflow run {batch[0]['run_id']} of a killed process marked {batch[0]['status']}", flush=True)

    def _start(self, op: dict) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(op["experiment"])
        if experiment is None:
            location = op["artifact_location"]
            if location is None and self.uri.startswith("sqlite:///"):  # MLflow's default is ./mlruns of the working dir
                location = (Path(self.uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
            try:
                self.experiment_id = self.client.create_experiment(
                    op["experiment"], artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
                )
            except MlflowException:  # another process created it meanwhile
                self.experiment_id = self.client.get_experiment_by_name(op["experiment"]).experiment_id
        else:
            self.experiment_id = experiment.experiment_id
            mark_training_experiment(self.client, experiment)
        params, resumed = dict(op["params"]), False
        if op.get("resume_run_id") or self.run_id:
            try:
                run = self.client.get_run(op.get("resume_run_id") or self.run_id)
                self.client.update_run(run.info.run_id, status="RUNNING")
                self.run_id, resumed = run.info.run_id, True
                self.experiment_id = run.info.experiment_id
                changed = sorted(k for k, v in params.items() if k in run.data.params and run.data.params[k] != v)
                params = {k: v for k, v in params.items() if k not in run.data.params}  # MLflow params are write-once
                if changed:
                    op["tags"]["qwen-edit/params_changed_on_resume"] = ",".join(changed)[:500]
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise  # the store is down: retried
                # the checkpoint's run is not in this store (another MLFLOW_TRACKING_URI): a new run
        if not resumed:
            tags = {k: str(v) for k, v in op["tags"].items()}
            if op.get("run_name"):
                tags["mlflow.runName"] = op["run_name"]
            run = self.client.create_run(self.experiment_id, run_name=op.get("run_name"), tags=tags)
            self.run_id = run.info.run_id
            self._record("RUNNING")
        else:
            self._record("RUNNING")
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in op["tags"].items()])
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])
        self._start_system_metrics(resumed)

    def _log_manifest_input(self, path: Path) -> None:
        """The pairing manifest as the run's training dataset (name, digest = manifest_version, schema, rows)."""
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag

        from trainer.data.pairing import read_manifest
        from trainer.data.versions import manifest_version

        with warnings.catch_warnings():  # MLflow's hints on guessing the source's kind and on int columns: not ours
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(read_manifest(path), source=str(path), name="pairing_manifest", digest=manifest_version(path))
            entity = dataset._to_mlflow_entity()
        context = InputTag(key="mlflow.data.context", value="training")
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset=entity, tags=[context])])

    def _start_system_metrics(self, resumed: bool) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(self.run_id, tracking_uri=self.uri, resume_logging=resumed)
            self.monitor.start()
        except Exception:  # psutil missing and the like: system metrics are a nicety
            self.monitor = None

    def _record(self, status: str) -> None:
        if self.run_file is not None:
            from trainer.io import atomic_write_json

            atomic_write_json(self.run_file, {"run_id": self.run_id, "status": status, "tracking_uri": redact_url(self.uri)})


class _Outbox(threading.Thread):
    """The background sender: ops in order, retried with back-off while the store does not answer."""

    def __init__(self, writer: _Writer):
        super().__init__(name="mlflow-outbox", daemon=True)  # a hung call never keeps the process alive
        self.writer = writer
        self.ops: list[dict] = []
        self.cond = threading.Condition()
        self.closing = False
        self.abandoned = False  # close() gave up: send nothing more (what is left goes to mlflow_unsent.json)
        self.down_since: float | None = None
        self.failed_after_close = False
        self.last_error: str | None = None
        self.rejected: list[str] = []

    def put(self, op: dict) -> None:
        with self.cond:
            self.ops.append(op)
            self.cond.notify()

    def run(self) -> None:
        failures = 0
        while True:
            with self.cond:
                while not self.ops and not self.closing:
                    self.cond.wait()
                if not self.ops or self.abandoned:
                    return
                batch = _take_batch(self.ops)
            try:
                self.writer.apply(batch)
            except Exception as exc:
                from mlflow.exceptions import MlflowException

                if (isinstance(exc, MlflowException) and exc.error_code in _REJECTED) or isinstance(exc, _LOCAL_ERRORS):
                    self.rejected.append(f"{batch[0]['op']}: {_describe(exc)}")
                    print(f"MLflow refused a {batch[0]['op']} call ({_describe(exc)}); it is dropped", flush=True)
                    self._done(batch)
                    continue
                failures += 1
                self.last_error = _describe(exc)
                with self.cond:
                    if self.closing:
                        self.failed_after_close = True
                    if self.down_since is None:
                        self.down_since = time.time()
                        print(
                            f"MLflow at {redact_url(self.writer.uri)} is not answering ({self.last_error}); "
                            "training goes on and tracking catches up when it is back",
                            flush=True,
                        )
                    self.cond.wait(timeout=min(_MAX_BACKOFF_S, 2.0 ** min(failures, 5)))
                continue
            if self.down_since is not None:
                print(f"MLflow answers again after {time.time() - self.down_since:.0f} s; sending what was kept", flush=True)
            failures = 0
            self.down_since = None
            self._done(batch)

    def _done(self, batch: list[dict]) -> None:
        with self.cond:
            del self.ops[: len(batch)]
            self.cond.notify_all()

    def wait_until_sent(self, timeout: float) -> None:
        """Until every op so far is sent, an attempt has failed, or `timeout`."""
        deadline = time.time() + timeout
        with self.cond:
            while self.ops and self.down_since is None and time.time() < deadline:
                self.cond.wait(timeout=0.1)

    def close(self, flush_timeout: float) -> list[dict]:
        """Wait for the ops to be sent: while the store answers (up to UPLOAD_TIMEOUT_S), else
        `flush_timeout` seconds or until one more attempt failed. Returns what is left unsent."""
        started = time.time()
        with self.cond:
            self.closing = True
            self.cond.notify_all()  # also cuts a back-off wait short: one more attempt now
        while self.is_alive():
            self.join(0.1)
            elapsed = time.time() - started
            with self.cond:
                store_down = self.down_since is not None
                if store_down and (self.failed_after_close or elapsed > flush_timeout):
                    break
                if elapsed > UPLOAD_TIMEOUT_S:
                    break
        with self.cond:
            self.abandoned = True
            return list(self.ops)


def _take_batch(ops: list[dict]) -> list[dict]:
    """The next op, or the run of consecutive metric ops at the head (one request, up to 1000 values)."""
    batch = [ops[0]]
    if ops[0]["op"] == "metrics":
        count = len(ops[0]["metrics"])
        for op in ops[1:]:
            if op["op"] != "metrics" or count + len(op["metrics"]) > 1000:
                break
            batch.append(op)
            count += len(op["metrics"])
    return batch


def _describe(exc: Exception) -> str:
    """One short line, credentials stripped (MLflow's messages quote the URL they called)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    for cause in ("Connection refused", "Name or service not known", "timed out", "database is locked", "readonly database"):
        if cause in text and len(text) > 160:
            text = f"{text[:100]}... {cause}"
            break
    text = " ".join(redact_url(w) if "://" in w else w for w in text[:200].split())
    code = getattr(exc, "error_code", None)
    return (f"{code}: " if code else "") + text


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _flush_timeout() -> float:
    try:
        return float(os.environ.get(FLUSH_TIMEOUT_ENV, FLUSH_TIMEOUT_S))
    except ValueError:
        return FLUSH_TIMEOUT_S


def _mlflow_environment() -> None:
    """Short HTTP timeouts unless set; no MLflow URL printing (it would print the tracking URI's
    credentials: ours are redacted); one line per outage instead of a traceback per failed sqlite call."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)
