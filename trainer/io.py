"""Atomic writes: a reader never sees a half-written file (temp file in the same folder + rename)."""

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from trainer.errors import OutputError
from trainer.faults import kill_point


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temp path beside `path`; on success it replaces `path` in one rename.

    A write the file system refuses is an OutputError naming the path, not a traceback.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:200]}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise _output_error(path, exc) from exc
    try:
        yield Path(tmp)
        kill_point("io.before_rename", path.name)  # tests: kill -9 with the temp file complete, not yet renamed
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, OutputError):
            raise _output_error(path, exc) from exc
        raise


def _output_error(path: Path, exc: OSError) -> OutputError:
    reason = exc.strerror or str(exc)
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else ""
    return OutputError(f"cannot write {path}: {reason}{where}; check the folder's permissions, free space and name length")


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True, default=str))


def atomic_write_with(path: str | Path, write: Callable[[Path], None]) -> Path:
    """For writers that take a path (safetensors, PIL): write to a temp file, then rename."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


@contextmanager
def atomic_folder(path: str | Path):
    """Yield an empty temp folder beside `path`; on success it takes `path`'s place (an existing
    folder is moved aside, then deleted), so `path` never holds a partial folder: a reader finds the
    old one, the new one whole, or, between the two renames, none."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name[:200]}.partial-", dir=path.parent))
    old = None
    try:
        yield staging
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name[:200]}.old-", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after the rename
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
