"""Training checkpoints: complete or absent, rotated, and found again by resume_from_checkpoint.

A checkpoint is written into a hidden `.checkpoint-N-*` folder and renamed to `checkpoint-N`
when complete, so a crash mid-save can never be resumed from.
"""

import pytest
import torch

from trainer.errors import ConfigError
from trainer.training.checkpoints import (
    CheckpointError,
    TrainingState,
    checkpoint_dirs,
    load_checkpoint,
    remove_stale_temp,
    resolve_resume,
    save_checkpoint,
)


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
    assert sorted(p.name for p in path.iterdir()) == [
        "ema.safetensors", "lora.safetensors", "optimizer.safetensors", "training_state.json",
    ]
    loaded = load_checkpoint(path)
    assert loaded.step == 20
    assert loaded.lora.keys() == saved.lora.keys()
    assert all(torch.equal(loaded.lora[k], saved.lora[k]) for k in saved.lora)
    assert all(torch.equal(loaded.ema[k], saved.ema[k]) for k in saved.ema)
    assert torch.equal(loaded.optimizer["state"][0]["exp_avg"], saved.optimizer["state"][0]["exp_avg"])
    assert loaded.optimizer["param_groups"] == saved.optimizer["param_groups"]
    assert list(loaded.optimizer["state"]) == [0]  # integer keys stay integers
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


# -- no pickle: checkpoints are JSON + safetensors; old pickled ones are refused unread ------------
def test_the_state_is_plain_json_and_safetensors(tmp_path):
    import json

    from safetensors.torch import load_file

    path = save_checkpoint(tmp_path, state(3), total_limit=None)
    meta = json.loads((path / "training_state.json").read_text())
    assert meta["step"] == 3 and meta["format"] == "qwen-edit-checkpoint/2"
    tensors = load_file(str(path / "optimizer.safetensors"))
    assert set(tensors) == {"optimizer.state.0.step", "optimizer.state.0.exp_avg"}


def test_a_real_adamw_and_scheduler_resume_to_the_same_updates(tmp_path):
    """The optimiser and scheduler state survive the JSON round trip exactly: the next steps are identical."""
    from diffusers.optimization import get_scheduler

    def make(params):
        optimizer = torch.optim.AdamW(params, lr=1e-2, betas=(0.8, 0.95))
        return optimizer, get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=10)

    def step(params, optimizer, scheduler, i):
        params[0].grad = torch.full_like(params[0], float(i + 1))
        optimizer.step()
        scheduler.step()

    params = [torch.nn.Parameter(torch.arange(4.0))]
    optimizer, scheduler = make(params)
    for i in range(3):
        step(params, optimizer, scheduler, i)
    saved = TrainingState(3, {"w": params[0].detach().clone()}, optimizer.state_dict(), scheduler.state_dict(), [1.0])
    save_checkpoint(tmp_path, saved, total_limit=None)
    loaded = load_checkpoint(tmp_path / "checkpoint-3")
    assert loaded.optimizer["param_groups"][0]["betas"] == (0.8, 0.95)  # tuples come back as tuples

    resumed = [torch.nn.Parameter(loaded.lora["w"].clone())]
    optimizer2, scheduler2 = make(resumed)
    optimizer2.load_state_dict(loaded.optimizer)
    scheduler2.load_state_dict(loaded.lr_scheduler)
    for i in range(3, 6):
        step(params, optimizer, scheduler, i)
        step(resumed, optimizer2, scheduler2, i)
    assert torch.equal(params[0], resumed[0])
    assert scheduler.get_last_lr() == scheduler2.get_last_lr()


def _plant_pickle(folder, marker):
    """A training_state.pt whose unpickling would create `marker` (what a malicious checkpoint does)."""
    import pickle

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    folder.mkdir(parents=True)
    (folder / "training_state.pt").write_bytes(pickle.dumps({"step": Payload()}))


