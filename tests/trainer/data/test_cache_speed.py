"""The cache stage at the device's pace computes what one-at-a-time caching computed.

Worker threads (`cache_workers`) and the writer thread change nothing: the files are byte-identical to
those of the main thread alone. `vae_batch_size` > 1 batches same-sized images: text files unchanged,
latents equal within float rounding. The pass loads its encoder only when something needs encoding and
keeps no reference to it afterwards (its memory is the training process's).
"""

import gc
import json
import shutil
import threading
import time
import weakref

import pytest
import torch
from safetensors.torch import load

from tests.conftest import write_small_project
from trainer.data.cache_threads import BackgroundWriter, prepared_in_order
from trainer.data.caches import build_text_cache, build_vae_cache
from trainer.workflow import CACHE_SUMMARY_NAME, build_caches, check_data, load_project

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")


def small_project(root, demo_root, **config):
    """edit-v2, 3 references, match_target_res: 4 training + 1 eval pair of 32 px images."""
    config_path, data_path = write_small_project(root, demo_root / "demo" / "models", caption_dropout_probability=0.1, **config)
    project = load_project(config_path, data_path, root)
    return project, check_data(project)[0]


def cache_files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "cache").rglob("*.safetensors"))}


def metadata(data: bytes) -> dict:
    header = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + header])["__metadata__"]


def assert_same_files(got: dict[str, bytes], want: dict[str, bytes], exact: bool = True) -> None:
    """Same files, metadata (fingerprints, stat keys) and tensors: bit for bit, or to float rounding.
    (Not the bytes: safetensors lays out its header in an order of its own from one write to the next.)"""
    assert got.keys() == want.keys()
    for path in want:
        assert metadata(got[path]) == metadata(want[path]), path
        a, b = load(got[path]), load(want[path])
        assert sorted(a) == sorted(b), path
        for name in b:
            if exact:
                assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), (path, name)
            else:
                torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-5)


def rebuild(project, manifest, **settings) -> dict[str, bytes]:
    """Both caches from scratch with `settings`; the files' bytes by path."""
    shutil.rmtree(project.root / "cache", ignore_errors=True)
    config = project.config.model_copy(update=settings)
    text = build_text_cache(manifest, project.dataset_config, config, CPU)
    vae = build_vae_cache(manifest, project.dataset_config, config, CPU)
    assert text.encoded == vae.encoded == len(manifest)
    return cache_files(project.root)


@pytest.mark.slow
def test_threads_and_batches_give_the_one_at_a_time_caches(demo_root, tmp_path):
    project, manifest = small_project(tmp_path, demo_root)
    one_at_a_time = rebuild(project, manifest, cache_workers=0, vae_batch_size=1)
    assert len(one_at_a_time) == 2 * len(manifest) == 10
    threaded = rebuild(project, manifest, cache_workers=3, vae_batch_size=1)
    assert_same_files(threaded, one_at_a_time)  # bit for bit

    batched = rebuild(project, manifest, cache_workers=2, vae_batch_size=4)
    text = {p for p in one_at_a_time if "/text_embeds/" in p}
    assert_same_files({p: batched[p] for p in text}, {p: one_at_a_time[p] for p in text})  # prompts are never batched
    vae = {p for p in one_at_a_time if "/vae/" in p}
    # the 4 training targets (and each reference of theirs) in one batch: other convolution kernels
    assert_same_files({p: batched[p] for p in vae}, {p: one_at_a_time[p] for p in vae}, exact=False)


def test_the_pass_loads_its_encoder_only_to_encode_and_keeps_no_reference_to_it(demo_root, tmp_path, monkeypatch):
    from trainer.data import caches

    loaded = []
    real = caches.load_pipeline

    def recording(*args, **kwargs):
        pipe = real(*args, **kwargs)
        loaded.append((weakref.ref(pipe), kwargs))
        return pipe

    monkeypatch.setattr(caches, "load_pipeline", recording)
    project, manifest = small_project(tmp_path, demo_root)
    stats = build_caches(project, manifest)
    assert [kwargs for _, kwargs in loaded] == [{"transformer": False, "vae": False}, {"transformer": False, "text_encoder": False}]
    gc.collect()
    assert all(ref() is None for ref, _ in loaded)  # freed: nothing of the encoders waits beside the transformer
    assert {kind: s.encoded for kind, s in stats.items()} == {"text": 5, "vae": 5} and stats["vae"].encoded_per_rank == (5,)
    assert stats["text"].peak_reserved_gib is None  # CPU: no GPU figures
    summary = (project.output_dir / CACHE_SUMMARY_NAME).read_text()
    assert '"processes": 1' in summary and '"seconds"' in summary

    loaded.clear()
    again = build_caches(project, manifest)  # nothing stale: no encoder is loaded at all
    assert loaded == [] and again["text"].reused == again["vae"].reused == 5


def test_prepared_items_come_in_order_computed_ahead_and_an_error_arrives_at_its_item():
    started = []

    def prepare(i):
        started.append(i)
        time.sleep(0.01 * (i % 3))  # out-of-order finishing
        if i == 7:
            raise ValueError("bad image 7")
        return i * i

    stream = prepared_in_order(range(10), prepare, workers=3, ahead=4)
    assert [next(stream) for _ in range(3)] == [0, 1, 4]
    assert max(started) >= 5  # up to `ahead` items beyond the one handed out
    assert [next(stream) for _ in range(4)] == [9, 16, 25, 36]
    with pytest.raises(ValueError, match="bad image 7"):
        next(stream)
    assert list(prepared_in_order(range(4), prepare, workers=0)) == [0, 1, 4, 9]  # the main thread, one at a time


def test_the_writer_writes_in_order_off_the_calling_thread_and_reports_a_failed_write():
    written, threads = [], set()

    def write(name):
        threads.add(threading.current_thread().name)
        if name == "c":
            raise OSError("disk full")
        written.append(name)

    with BackgroundWriter(write) as writer:
        for name in "ab":
            writer.put(name)
    assert written == ["a", "b"] and threads == {"qwen-edit-cache-writer"}

    with pytest.raises(OSError, match="disk full"):  # at a later put or at the end, once
        with BackgroundWriter(write) as writer:
            for name in "cde":
                writer.put(name)
    assert "d" not in written and "e" not in written  # nothing written after the failure


def test_steady_step_seconds_leaves_the_warm_up_out():
    from trainer.training.recipe import steady_step_seconds

    assert steady_step_seconds([0.0, 5.0, 6.0, 7.0, 8.0]) == 1.0  # the first step's 5 s compile/warm-up
    assert steady_step_seconds([0.0, 2.0]) == 2.0 and steady_step_seconds([1.0]) is None
