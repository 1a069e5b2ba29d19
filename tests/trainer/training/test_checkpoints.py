"""Training checkpoints: complete or absent, rotated, and found again by resume_from_checkpoint.

A checkpoint is written into a hidden `.checkpoint-N-*` folder and renamed to `checkpoint-N`
when complete, so a crash mid-save can never be resumed from.
"""

import pytest
import torch

from trainer.errors import ConfigError
from trainer.training.checkpoints import TrainingState, checkpoint_dirs, load_checkpoint, resolve_resume, save_checkpoint


def state(step: int, ema: bool = False) -> TrainingState:
    generator = torch.Generator().manual_seed(step)
    lora = {
        "transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 32, generator=generator),
        "transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(32, 4, generator=generator),
    }
    optimizer = {
        "state": {0: {"step": torch.tensor(float(step)), "exp_avg": torch.randn(4, 32, generator=generator)}},
        "param_groups": [{"lr": 1e-4, "params": [0]}],
    }
    return TrainingState(
        step=step,
        lora=lora,
        optimizer=optimizer,
        lr_scheduler={"last_epoch": step, "_last_lr": [1e-4]},
        loss_history=[1.0 / (i + 1) for i in range(step)],
        ema={k: v * 0.5 for k, v in lora.items()} if ema else None,
    )


def steps(root) -> list[str]:
    return [p.name for p in checkpoint_dirs(root)]


def test_save_then_load_round_trips_every_part_of_the_state(tmp_path):
    saved = state(20, ema=True)
    path = save_checkpoint(tmp_path, saved, total_limit=None)
    assert path == tmp_path / "checkpoint-20"
    assert sorted(p.name for p in path.iterdir()) == ["ema.safetensors", "lora.safetensors", "training_state.pt"]
    loaded = load_checkpoint(path)
    assert loaded.step == 20
    assert loaded.lora.keys() == saved.lora.keys()
    assert all(torch.equal(loaded.lora[k], saved.lora[k]) for k in saved.lora)
    assert all(torch.equal(loaded.ema[k], saved.ema[k]) for k in saved.ema)
    assert torch.equal(loaded.optimizer["state"][0]["exp_avg"], saved.optimizer["state"][0]["exp_avg"])
    assert loaded.optimizer["param_groups"] == saved.optimizer["param_groups"]
    assert loaded.lr_scheduler == saved.lr_scheduler
    assert loaded.loss_history == saved.loss_history


def test_a_checkpoint_without_ema_loads_with_ema_none(tmp_path):
    path = save_checkpoint(tmp_path, state(5), total_limit=None)
    assert not (path / "ema.safetensors").exists()
    assert load_checkpoint(path).ema is None


def test_no_temp_folder_is_left_after_a_save(tmp_path):
    save_checkpoint(tmp_path, state(5), total_limit=None)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-5"]


def test_checkpoints_total_limit_keeps_the_newest_by_step_number_not_by_name(tmp_path):
    for step in (5, 20, 100):  # "checkpoint-100" sorts before "checkpoint-20" as text
        save_checkpoint(tmp_path, state(step), total_limit=2)
    assert steps(tmp_path) == ["checkpoint-20", "checkpoint-100"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-100", "checkpoint-20"]  # really deleted


def test_without_a_limit_every_checkpoint_is_kept_oldest_first(tmp_path):
    for step in (30, 10, 20):
        save_checkpoint(tmp_path, state(step), total_limit=None)
    assert steps(tmp_path) == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]


def test_saving_a_step_again_replaces_that_checkpoint(tmp_path):
    save_checkpoint(tmp_path, state(10), total_limit=None)
    again = state(10)
    again.loss_history = [0.5]
    save_checkpoint(tmp_path, again, total_limit=None)
    assert steps(tmp_path) == ["checkpoint-10"]
    assert load_checkpoint(tmp_path / "checkpoint-10").loss_history == [0.5]


def test_a_half_written_temp_folder_is_not_a_checkpoint(tmp_path):
    save_checkpoint(tmp_path, state(10), total_limit=None)
    crashed = tmp_path / ".checkpoint-20-abc123"  # a save killed before its rename
    crashed.mkdir()
    (crashed / "lora.safetensors").write_bytes(b"partial")
    (tmp_path / "checkpoint-notes").mkdir()  # nor is anything else that is not checkpoint-<int>
    (tmp_path / "checkpoint-30").write_text("a file, not a folder")
    assert steps(tmp_path) == ["checkpoint-10"]
    assert resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-10"


def test_a_save_that_fails_midway_publishes_no_checkpoint(tmp_path):
    save_checkpoint(tmp_path, state(10), total_limit=1)
    broken = state(20)
    broken.optimizer = {"state": lambda: None}  # not picklable: fails after lora.safetensors is written
    with pytest.raises(Exception):
        save_checkpoint(tmp_path, broken, total_limit=1)
    assert steps(tmp_path) == ["checkpoint-10"]  # and the limit did not delete the good one
    assert resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-10"


def test_checkpoint_dirs_of_a_missing_folder_is_empty(tmp_path):
    assert checkpoint_dirs(tmp_path / "not-yet") == []


def test_resume_latest_picks_the_newest_checkpoint(tmp_path):
    for step in (9, 10, 100):
        save_checkpoint(tmp_path, state(step), total_limit=None)
    assert resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-100"


def test_resume_latest_on_a_fresh_run_starts_from_scratch(tmp_path):
    assert resolve_resume(tmp_path, "latest") is None
    assert resolve_resume(tmp_path / "not-yet", "latest") is None


def test_no_resume_setting_means_no_resume(tmp_path):
    save_checkpoint(tmp_path, state(10), total_limit=None)
    assert resolve_resume(tmp_path, None) is None
    assert resolve_resume(tmp_path, "") is None


def test_resume_from_a_checkpoint_path(tmp_path):
    save_checkpoint(tmp_path, state(10), total_limit=None)
    save_checkpoint(tmp_path, state(20), total_limit=None)
    path = resolve_resume(tmp_path, str(tmp_path / "checkpoint-10"))
    assert path == tmp_path / "checkpoint-10"
    assert load_checkpoint(path).step == 10


def test_resume_from_a_path_that_is_no_checkpoint_is_a_clear_error(tmp_path):
    save_checkpoint(tmp_path, state(10), total_limit=None)
    bad = tmp_path / "checkpoint-11"
    with pytest.raises(ConfigError) as info:
        resolve_resume(tmp_path, str(bad))
    message = str(info.value)
    assert f"resume_from_checkpoint={str(bad)!r}: no checkpoint there" in message
    assert "use 'latest' or one of ['checkpoint-10']" in message


def test_resume_from_a_half_written_checkpoint_folder_is_refused(tmp_path):
    crashed = tmp_path / ".checkpoint-20-abc123"
    crashed.mkdir()
    with pytest.raises(ConfigError, match="no checkpoint there"):
        resolve_resume(tmp_path, str(crashed))


def test_resume_from_a_checkpoint_name_looks_in_the_checkpoints_folder(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "checkpoints", state(10), total_limit=None)
    monkeypatch.chdir(tmp_path)  # the training subprocess runs in the project root
    assert resolve_resume(tmp_path / "checkpoints", "checkpoint-10") == tmp_path / "checkpoints" / "checkpoint-10"
