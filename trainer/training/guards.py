"""Numerical guards: a NaN/inf loss or gradient stops the run at the first step it appears.

The check reads what the step computes anyway: the step loss already gathered for the log and
the gradient norm that clipping returns, once per optimizer step (no extra host sync per
micro-step). The message names the step, the samples of that step, and the last good
checkpoint; nothing non-finite is ever written (`assert_finite` guards checkpoints and the LoRA).

`max_nonfinite_steps: N` skips up to N such steps instead (no optimizer update, no EMA update);
it costs one host sync per optimizer step, before the update, so a skipped step changes nothing.
"""

import math
from collections.abc import Callable, Mapping

import torch

from trainer.errors import QwenEditError


class NonFiniteError(QwenEditError):
    """Training produced a NaN or infinite value; the run stops without writing it."""


def assert_finite(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    bad = [key for key, value in tensors.items() if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        raise NonFiniteError(f"{what} has non-finite values in {len(bad)} tensor(s), e.g. {bad[0]}: not written")


class NonFiniteGuard:
    def __init__(self, max_skips: int, check_gradients: bool, skipped: list | None = None):
        self.max_skips = max_skips
        # fp16's GradScaler meets inf gradients by design (it skips those steps and lowers its scale)
        self.check_gradients = check_gradients
        self.skipped = skipped if skipped is not None else []  # [{"step", "samples", "reason"}], kept in checkpoints

    def skip_before_update(self, grad_norm: torch.Tensor | None) -> bool:
        """Only with max_nonfinite_steps > 0: is this step's gradient non-finite (one host sync)?"""
        if self.max_skips <= 0 or not self.check_gradients or grad_norm is None:
            return False
        return not bool(torch.isfinite(grad_norm))

    def check(
        self, step: int, loss: float, grad_norm: float | None, update_skipped: bool,
        samples: Callable[[], list[str]], last_checkpoint: str | None,
    ) -> bool:
        """After the step: True when it was skipped (within the bound); raises NonFiniteError to stop.

        `samples` is called only on this rare path: it names the samples whose loss was not finite
        (all of the step's samples when the loss was finite but the gradient was not).
        """
        bad_loss = not math.isfinite(loss)
        bad_grad = self.check_gradients and grad_norm is not None and not math.isfinite(grad_norm)
        if not (bad_loss or bad_grad):
            return False
        what = f"loss {loss}" if bad_loss else f"gradient norm {grad_norm}"
        names = samples()
        if update_skipped and len(self.skipped) < self.max_skips:
            self.skipped.append({"step": step, "samples": names, "reason": what})
            return True
        kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved yet"
        skipping = (
            f"{len(self.skipped)} earlier step(s) were skipped, the limit max_nonfinite_steps={self.max_skips}"
            if self.max_skips > 0
            else "set max_nonfinite_steps to skip a bounded number of such steps instead"
        )
        raise NonFiniteError(
            f"non-finite {what} at step {step} (sample(s): {', '.join(names) or 'unknown'}); training stopped and no LoRA "
            f"was written; {kept}. A corrupt cache file (rebuild it with `qwen-edit cache`) or a learning_rate "
            f"too high for this model are the usual causes; {skipping}"
        )
