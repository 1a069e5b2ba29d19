"""What an MLflow outage costs the trainer: MlflowRun's start, 100 log_step calls and its end.

    .venv/bin/python benchmarks/mlflow_outage.py

against a healthy sqlite store (new, then existing), an HTTP server that refuses connections,
and a sqlite store locked by another connection for the whole time. mlflow is imported first,
so the figures are the outbox's, not the import's.
"""

import os
import socket
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlflow  # noqa: F401,E402  (warm import)

from trainer.config.schema import TrainConfig  # noqa: E402
from trainer.tracking.mlflow_run import MlflowRun  # noqa: E402


def measure(root: Path, uri: str, label: str) -> None:
    os.environ["MLFLOW_TRACKING_URI"] = uri
    result = SimpleNamespace(final_loss=0.2, seconds=1.0, lora_path=root / "lora.safetensors")
    started = time.time()
    run = MlflowRun(TrainConfig(), root, {}, output_dir=root / label)
    created = time.time()
    for step in range(1, 101):
        run.log_step(step, 1.0 / step, 1e-4)
    logged = time.time()
    note = run.finish(result, root / "loss_curve.png")
    ended = time.time()
    print(f"| {label} | {created - started:.2f} | {1000 * (logged - created):.1f} | {ended - logged:.2f} | {'yes' if note else 'no'} |", flush=True)


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="mlflow-outage-"))
    (root / "store").mkdir()
    (root / "lora.safetensors").write_bytes(b"lora")
    (root / "loss_curve.png").write_bytes(b"png")
    store = f"sqlite:///{root / 'store' / 'mlflow.db'}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{s.getsockname()[1]}"
    print("| store | start s | 100 log_step ms | end s | kept in mlflow_unsent.json |\n|---|---|---|---|---|")
    measure(root, store, "sqlite, new")
    measure(root, store, "sqlite, existing")
    measure(root, refused, "http, connection refused")
    lock = sqlite3.connect(str(root / "store" / "mlflow.db"))
    lock.execute("BEGIN EXCLUSIVE")
    measure(root, store, "sqlite, locked throughout")
    lock.rollback()
    lock.close()


if __name__ == "__main__":
    main()