def test_a_pickled_training_state_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "payload-ran"
    planted = tmp_path / "checkpoint-7"
    _plant_pickle(planted, marker)
    assert resolve_resume(tmp_path, "latest") == planted
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(planted)
    assert "training_state.pt, a pickle" in str(info.value) and "not read" in str(info.value)
    assert not marker.exists()
    assert resolve_resume(tmp_path, str(planted)) == planted  # named explicitly: found, then refused the same way


def test_a_truncated_or_foreign_checkpoint_is_a_clear_error(tmp_path):
    path = save_checkpoint(tmp_path, state(4), total_limit=None)
    data = (path / "optimizer.safetensors").read_bytes()
    (path / "optimizer.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable checkpoint"):
        load_checkpoint(path)
    (path / "training_state.json").write_text('{"format": "something else"}')
    with pytest.raises(CheckpointError, match="unreadable checkpoint"):
        load_checkpoint(path)


def test_a_non_finite_lora_is_never_checkpointed_and_the_good_one_stays(tmp_path):
    from trainer.training.guards import NonFiniteError

    save_checkpoint(tmp_path, state(10), total_limit=1)
    bad = state(20)
    bad.lora["transformer_blocks.0.attn.to_q.lora_A.weight"][0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="step 20"):
        save_checkpoint(tmp_path, bad, total_limit=1)
    assert steps(tmp_path) == ["checkpoint-10"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10"]


def test_stale_temp_folders_are_removed_and_checkpoints_kept(tmp_path):
    save_checkpoint(tmp_path, state(10), total_limit=None)
    for name in (".checkpoint-20-abc", ".pruning-checkpoint-5-1", ".replaced-checkpoint-10-2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "lora.safetensors").write_bytes(b"partial")
    removed = remove_stale_temp(tmp_path)
    assert len(removed) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10"]


# -- kill -9 inside save_checkpoint (a forked child kills itself at each named point) ---------------
SAVE_KILL_POINTS = ["checkpoint.lora_written", "checkpoint.state_written", "checkpoint.published", "checkpoint.pruning"]


def _save_in_child_killed_at(root, point: str, step: int, total_limit: int | None) -> int:
    import multiprocessing
    import os

    def child():
        os.environ["QWEN_EDIT_KILL_AT"] = f"{point}:{step}"
        save_checkpoint(root, state(step), total_limit=total_limit)
        os._exit(0)

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join(60)
    return process.exitcode


@pytest.mark.parametrize("point", SAVE_KILL_POINTS)
def test_a_save_killed_at_any_point_leaves_only_complete_checkpoints(tmp_path, point):
    import signal

    for step in (10, 20):
        save_checkpoint(tmp_path, state(step), total_limit=2)
    assert _save_in_child_killed_at(tmp_path, point, 30, total_limit=2) == -signal.SIGKILL
    found = steps(tmp_path)
    expected = {  # before the rename the older two stay; after it 30 is there (10 pruned by the next save, or hidden)
        "checkpoint.lora_written": ["checkpoint-10", "checkpoint-20"],
        "checkpoint.state_written": ["checkpoint-10", "checkpoint-20"],
        "checkpoint.published": ["checkpoint-10", "checkpoint-20", "checkpoint-30"],
        "checkpoint.pruning": ["checkpoint-20", "checkpoint-30"],
    }
    assert found == expected[point]
    for path in checkpoint_dirs(tmp_path):
        assert load_checkpoint(path).step == int(path.name.split("-")[1])  # every named one loads whole
    remove_stale_temp(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == found


def test_replacing_a_checkpoint_killed_midway_never_leaves_a_half_one_under_its_name(tmp_path):
    import signal

    save_checkpoint(tmp_path, state(10), total_limit=None)
    save_checkpoint(tmp_path, state(20), total_limit=None)
    assert _save_in_child_killed_at(tmp_path, "checkpoint.published", 20, total_limit=None) == -signal.SIGKILL
    assert steps(tmp_path) == ["checkpoint-10", "checkpoint-20"]
    assert load_checkpoint(tmp_path / "checkpoint-20").step == 20
