"""One trainer per output_dir, and no leftovers of one that was killed.

- `output_dir_lock`: an exclusive `flock` on `output_dir/.trainer.lock`, held by rank 0 for the
  whole run. A second trainer on the same output_dir (a new run while an orphan of a killed
  `accelerate launch` still trains) is refused, naming the holder's pid. The kernel drops the
  lock when its holder dies, however it dies, so a `kill -9` never leaves a stale lock.
- `exit_with_parent`: the training process gets SIGTERM when its launcher dies (Linux
  PR_SET_PDEATHSIG), so killing `accelerate launch` leaves no orphan training on.
- `remove_stale_temp_files`: what saves cut short by a kill left behind (hidden checkpoint
  folders, `.saving-*` LoRA folders, `*.tmp` files of atomic writes), removed under the lock.
"""

import json
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from trainer.errors import QwenEditError

LOCK_NAME = ".trainer.lock"
_OWN_FILES = ("training_summary.json", "loss_curve.png", "mlflow_run.json", "mlflow_unsent.json")


class OutputDirBusy(QwenEditError):
    pass


def is_global_rank_zero() -> bool:
    """Before the accelerator exists: accelerate launch sets RANK for every process it starts (none when alone)."""
    return os.environ.get("RANK", "0") == "0"


@contextmanager
def output_dir_lock(output_dir: Path) -> Iterator[None]:
    import fcntl

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputDirBusy(
                f"output_dir {output_dir} is in use by another trainer ({_holder(path)}); wait for it to finish or stop "
                "it, or set another output_dir. A trainer left running after its `accelerate launch` was killed holds "
                "it until it ends"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode())
        yield
    finally:
        os.close(fd)  # releases the lock


def _holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started"]))
        return f"pid {holder['pid']} on {holder['host']}, started {started}"
    except (OSError, ValueError, KeyError, TypeError):
        return "pid unknown"


def remove_stale_temp_files(output_dir: Path) -> list[Path]:
    """Leftovers of interrupted saves in the folders only the trainer writes; returns what was removed."""
    from trainer.training.checkpoints import STALE_PREFIXES, remove_stale_temp

    output_dir = Path(output_dir)
    removed = remove_stale_temp(output_dir / "checkpoints")
    removed += [p for p in _hidden(output_dir) if p.name.startswith(STALE_PREFIXES) or _own_temp_file(p)]
    for folder in (output_dir / "lora", *sorted((output_dir / "validation").glob("step-*"))):
        if folder.is_dir():
            removed += [p for p in folder.rglob(".*") if p.name.startswith(".saving-") or p.name.endswith(".tmp")]
    for path in removed:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink(missing_ok=True)
    return removed


def _hidden(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(".")] if folder.is_dir() else []


def _own_temp_file(path: Path) -> bool:
    """`.training_summary.json.<random>.tmp` (trainer.io's temp names) of the files the trainer writes."""
    return path.name.endswith(".tmp") and any(path.name.startswith(f".{name}.") for name in _OWN_FILES)


def exit_with_parent() -> None:
    """Under `accelerate launch` on Linux: SIGTERM when the launcher dies.

    SIGTERM then ends the run through `finally` (the MLflow run is marked KILLED). Started
    otherwise (a shell, nohup) the process keeps the usual behaviour.
    """
    if not sys.platform.startswith("linux") or "ACCELERATE_DYNAMO_BACKEND" not in os.environ:
        return
    import ctypes

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    signal.signal(signal.SIGTERM, _terminated)
    if os.getppid() == 1:  # the launcher died before the line above
        _terminated(signal.SIGTERM, None)


def _terminated(signum, frame) -> None:
    raise SystemExit(128 + signum)
