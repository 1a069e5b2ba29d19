"""kill -9 of `qwen-edit cache` mid-file: no half-written cache file under its name; the re-run completes it.

The cache process kills itself (SIGKILL) with one file written to its temp name, not yet renamed:
the moment a crash would leave half a file behind if writes were not atomic.
"""

import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import write_small_project
from trainer.data.caches import build_text_cache, build_vae_cache, verify_cache
from trainer.faults import ENV
from trainer.workflow import check_data, load_project, training_env

pytestmark = pytest.mark.slow


def test_a_cache_pass_killed_mid_file_leaves_whole_files_and_the_rerun_completes(demo_root, tmp_path):
    config_path, data_path = write_small_project(tmp_path, demo_root / "demo" / "models")
    project = load_project(config_path, data_path, tmp_path)
    manifest, _ = check_data(project)
    command = [sys.executable, "-m", "trainer.cli", "cache", "--config", str(config_path), "--data", str(data_path), "--root", str(tmp_path)]
    done = subprocess.run(command, env={**training_env(project), ENV: "io.before_rename:0002.safetensors"}, capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr

    text_dir = tmp_path / "cache" / "text_embeds" / "edits"
    assert not (text_dir / "0002.safetensors").exists()
    (unpublished,) = text_dir.glob(".0002.safetensors.*.tmp")
    published = sorted((tmp_path / "cache").rglob("*.safetensors"))
    assert published and all(load_file(str(path)) for path in published)  # every named file is whole

    build_text_cache(manifest, project.dataset_config, project.config)
    build_vae_cache(manifest, project.dataset_config, project.config)
    for kind in ("text", "vae"):
        assert verify_cache(manifest, project.dataset_config, project.config, kind) == []
    rebuilt, killed = load_file(str(text_dir / "0002.safetensors")), load_file(str(unpublished))
    assert rebuilt.keys() == killed.keys() and all(torch.equal(rebuilt[k], killed[k]) for k in rebuilt)
