"""Where a project's paths may lead (issue 15 §6, issue 18 §3).

Relative paths, and the cache folders derived from dataset ids, stay inside the project root after
`..` and symlinks are followed, unless `allow_paths_outside_root: true`; absolute paths the user
typed are theirs to choose (SimpleTuner users keep data and caches on other disks that way).
"""

import json
from pathlib import Path

import pytest

from trainer.errors import ConfigError
from trainer.workflow import load_project


def project_files(root: Path, entries: list[dict] | None = None, **config) -> tuple[Path, Path]:
    """A config + dataset config under `root` with relative paths, as users write them."""
    entries = entries or [
        {"id": "edits", "instance_data_dir": "data/edited", "conditioning_data": ["refs"]},
        {"id": "refs", "dataset_type": "conditioning", "instance_data_dir": "data/reference"},
    ]
    (root / "config.json").write_text(json.dumps({"model_flavour": "edit-v2", "output_dir": "out", **config}))
    (root / "multidatabackend.json").write_text(json.dumps(entries))
    return root / "config.json", root / "multidatabackend.json"


def refusal(root: Path, *named: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_project(root / "config.json", root / "multidatabackend.json", root)
    for name in named:
        assert name in str(info.value), str(info.value)
    return str(info.value)


def test_relative_paths_inside_the_root_are_accepted(tmp_path):
    project_files(tmp_path)
    project = load_project(tmp_path / "config.json", tmp_path / "multidatabackend.json", tmp_path)
    assert project.output_dir == tmp_path.resolve() / "out"


@pytest.mark.parametrize("key", ["instance_data_dir", "cache_dir_vae"])
def test_a_relative_path_climbing_out_of_the_root_is_refused_naming_the_key(tmp_path, key):
    root = tmp_path / "project"
    root.mkdir()
    entries = [
        {"id": "edits", "instance_data_dir": "data/edited", "conditioning_data": ["refs"], key: "../../elsewhere"},
        {"id": "refs", "dataset_type": "conditioning", "instance_data_dir": "data/reference"},
    ]
    project_files(root, entries)
    refusal(root, f"dataset 'edits' {key} '../../elsewhere'", "outside the project root", "allow_paths_outside_root")


def test_an_output_dir_climbing_out_of_the_root_is_refused(tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    project_files(root, output_dir="../../../tmp/out")
    refusal(root, "output_dir '../../../tmp/out'", "outside the project root")


def test_a_dataset_id_cannot_put_its_cache_folder_outside_the_project(tmp_path):
    """issue 18 §3: an id like ../../x named cache/vae/../../x."""
    entries = [
        {"id": "../../x", "instance_data_dir": "data/edited", "conditioning_data": ["refs"]},
        {"id": "refs", "dataset_type": "conditioning", "instance_data_dir": "data/reference"},
    ]
    project_files(tmp_path, entries)
    refusal(tmp_path, "'../../x'", "plain name")


def test_a_symlink_out_of_the_root_is_refused_for_derived_cache_folders(tmp_path):
    root, outside = tmp_path / "project", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "cache").symlink_to(outside)  # cache/text_embeds/edits would land outside
    project_files(root)
    refusal(root, "dataset 'edits' prompt-embedding cache", str(outside.resolve()), "symlink")


def test_a_symlinked_data_folder_is_refused_unless_allowed(tmp_path):
    root, disk = tmp_path / "project", tmp_path / "big-disk"
    root.mkdir()
    (disk / "edited").mkdir(parents=True)
    (root / "data").symlink_to(disk)
    project_files(root)
    refusal(root, "instance_data_dir 'data/edited'", str(disk.resolve() / "edited"))
    project_files(root, allow_paths_outside_root=True)
    load_project(root / "config.json", root / "multidatabackend.json", root)


def test_absolute_paths_the_user_typed_are_their_choice(tmp_path):
    root, disk = tmp_path / "project", tmp_path / "big-disk"
    root.mkdir()
    entries = [
        {"id": "edits", "instance_data_dir": str(disk / "edited"), "conditioning_data": ["refs"], "cache_dir_vae": str(disk / "vae")},
        {"id": "refs", "dataset_type": "conditioning", "instance_data_dir": str(disk / "reference")},
        {"id": "prompts", "dataset_type": "text_embeds", "default": True, "cache_dir": str(disk / "text")},
    ]
    project_files(root, entries, output_dir=str(disk / "out"))
    project = load_project(root / "config.json", root / "multidatabackend.json", root)
    assert project.output_dir == disk / "out"


def test_a_root_that_is_itself_a_symlink_is_compared_resolved(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    project_files(real)
    load_project(tmp_path / "link" / "config.json", tmp_path / "link" / "multidatabackend.json", tmp_path / "link")


def test_a_project_root_in_a_symlink_loop_is_a_config_error(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(ConfigError, match="project root .*loop.*cannot be resolved"):
        load_project(tmp_path / "config.json", None, tmp_path / "loop")
