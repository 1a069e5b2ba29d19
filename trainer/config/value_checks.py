"""Checks shared by the training config and the dataset entries: numbers that are numbers, bounds past
which a value would fail later (in a C integer, a float overflow, memory), and path strings the
file system can take. Each raises ValueError, which pydantic reports against the key."""

from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel

MAX_SIDE = 16384  # pixels: a training or validation side beyond this fails in memory, not in the config
MAX_AREA_MEGAPIXELS = MAX_SIDE * MAX_SIDE / 2**20  # resolution_type "area": the same limit in megapixels
MAX_COUNT = 2**31 - 1  # steps, epochs, intervals: MLflow, tqdm and the schedulers take them as integers
MAX_SEED = 2**32 - 1  # numpy's and accelerate's seeding limit
MAX_NAME_BYTES = 255  # one path component (NAME_MAX on Linux, macOS and Windows file systems)
MAX_PATH_BYTES = 4096  # a whole path (PATH_MAX)


def accepts_bool(model: type[BaseModel], field_name: str) -> bool:
    annotation = model.model_fields[field_name].annotation
    return annotation is bool or bool in get_args(annotation)


def no_bool_for_number(model: type[BaseModel], field_name: str, value: Any) -> Any:
    """pydantic's lax mode reads `true` as 1 for a number; in a config that is always a mistake."""
    if isinstance(value, bool) and not accepts_bool(model, field_name):
        raise ValueError(f"expected a number, got {str(value).lower()}")
    return value


def in_range(value: float | int | None, low: float, high: float) -> float | int | None:
    if value is not None and not low <= value <= high:
        raise ValueError(f"must be between {low} and {high}")
    return value


def path_text(value: str | None) -> str | None:
    """A path the operating system can open: no NUL byte, components and length within the limits,
    `~user` only for a user that exists."""
    if value is None:
        return value
    if "\x00" in value:
        raise ValueError("a path cannot contain a NUL byte")
    encoded = value.encode("utf-8", "surrogateescape")
    if len(encoded) > MAX_PATH_BYTES:
        raise ValueError(f"path is {len(encoded)} bytes long; the file system takes at most {MAX_PATH_BYTES}")
    for part in Path(value).parts:
        if len(part.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
            raise ValueError(
                f"the folder or file name {part[:40]!r}... is {len(part.encode('utf-8', 'surrogateescape'))} bytes; "
                f"the file system takes at most {MAX_NAME_BYTES} per name: shorten it or split it into folders"
            )
    if value.startswith("~"):
        try:
            Path(value).expanduser()
        except RuntimeError:
            raise ValueError(f"{value.split('/')[0]!r}: no such user's home folder") from None
    return value


def plain_name(value: str) -> str:
    """A dataset id names its cache folders (cache/vae/<id>): it must stay one folder name."""
    path_text(value)
    if "/" in value or "\\" in value or value in (".", ".."):
        raise ValueError(
            f"{value!r} names this dataset's cache folders (e.g. cache/vae/<id>); use a plain name "
            "without '/' or '\\', and not '.' or '..'"
        )
    return value
