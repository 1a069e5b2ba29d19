"""Atomic writes: the file at the target path is always either the old one or the complete new one.

Writers go to a hidden temp file beside the target, which is renamed over it only once the
writer returned. A writer that raises (or is interrupted) leaves the old file, or no file,
and no temp file behind.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from trainer.io import atomic_folder, atomic_path, atomic_write_json, atomic_write_text, atomic_write_with


def names(folder) -> list[str]:
    """Every entry of `folder`, hidden ones included."""
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_text_creates_parent_folders_and_leaves_only_the_target(tmp_path):
    path = atomic_write_text(tmp_path / "a" / "b" / "note.txt", "hello")
    assert path.read_text() == "hello"
    assert names(path.parent) == ["note.txt"]


def test_atomic_write_text_replaces_an_existing_file(tmp_path):
    path = tmp_path / "note.txt"
    path.write_text("old, and longer than the new text")
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    assert names(tmp_path) == ["note.txt"]


def test_atomic_write_json_writes_stable_readable_json(tmp_path):
    path = atomic_write_json(tmp_path / "data.json", {"b": 1, "a": [1, 2], "path": tmp_path})
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1, "path": str(tmp_path)}
    assert path.read_text().index('"a"') < path.read_text().index('"b"')  # sorted keys: diffable


def test_atomic_write_with_serves_writers_that_take_a_path(tmp_path):
    tensors = {"w": torch.arange(6.0).reshape(2, 3)}
    path = atomic_write_with(tmp_path / "t.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    assert torch.equal(load_file(str(path))["w"], tensors["w"])
    assert names(tmp_path) == ["t.safetensors"]


def half_then_fail(tmp):
    tmp.write_bytes(b"half a fi")  # what a crash mid-write leaves
    raise OSError("disk full")


def test_a_failing_writer_leaves_the_old_file_untouched_and_no_temp_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"the complete old file")
    with pytest.raises(OSError, match="disk full"):
        atomic_write_with(path, half_then_fail)
    assert path.read_bytes() == b"the complete old file"
    assert names(tmp_path) == ["model.safetensors"]


def test_a_failing_writer_never_creates_the_target(tmp_path):
    with pytest.raises(OSError):
        atomic_write_with(tmp_path / "model.safetensors", half_then_fail)
    assert names(tmp_path) == []


def test_an_interrupt_mid_write_is_cleaned_up_too(tmp_path):
    path = tmp_path / "manifest.json"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(path) as tmp:
            tmp.write_text("{")
            raise KeyboardInterrupt
    assert names(tmp_path) == []


def test_the_temp_file_is_hidden_and_beside_the_target_so_the_rename_is_atomic(tmp_path):
    path = tmp_path / "sub" / "cache.safetensors"
    with atomic_path(path) as tmp:
        assert tmp.parent == path.parent  # same filesystem: os.replace is one atomic rename
        assert tmp.name.startswith(".cache.safetensors.") and tmp.suffix == ".tmp"
        assert not path.exists()  # nothing at the target until the writer is done
        tmp.write_text("done")
    assert path.read_text() == "done" and not tmp.exists()


@pytest.mark.parametrize("target", [
    lambda tmp: tmp / ("n" * 300) / "summary.json",  # a folder name beyond NAME_MAX
    lambda tmp: tmp / "a-file" / "summary.json",  # a file where a folder should be
])
def test_a_write_the_file_system_refuses_is_an_output_error_naming_the_path(tmp_path, target):
    """Issue 15: OSError tracebacks from trainer/io.py; now a QwenEditError (the CLI's `error:` line) that is still an OSError."""
    from trainer.errors import OutputError, QwenEditError

    (tmp_path / "a-file").write_text("")
    path = target(tmp_path)
    with pytest.raises(OutputError) as info:
        atomic_write_json(path, {"a": 1})
    assert isinstance(info.value, QwenEditError) and isinstance(info.value, OSError)
    assert str(info.value).startswith(f"cannot write {path}")
    assert names(tmp_path) == ["a-file"]


def test_a_writer_failing_with_an_os_error_leaves_no_temp_file_and_names_the_target(tmp_path):
    from trainer.errors import OutputError

    def full_disk(tmp):
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputError, match="cannot write .*out.bin: No space left on device"):
        atomic_write_with(tmp_path / "out.bin", full_disk)
    assert names(tmp_path) == []


def test_a_folder_replaces_the_old_one_whole_and_a_failed_one_leaves_it(tmp_path):
    out = tmp_path / "pipeline"
    with atomic_folder(out) as staging:
        (staging / "weights").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(out) as staging:
            (staging / "weights").write_text("half")
            raise RuntimeError("interrupted")
    assert (out / "weights").read_text() == "old" and names(tmp_path) == ["pipeline"]
    with atomic_folder(out) as staging:
        (staging / "new").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new"] and names(tmp_path) == ["pipeline"]  # nothing of the old one, no leftovers
