"""One trainer per output_dir; a killed launcher leaves no orphan; a killed save leaves nothing that lingers.

The lock tests hold the lock in a real second process and kill it with SIGKILL.
"""

import json
import multiprocessing
import os
import signal
import subprocess
import time

import pytest

from trainer.training.run_lock import LOCK_NAME, OutputDirBusy, output_dir_lock, remove_stale_temp_files


def _hold_lock(output_dir, ready) -> None:
    with output_dir_lock(output_dir):
        ready.set()
        time.sleep(600)


def _locked_by_child(output_dir):
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    child = context.Process(target=_hold_lock, args=(output_dir, ready))
    child.start()
    assert ready.wait(60)
    return child


def test_a_second_trainer_on_the_same_output_dir_is_refused_naming_the_holder(tmp_path):
    child = _locked_by_child(tmp_path)
    try:
        with pytest.raises(OutputDirBusy) as info:
            with output_dir_lock(tmp_path):
                pass
        message = str(info.value)
        assert f"output_dir {tmp_path} is in use by another trainer (pid {child.pid} on " in message
        assert "set another output_dir" in message
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join()
    with output_dir_lock(tmp_path):  # the kernel dropped the dead holder's lock: nothing stale to clear
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_the_lock_is_released_when_the_run_ends(tmp_path):
    with output_dir_lock(tmp_path):
        pass
    with output_dir_lock(tmp_path):
        pass


def test_leftovers_of_interrupted_saves_are_removed_and_nothing_else(tmp_path):
    out = tmp_path
    keep = [
        out / "checkpoints" / "checkpoint-4" / "lora.safetensors",
        out / "lora" / "pytorch_lora_weights.safetensors",
        out / "training_summary.json",
        out / ".pairing_manifest.json.abc.tmp",  # another stage's write in flight: not the trainer's
        out / "validation" / "report.html",
    ]
    stale = [
        out / "checkpoints" / ".checkpoint-6-x1" / "lora.safetensors",
        out / "checkpoints" / ".pruning-checkpoint-2-9" / "lora.safetensors",
        out / "checkpoints" / ".replaced-checkpoint-4-9" / "lora.safetensors",
        out / "lora" / ".saving-abc" / "pytorch_lora_weights.safetensors",
        out / "lora" / ".pytorch_lora_weights_comfyui.safetensors.q1.tmp",
        out / "lora" / "ema" / ".saving-def" / "pytorch_lora_weights.safetensors",
        out / ".training_summary.json.z2.tmp",
        out / ".replaced-previous_checkpoints-3" / "checkpoint-1" / "lora.safetensors",
        out / "validation" / "step-2" / ".report.html.k.tmp",
    ]
    for path in keep + stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    removed = remove_stale_temp_files(out)
    assert len(removed) == 9
    assert all(p.exists() for p in keep)
    assert not any(p.exists() for p in stale)
    assert not (out / "checkpoints" / ".checkpoint-6-x1").exists() and not (out / "lora" / ".saving-abc").exists()


# -- end to end: accelerate launch, a second trainer, a killed launcher ------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_a_second_trainer_is_refused_and_killing_the_launcher_leaves_no_orphan(demo_root, tmp_path):
    from tests.conftest import prepare_small_project
    from trainer.workflow import training_command, training_env

    project = prepare_small_project(tmp_path, demo_root, max_train_steps=100000, checkpointing_steps=100000)
    lock = project.output_dir / LOCK_NAME
    first = subprocess.Popen(
        training_command(project), env=training_env(project), cwd=project.root,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        trainer_pid = None
        while time.time() < deadline and first.poll() is None:
            if lock.exists() and lock.read_text():
                trainer_pid = json.loads(lock.read_text())["pid"]
                break
            time.sleep(0.2)
        assert trainer_pid is not None and trainer_pid != first.pid  # the training process under the launcher holds it

        second = subprocess.run(training_command(project), env=training_env(project), cwd=project.root, capture_output=True, text=True)
        assert second.returncode != 0
        assert f"is in use by another trainer (pid {trainer_pid} on" in second.stderr, second.stderr
        assert "Traceback" not in second.stderr
        assert _pid_alive(trainer_pid)  # the refused one did not disturb the running one

        os.kill(first.pid, signal.SIGKILL)  # only the launcher, as when `accelerate launch` is killed
        first.wait()
        deadline = time.time() + 60
        while _pid_alive(trainer_pid) and time.time() < deadline:
            time.sleep(0.2)
        assert not _pid_alive(trainer_pid), "the training process kept running after its launcher was killed"
    finally:
        try:
            os.killpg(first.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
