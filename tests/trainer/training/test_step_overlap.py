"""The train loop reads each step's loss while the next step is queued (trainer/training/recipe.py:
`optimizer_step` queues, `_finish_step` reads): the card never waits for the host's logging and the
next sample's loading. It changes no number: the losses, learning rates, checkpoints and LoRA are
those of the loop that waits for every step (which it still does when EMA or max_nonfinite_steps
needs the value before the next update, and before a checkpoint).
"""

import pytest
import torch

from tests.conftest import prepare_small_project
from trainer.model.lora import lora_state_dict
from trainer.tracking.reporting import SilentReporter
from trainer.training.checkpoints import load_checkpoint
from trainer.training.recipe import LoraTrainingRecipe

pytestmark = pytest.mark.slow
STEPS, CHECKPOINT_EVERY = 6, 3


def train(root, demo_root, **settings):
    project = prepare_small_project(root, demo_root, max_train_steps=STEPS, checkpointing_steps=CHECKPOINT_EVERY, **settings)
    recipe = LoraTrainingRecipe(project.config, project.dataset_config, project.manifest_path, project.root, tags={})
    recipe.setup()
    events, logged = [], []
    queue = recipe.optimizer_step

    def queued(step):
        events.append(("queued", step + 1))
        return queue(step)

    def on_step(step, loss, lr):
        events.append(("read", step))
        logged.append((step, loss, lr))

    recipe.optimizer_step = queued
    recipe.train(SilentReporter(), on_step)
    checkpoint = load_checkpoint(project.output_dir / "checkpoints" / f"checkpoint-{CHECKPOINT_EVERY}")
    return events, logged, lora_state_dict(recipe.accelerator.unwrap_model(recipe.transformer)), checkpoint


def test_reading_each_loss_one_step_late_changes_no_number(demo_root, tmp_path):
    late_events, late_logged, late_lora, late_checkpoint = train(tmp_path / "late", demo_root)
    # max_nonfinite_steps > 0: the guard decides each update from the value, so every step is read at once
    wait_events, wait_logged, wait_lora, wait_checkpoint = train(tmp_path / "wait", demo_root, max_nonfinite_steps=1)

    assert wait_events == [e for step in range(1, STEPS + 1) for e in (("queued", step), ("read", step))]
    # read after the next step was queued, except where the host needs the model first (the checkpoint)
    # and at the end
    assert late_events == [
        ("queued", 1), ("queued", 2), ("read", 1), ("queued", 3), ("read", 2), ("read", 3),
        ("queued", 4), ("queued", 5), ("read", 4), ("queued", 6), ("read", 5), ("read", 6),
    ]
    assert late_logged == wait_logged  # the same losses and learning rates, logged for the same steps
    assert late_lora.keys() == wait_lora.keys() and all(torch.equal(late_lora[k], wait_lora[k]) for k in late_lora)
    assert late_checkpoint.step == wait_checkpoint.step == CHECKPOINT_EVERY
    assert late_checkpoint.loss_history == wait_checkpoint.loss_history == [loss for _, loss, _ in wait_logged[:CHECKPOINT_EVERY]]
    assert all(torch.equal(late_checkpoint.lora[k], wait_checkpoint.lora[k]) for k in late_checkpoint.lora)
