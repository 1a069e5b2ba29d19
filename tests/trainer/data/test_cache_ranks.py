"""`accelerate launch -m trainer.cache` on two processes (CPU processes over gloo here) shares the manifest and writes the
same cache as one process: every file once, by the rank whose share it is, bit for bit the same tensors
(the VAE's batches are cut the same way for any number of processes)."""

import json

import pytest
import torch
from safetensors import safe_open

from tests.trainer.data.test_cache_speed import assert_same_files, cache_files, small_project
from trainer.data.cache_ranks import CacheRanks
from trainer.workflow import CACHE_SUMMARY_NAME, build_caches, caching_command

pytestmark = pytest.mark.slow


def test_two_processes_share_the_manifest_and_write_the_one_process_cache(demo_root, tmp_path, monkeypatch):
    project, manifest = small_project(tmp_path, demo_root, vae_batch_size=2)
    torch.set_num_threads(1)
    one = build_caches(project, manifest, num_processes=1)
    alone = cache_files(project.root)
    for path in (project.root / "cache").rglob("*.safetensors"):
        path.unlink()

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    command = caching_command(project, 2, project.output_dir / CACHE_SUMMARY_NAME)
    assert "--multi_gpu" in command and command[command.index("--num_processes") + 1] == "2"
    two = build_caches(project, manifest, num_processes=2)
    assert_same_files(cache_files(project.root), alone)
    # 5 rows: text 5 chunks of one row, VAE chunks of 2 rows (2 + 2 + 1): chunk j is rank j % 2's
    assert two["text"].encoded_per_rank == (3, 2) and two["vae"].encoded_per_rank == (3, 2)
    assert {k: (s.encoded, s.reused) for k, s in two.items()} == {k: (s.encoded, s.reused) for k, s in one.items()} == {
        "text": (5, 0), "vae": (5, 0)}
    assert json.loads((project.output_dir / CACHE_SUMMARY_NAME).read_text())["processes"] == 2
    for path in (project.root / "cache").rglob("*.safetensors"):  # written once each: no temp file left
        with safe_open(str(path), framework="pt") as handle:
            assert handle.metadata()["fingerprint"]
    assert not list((project.root / "cache").rglob("*.tmp"))


def test_chunk_j_belongs_to_rank_j_mod_world():
    ranks = [CacheRanks(rank, 3) for rank in range(3)]
    assert [[j for j in range(8) if r.owns(j)] for r in ranks] == [[0, 3, 6], [1, 4, 7], [2, 5]]
    assert CacheRanks().gather(7) == [7] and CacheRanks().is_main
