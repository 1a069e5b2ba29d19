"""The promotion rule: does a new LoRA beat the champion on the configured validation metric?

Plain numbers in, a decision out (no MLflow here): `trainer.tracking.registry` reads the numbers from
the registry and moves the aliases the decision names.
"""

import math
from dataclasses import dataclass

CHAMPION, CHALLENGER = "champion", "challenger"


@dataclass(frozen=True)
class PromotionRule:
    metric: str  # a key of the validation report's means, e.g. lora_latent_mse
    higher_is_better: bool
    margin: float = 0.0

    @classmethod
    def from_config(cls, config) -> "PromotionRule":
        direction = config.promotion_direction
        higher = metric_higher_is_better(config.promotion_metric) if direction == "auto" else direction == "higher"
        return cls(config.promotion_metric, higher, float(config.promotion_margin))

    @property
    def mlflow_key(self) -> str:
        """The metric's name in the training run (log_to_mlflow writes the means as validation_*)."""
        return f"validation_{self.metric}"

    def describe(self) -> str:
        return f"{self.metric}, {'higher' if self.higher_is_better else 'lower'} is better, margin {self.margin:g}"

    def beats(self, new: float, champion: float) -> bool:
        """Better by more than the margin (equal values never move the champion)."""
        if self.higher_is_better:
            return new > champion + self.margin
        return new < champion - self.margin


# the report's metrics and their directions, as trainer.evaluation.metrics.HIGHER_IS_BETTER has them (a test
# keeps the two equal; importing that module would import scikit-image into `qwen-edit champion`)
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "edit_success": True, "preservation": True, "pixel_shift": False,
                    "latent_mse": False}


def metric_higher_is_better(metric: str) -> bool:
    """`lora_psnr` -> True, `lora_latent_mse` -> False: the direction of the report's own metrics."""
    name = metric.split("_", 1)[1] if metric.startswith(("lora_", "base_")) else metric
    return HIGHER_IS_BETTER[name]


@dataclass(frozen=True)
class Decision:
    promoted: bool  # the new version takes `champion`; else it gets `challenger`
    reason: str

    @property
    def alias(self) -> str:
        return CHAMPION if self.promoted else CHALLENGER


def decide(rule: PromotionRule, new: float | None, champion: float | None) -> Decision:
    """`new`: the new version's value of the metric; `champion`: the champion's (None: no champion yet)."""
    if new is None or not math.isfinite(new):
        return Decision(False, f"the new version has no finite {rule.metric} ({new}); the champion stays")
    if champion is None:
        return Decision(True, f"no champion yet: the first version with {rule.metric} {new:.6g} takes it")
    if not math.isfinite(champion):
        return Decision(True, f"the champion's {rule.metric} is {champion}: {new:.6g} replaces it")
    better = "higher" if rule.higher_is_better else "lower"
    delta = new - champion
    if rule.beats(new, champion):
        return Decision(True, f"{rule.metric} {new:.6g} against the champion's {champion:.6g} ({delta:+.3g}): "
                              f"{better} by more than the margin {rule.margin:g}")
    return Decision(False, f"{rule.metric} {new:.6g} against the champion's {champion:.6g} ({delta:+.3g}): "
                           f"not {better} by more than the margin {rule.margin:g}; the champion stays")
