"""Each training run writes to its own folder under `output_dir`, so runs never overwrite each other.

    output_dir/
      pairing_manifest.json         the data check's manifest (the run folders keep their own copy)
      edit-v2/                      a command-line run of the config as it is
      edit-v2_learning_rate-5e-05/  ... with `--set learning_rate=5e-5`
      edit-v2_dagster-1a2b3c4d/     a Dagster run (its re-executions continue in it)
      latest -> edit-v2_dagster-1a2b3c4d   the run that finished training last

A run's name is `--run-name` / `tracker_run_name` when given, else it is made of the flavour, the
overrides and the Dagster run. Its folder is `output_dir/<name>`, unless that one is taken: a run
that finished there, or one that is still training, keeps its folder and the new run takes
`<name>-2` (then `-3`, ...). A folder is continued only by a run that resumes
(`resume_from_checkpoint`) the interrupted run in it, which is how `resume_from_checkpoint: latest`
finds that run's checkpoints: the same command (same name) lands in the same folder.
"""

import os
import re
import tempfile
from pathlib import Path

from trainer.errors import OutputError

LATEST = "latest"
SUMMARY_NAME = "training_summary.json"  # as trainer.training.recipe writes it (not imported: that pulls in torch)
_MAX_NAME = 96
_NOT_IN_NAME = {"output_dir", "tracker_run_name", "tracker_project_name", "report_to"}  # where it goes, not what it is


def default_run_name(flavour: str, overrides: dict | None = None, dagster_run_id: str | None = None) -> str:
    """`edit-v2`, `edit-v2_learning_rate-5e-05_max_train_steps-200`, `edit-v2_dagster-1a2b3c4d`."""
    parts = [flavour]
    for key, value in (overrides or {}).items():
        if key not in _NOT_IN_NAME and key != "model_flavour":
            parts.append(f"{key}-{_short(value)}")
    if dagster_run_id:
        parts.append(f"dagster-{dagster_run_id[:8]}")
    return "_".join(parts)


def _short(value) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return text if len(text) <= 24 else text[:10] + "..." + text[-10:]


def folder_name(run_name: str) -> str:
    """The run name as one path component: unsafe characters become `-`, long names keep both ends."""
    name = re.sub(r"[^A-Za-z0-9._+=-]+", "-", run_name).strip(".-") or "run"
    if name == LATEST:
        name = f"{LATEST}-run"
    return name if len(name) <= _MAX_NAME else name[: _MAX_NAME // 2 - 2] + "..." + name[-(_MAX_NAME // 2 - 2):]


def choose_run_dir(output_dir: Path, run_name: str, resuming: bool) -> Path:
    """The folder this run trains in (see the module's docstring); not created here."""
    base = folder_name(run_name)
    for number in range(1, 10_000):
        folder = Path(output_dir) / (base if number == 1 else f"{base}-{number}")
        if not holds_a_run(folder):
            return folder
        if resuming and not is_finished(folder) and not in_use(folder):
            return folder  # the interrupted run in it continues
    raise OutputError(f"{output_dir}: no free run folder for {run_name!r}; remove old run folders or pass --run-name")


def holds_a_run(folder: Path) -> bool:
    """A run trained (or is training) here: checkpoints, a LoRA or a summary."""
    return any((folder / name).exists() for name in ("checkpoints", "lora", SUMMARY_NAME)) or in_use(folder)


def is_finished(folder: Path) -> bool:
    return (folder / SUMMARY_NAME).is_file()


def in_use(folder: Path) -> bool:
    """A trainer holds the folder's lock (trainer.training.run_lock) right now."""
    import fcntl

    from trainer.training.run_lock import LOCK_NAME

    try:
        fd = os.open(Path(folder) / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also releases the lock taken just now
    return False


def point_latest(output_dir: Path, run_dir: Path) -> Path:
    """`output_dir/latest` -> the run folder (relative), replaced in one rename: readers never see it missing."""
    output_dir = Path(output_dir)
    link = output_dir / LATEST
    if link.exists() and not link.is_symlink():
        raise OutputError(f"{link} exists and is not the link to the latest run; move it away")
    fd, tmp = tempfile.mkstemp(prefix=f".{LATEST}.", suffix=".tmp", dir=output_dir)
    os.close(fd)
    os.unlink(tmp)
    os.symlink(os.path.relpath(Path(run_dir), output_dir), tmp)
    os.replace(tmp, link)
    return link


def latest_run_dir(output_dir: Path) -> Path | None:
    """The folder `latest` points at, or None before any run finished training."""
    link = Path(output_dir) / LATEST
    return link.resolve() if link.is_symlink() and link.resolve().is_dir() else None
