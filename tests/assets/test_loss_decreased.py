"""The loss_decreased asset check: the LoRA's held-out loss against the base's, from the training summary."""

import pytest

from qwen_edit_assets.assets.training import loss_decreased

RISING, FALLING = [0.5] * 10 + [2.0] * 10, [2.0] * 10 + [0.5] * 10


@pytest.mark.parametrize(
    "base, lora, history, passed",
    # the training losses say the opposite each time: the check must not read them
    [(1.5, 1.3, RISING, True), (1.5, 1.5, FALLING, False), (1.5, 1.6, FALLING, False)],
)
def test_passes_only_when_the_lora_beats_the_base_on_the_fixed_grid(base, lora, history, passed):
    result = loss_decreased({"held_out_base_loss": base, "held_out_lora_loss": lora, "loss_history": history})
    assert result.passed is passed
    assert result.metadata["held_out_base_loss"].value == base
    assert result.metadata["held_out_lora_loss"].value == lora
    assert result.metadata["held_out_ratio"].value == pytest.approx(lora / base)
