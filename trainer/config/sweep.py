"""A sweep: a small grid of config overrides declared in the config itself, one training run per point.

    "sweep": {"learning_rate": [1e-4, 3e-4], "lora_rank": [4, 8]}

is four points, named by their overrides: `learning_rate=1e-4;lora_rank=4`, `learning_rate=1e-4;lora_rank=8`,
`learning_rate=3e-4;lora_rank=4`, `learning_rate=3e-4;lora_rank=8` (the first key varies slowest). The
Dagster code location partitions the training and validation assets over these names. `;` separates
the keys, not `,`: Dagster's UI reads commas in a partition key as a list of partitions.

Every point goes through the same override path as `--set` (`trainer.config.parsing`), so a value that
`--set` would refuse is refused here, naming the point. The points share the caches, so a sweep may
not vary a key the caches depend on (SWEEP_FIXED_KEYS says which and why).
"""

import copy
import itertools
import math
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from trainer.errors import ConfigError, suggest

MAX_POINTS = 32  # a "small grid": every point is a full training run
MAX_VALUE_CHARS = 64
SEPARATOR = ";"
# characters a value may not hold in a partition key: Dagster's UI splits on `,` and reads `[a...b]` as a
# range; `|` joins multi-partition keys; `;` and `=` are ours; quotes would end MLflow's tag filter
_NOT_IN_VALUE = (",", "[", "]", "|", ";", "=", "...", "'", '"', "\n", "\r", "\t", "\\")

_CACHES = "the caches depend on it and every point of a sweep shares them; make a second project for it"
_FIXED_WHY = {
    **dict.fromkeys(
        ("model_type", "model_family", "model_flavour", "pretrained_model_name_or_path", "model_kwargs",
         "data_backend_config", "eval_dataset_id", "caption_dropout_probability",
         "resolution", "resolution_type", "minimum_image_size", "crop_aspect"),
        _CACHES,
    ),
    "output_dir": "every point writes its own run folder under the project's output_dir",
    "allow_paths_outside_root": "it decides where the project's files may be, for every point alike",
    "resume_from_checkpoint": "each point trains from the start in its own run folder",
    "tracker_project_name": "every point is a run of the project's one MLflow experiment",
    "tracker_run_name": "each point's MLflow run is named after its point",
    "report_to": "each point is an MLflow run: the comparison ranks them there",
    "sweep": "a sweep cannot sweep itself",
    "dagster_pool": "the project's GPU steps share one pool",
    **dict.fromkeys(
        ("registered_model_name", "promotion_metric", "promotion_direction", "promotion_margin"),
        "the points are ranked, and the project's LoRAs promoted, on one rule",
    ),
}  # fmt: skip
SWEEP_FIXED_KEYS = tuple(_FIXED_WHY)

@dataclass(frozen=True)
class SweepPoint:
    key: str  # `learning_rate=1e-4;lora_rank=4`: the Dagster partition key and the MLflow tag
    overrides: dict[str, Any]  # {"learning_rate": 0.0001, "lora_rank": 4}: what `--set` gets


def value_text(value: Any) -> str:
    """A grid value as people write it: 1e-4, 3e-4, 0.5, 4, true, cosine."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return _float_text(value)
    return str(value)


def _float_text(value: float) -> str:
    text = repr(value)  # the shortest text that reads back as this float: nothing is rounded away
    if value != 0 and (abs(value) < 1e-2 or "e" in text):
        sign, digits, exponent = Decimal(text).normalize().as_tuple()
        mantissa = "".join(map(str, digits))
        mantissa = mantissa[0] + (f".{mantissa[1:]}" if len(mantissa) > 1 else "")
        return f"{'-' if sign else ''}{mantissa}e{exponent + len(digits) - 1}"
    return text.removesuffix(".0")


def check_grid(grid: Any, known_keys: list[str]) -> dict[str, list[Any]]:
    """The grid's shape: {config key: [values]}, each key sweepable, each list of distinct plain values, at most
    MAX_POINTS points. Raises ValueError with one message naming the key or value and the fix."""
    if not isinstance(grid, dict) or not grid:
        raise ValueError(
            'expected an object of config keys, each with a list of values, e.g. {"learning_rate": [1e-4, 3e-4]}'
        )
    for key, values in grid.items():
        if key not in known_keys:
            raise ValueError(f"{key!r} is not a config key; {suggest(key, known_keys, list_all=False)}")
        if key in _FIXED_WHY:
            raise ValueError(f"{key!r} cannot be swept: {_FIXED_WHY[key]}")
        if not isinstance(values, list) or not values:
            raise ValueError(f"{key}: expected a non-empty list of values, e.g. [{_example(key)}], got {values!r}")
        seen: dict[str, Any] = {}
        for value in values:
            _check_value(key, value)
            text = value_text(value)
            if text in seen:
                raise ValueError(f"{key}: {seen[text]!r} and {value!r} are the same point ({text}); list each value once")
            seen[text] = value
    points = math.prod(len(values) for values in grid.values())
    if points > MAX_POINTS:
        sizes = " x ".join(str(len(v)) for v in grid.values()) + " = " if len(grid) > 1 else ""
        raise ValueError(f"{sizes}{points} points, each a full training run; a sweep has at most {MAX_POINTS}: "
                         "drop values, or split it into several projects")
    return grid


def _example(key: str) -> str:
    return "1e-4, 3e-4" if key == "learning_rate" else "4, 8" if "rank" in key else "..."


def _check_value(key: str, value: Any) -> None:
    if isinstance(value, dict | list):
        raise ValueError(f"{key}: each value is a number, a string, true/false or null, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{key}: {value!r} is not a finite number")
    if isinstance(value, str):
        if not value.strip() or len(value) > MAX_VALUE_CHARS:
            raise ValueError(f"{key}: {value[:80]!r}: a value names its point, so it is 1 to {MAX_VALUE_CHARS} characters")
        bad = [c for c in _NOT_IN_VALUE if c in value]
        if bad:
            raise ValueError(f"{key}: {value!r} contains {bad[0]!r}, which a point's name cannot hold; use another value")


def sweep_points(grid: dict[str, list[Any]]) -> list[SweepPoint]:
    """Every combination of the grid, the first key varying slowest."""
    keys = list(grid)
    points = []
    for values in itertools.product(*(grid[key] for key in keys)):
        overrides = dict(zip(keys, values))
        points.append(SweepPoint(SEPARATOR.join(f"{k}={value_text(v)}" for k, v in overrides.items()), overrides))
    return points


def check_points(raw: dict[str, Any], grid: dict[str, list[Any]], source: str) -> list[SweepPoint]:
    """Each point's config (the file with the point's overrides set, as `--set` sets them) validated; the first
    invalid point is one ConfigError naming it, with the config's own message."""
    from trainer.config.parsing import _set_dotted, parse_train_config

    points = sweep_points(grid)
    for point in points:
        candidate = copy.deepcopy(raw)
        for key, value in point.overrides.items():
            _set_dotted(candidate, key, value)
        try:
            parse_train_config(candidate, source=f"{source} (sweep point {point.key})")
        except ConfigError as exc:
            raise ConfigError(f"{exc}\n  (fix the value in the config's `sweep`, or remove it from the grid)") from None
    return points
