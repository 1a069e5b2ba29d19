"""A NaN/inf loss or gradient stops the run at its first step: named step and sample, good checkpoint kept, no LoRA.

The end-to-end cases put a NaN into one cached latent (the cache still counts as current: its
metadata is kept) and run the real `accelerate launch` of the trainer.
"""

import json
import math
import re
import subprocess

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.conftest import prepare_small_project
from trainer.model.lora import COMFYUI_WEIGHTS_NAME, LORA_WEIGHTS_NAME
from trainer.training.checkpoints import checkpoint_dirs, load_checkpoint
from trainer.training.guards import NonFiniteError, NonFiniteGuard, assert_finite
from trainer.workflow import load_manifest, training_command, training_env


def _never_called() -> list[str]:
    raise AssertionError("sample names are looked up only when a value is not finite")


def test_finite_steps_pass_without_looking_up_samples():
    guard = NonFiniteGuard(max_skips=0, check_gradients=True)
    assert guard.check(3, 0.5, 1.2, update_skipped=False, samples=_never_called, last_checkpoint=None) is False


@pytest.mark.parametrize("loss, norm, what", [(math.nan, 1.0, "loss nan"), (0.5, math.inf, "gradient norm inf")])
def test_a_non_finite_loss_or_gradient_stops_with_step_sample_and_checkpoint(loss, norm, what):
    guard = NonFiniteGuard(max_skips=0, check_gradients=True)
    with pytest.raises(NonFiniteError) as info:
        guard.check(7, loss, norm, update_skipped=False, samples=lambda: ["0003"], last_checkpoint="checkpoint-6")
    message = str(info.value)
    assert f"non-finite {what} at step 7 (sample(s): 0003)" in message
    assert "no LoRA was written; the last good checkpoint is checkpoint-6" in message
    assert "max_nonfinite_steps" in message


def test_fp16_inf_gradients_are_the_scalers_business():
    guard = NonFiniteGuard(max_skips=0, check_gradients=False)  # a GradScaler skips those steps itself
    assert guard.check(2, 0.5, math.inf, update_skipped=False, samples=_never_called, last_checkpoint=None) is False
    assert guard.skip_before_update(torch.tensor(math.inf)) is False


def test_max_nonfinite_steps_skips_within_the_bound_then_stops():
    guard = NonFiniteGuard(max_skips=2, check_gradients=True)
    assert guard.skip_before_update(torch.tensor(math.nan)) and not guard.skip_before_update(torch.tensor(3.0))
    for step in (4, 9):
        assert guard.check(step, math.nan, math.nan, update_skipped=True, samples=lambda: ["0001"], last_checkpoint=None)
    assert [s["step"] for s in guard.skipped] == [4, 9]
    with pytest.raises(NonFiniteError, match="2 earlier step"):
        guard.check(11, math.nan, math.nan, update_skipped=True, samples=lambda: ["0001"], last_checkpoint=None)


def test_without_skipping_the_guard_adds_no_sync_before_the_update():
    guard = NonFiniteGuard(max_skips=0, check_gradients=True)

    class NoSync(torch.Tensor):
        def __bool__(self):
            raise AssertionError("no host sync before the optimizer step by default")

    assert guard.skip_before_update(torch.tensor(math.nan).as_subclass(NoSync)) is False


def test_assert_finite_names_the_tensor():
    assert_finite({"a": torch.ones(2), "steps": torch.tensor([1, 2])}, "the LoRA")
    with pytest.raises(NonFiniteError, match="the LoRA has non-finite values in 1 tensor.*e.g. b"):
        assert_finite({"a": torch.ones(2), "b": torch.tensor([0.0, math.inf])}, "the LoRA")


# -- end to end -----------------------------------------------------------------------------------
STEPS, N_TRAIN = 8, 8


def _project_with_a_nan_latent(root, demo_root, **settings):
    """A project whose sample first trained at step 5 has a NaN in its cached target latent."""
    from trainer.training.data_order import micro_step_sample, training_samples

    project = prepare_small_project(
        root, demo_root, n_train=N_TRAIN, max_train_steps=STEPS, checkpointing_steps=2, checkpoints_total_limit=1, **settings
    )
    names = [name for name, _ in training_samples(load_manifest(project), project.dataset_config, project.config)]
    bad = names[micro_step_sample(4, N_TRAIN, project.config.seed, 1, 0)]  # micro-step 4 = step 5, each sample once per 8
    assert bad not in {names[micro_step_sample(m, N_TRAIN, project.config.seed, 1, 0)] for m in range(4)}
    latent = next((project.root / "cache" / "vae" / "edits").glob(f"{bad}.safetensors"))
    with safe_open(str(latent), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(latent))
    tensors["target"][0, 0, 0] = float("nan")
    save_file(tensors, str(latent), metadata=metadata)  # same metadata: the cache still counts as current
    return project, bad


def _train(project) -> subprocess.CompletedProcess:
    return subprocess.run(training_command(project), env=training_env(project), cwd=project.root, capture_output=True, text=True)


@pytest.mark.slow
def test_a_nan_in_one_cached_latent_stops_the_run_and_keeps_the_good_checkpoint(demo_root, tmp_path):
    project, bad = _project_with_a_nan_latent(tmp_path, demo_root)
    done = _train(project)
    assert done.returncode != 0, done.stdout + done.stderr
    errors = [line for line in re.split(r"[\r\n]", done.stderr) if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"non-finite loss nan at step 5 (sample(s): {bad})" in errors[0]
    assert "the last good checkpoint is checkpoint-4" in errors[0]
    assert not (project.lora_dir / LORA_WEIGHTS_NAME).exists() and not (project.lora_dir / COMFYUI_WEIGHTS_NAME).exists()
    assert not (project.output_dir / "training_summary.json").exists()
    (kept,) = checkpoint_dirs(project.output_dir / "checkpoints")  # checkpoints_total_limit=1 deleted nothing good
    state = load_checkpoint(kept)
    assert state.step == 4 and all(bool(torch.isfinite(t).all()) for t in state.lora.values())


@pytest.mark.slow
def test_max_nonfinite_steps_skips_the_bad_step_and_finishes(demo_root, tmp_path):
    project, bad = _project_with_a_nan_latent(tmp_path, demo_root, max_nonfinite_steps=1)
    done = _train(project)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"step 5: skipped, loss nan" in done.stdout
    lora = load_file(project.lora_dir / LORA_WEIGHTS_NAME)
    assert all(bool(torch.isfinite(t).all()) for t in lora.values())
    summary = json.loads((project.output_dir / "training_summary.json").read_text())
    assert summary["skipped_steps"] == [{"step": 5, "samples": [bad], "reason": "loss nan"}]
    assert len(summary["loss_history"]) == STEPS - 1 and all(math.isfinite(v) for v in summary["loss_history"])
