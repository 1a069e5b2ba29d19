"""On CUDA (bf16, page-locked inputs, asynchronous copies): worker threads and the writer thread change no
cache tensor, and `vae_batch_size` 4 equals batch 1 within bf16 rounding. The pass reports its GPU peak and
gives the card back what the encoder held."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the pinned/asynchronous copies are CUDA's")


def test_on_cuda_threads_change_no_tensor_and_batches_stay_within_bf16_rounding(demo_root, tmp_path):
    from safetensors.torch import load

    from tests.trainer.data.test_cache_speed import assert_same_files, cache_files, small_project
    from trainer.data.caches import build_text_cache, build_vae_cache

    project, manifest = small_project(tmp_path, demo_root, mixed_precision="bf16")

    def rebuild(**settings):
        import shutil

        shutil.rmtree(project.root / "cache", ignore_errors=True)
        config = project.config.model_copy(update=settings)
        stats = build_text_cache(manifest, project.dataset_config, config), build_vae_cache(manifest, project.dataset_config, config)
        return cache_files(project.root), stats

    alone, _ = rebuild(cache_workers=0, vae_batch_size=1)
    threaded, (text, vae) = rebuild(cache_workers=3, vae_batch_size=1)
    assert_same_files(threaded, alone)
    assert text.peak_reserved_gib > 0 and vae.peak_reserved_gib > 0
    assert text.reserved_after_gib < text.peak_reserved_gib  # the VL encoder's memory went back to the card
    batched, _ = rebuild(cache_workers=3, vae_batch_size=4)
    for path in alone:
        a, b = load(batched[path]), load(alone[path])
        for name in b:
            assert a[name].dtype == b[name].dtype
            torch.testing.assert_close(a[name].float(), b[name].float(), rtol=2e-2, atol=2e-2)
