"""The one "final loss" of a run: the mean training loss over its last tenth of steps.

A single step's loss mostly reflects the σ and noise drawn for it, so the last step alone swings
from run to run; the mean over the last 10% (at least one step) is what the summary, MLflow,
Dagster, `qwen-edit compare` and `make demo` all report, under this one name.
"""

import math
from collections.abc import Sequence

FINAL_LOSS = "final_loss_mean_last_10pct"


def final_loss(history: Sequence[float]) -> float:
    """Mean of the last max(1, len // 10) losses; NaN for an empty history."""
    if not history:
        return math.nan
    tail = history[-max(1, len(history) // 10):]
    return float(sum(tail) / len(tail))
