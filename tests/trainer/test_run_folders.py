"""Each run in its own folder under output_dir, `latest` pointing at the newest trained one, and a
resumed run back in the folder of the run it continues (trainer.run_folders)."""

import fcntl
import os

import pytest

from trainer.errors import OutputError
from trainer.run_folders import (
    choose_run_dir,
    default_run_name,
    folder_name,
    holds_a_run,
    latest_run_dir,
    point_latest,
)
from trainer.training.run_lock import LOCK_NAME


def test_default_names_say_flavour_overrides_and_dagster_run():
    assert default_run_name("edit-v2") == "edit-v2"
    assert default_run_name("edit-v2", {"learning_rate": 5e-5, "max_train_steps": 200}) == "edit-v2_learning_rate-5e-05_max_train_steps-200"
    # where the run goes is not what it is; the flavour is said once
    assert default_run_name("edit-v1", {"output_dir": "x", "report_to": "none", "model_flavour": "edit-v1"}) == "edit-v1"
    assert default_run_name("edit-v2", {"seed": 7}, "1a2b3c4d-5e6f") == "edit-v2_seed-7_dagster-1a2b3c4d"


def test_folder_names_are_one_safe_path_component():
    assert folder_name("my run/../x") == "my-run-..-x"
    assert folder_name("latest") == "latest-run"  # never the pointer's own name
    assert folder_name("///") == "run"
    long = folder_name("edit-v2_" + "a" * 300)
    assert len(long) <= 96 and long.startswith("edit-v2_") and "..." in long


def _finished(folder):
    (folder / "lora").mkdir(parents=True)
    (folder / "training_summary.json").write_text("{}")


def _interrupted(folder):
    (folder / "checkpoints" / "checkpoint-2").mkdir(parents=True)


def test_a_new_run_never_takes_the_folder_of_another(tmp_path):
    assert choose_run_dir(tmp_path, "edit-v2", resuming=True) == tmp_path / "edit-v2"
    (tmp_path / "edit-v2").mkdir()
    (tmp_path / "edit-v2" / "pairing_manifest.json").write_text("[]")  # a data check only: no run yet
    assert choose_run_dir(tmp_path, "edit-v2", resuming=False) == tmp_path / "edit-v2"
    _finished(tmp_path / "edit-v2")
    assert choose_run_dir(tmp_path, "edit-v2", resuming=True) == tmp_path / "edit-v2-2"
    _interrupted(tmp_path / "edit-v2-2")
    assert choose_run_dir(tmp_path, "edit-v2", resuming=False) == tmp_path / "edit-v2-3"  # its checkpoints stay


def test_a_resumed_run_continues_in_the_folder_of_the_interrupted_one(tmp_path):
    _finished(tmp_path / "edit-v2")
    _interrupted(tmp_path / "edit-v2-2")
    assert choose_run_dir(tmp_path, "edit-v2", resuming=True) == tmp_path / "edit-v2-2"


def test_a_folder_a_trainer_holds_is_not_taken(tmp_path):
    folder = tmp_path / "edit-v2"
    _interrupted(folder)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as trainer.training.run_lock holds it while training
    try:
        assert holds_a_run(folder)
        assert choose_run_dir(tmp_path, "edit-v2", resuming=True) == tmp_path / "edit-v2-2"
    finally:
        os.close(fd)
    assert choose_run_dir(tmp_path, "edit-v2", resuming=True) == folder  # released: resumable again


def test_latest_points_at_the_newest_run_and_is_replaced_in_one_rename(tmp_path):
    assert latest_run_dir(tmp_path) is None
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    link = point_latest(tmp_path, first)
    assert os.readlink(link) == "a" and latest_run_dir(tmp_path) == first.resolve()  # relative: the folder can move
    point_latest(tmp_path, second)
    assert latest_run_dir(tmp_path) == second.resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "latest"]  # no temp link left


def test_a_real_folder_named_latest_is_not_replaced(tmp_path):
    (tmp_path / "latest").mkdir()
    (tmp_path / "a").mkdir()
    with pytest.raises(OutputError, match="is not the link to the latest run"):
        point_latest(tmp_path, tmp_path / "a")
