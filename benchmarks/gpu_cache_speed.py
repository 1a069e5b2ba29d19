"""Issue 11, item 3: the cache stage's rate beside the bare encoders' on one GPU (goal: >= 80 %).

The full-size random-weight Qwen2.5-VL-7B and Qwen-Image VAE (benchmarks/random_models.py) encode PAIRS
synthetic edit-v1 pairs (a 1024x1024 target PNG, one 1024x1024 reference, an instruction of realistic
length) through the project's own cache code: `build_text_cache` and `build_vae_cache`
(trainer.data.caches) with the in-memory model handed in as `pipeline=` (the one thing replaced: no
full-size checkpoint is saved or loaded). Same call, same inputs: the bare forward passes, i.e. the
text encoder called with exactly the inputs the pipeline's `encode_prompt` gives it, and the VAE's
`_encode_vae_image`, one after another with one synchronisation at the end (the GPU-bound rate).

Cases: the text pass with `cache_workers` 0 (prepared in the main thread, the old behaviour) and WORKERS
(default 4); the VAE pass with 0 / WORKERS workers at `vae_batch_size` 1 and at VAE_BATCH (default 4).
Each pass starts from an empty cache folder; its time is the whole pass (fingerprints of the source
files, decoding, preprocessing, the VL processor, encoding, writing the files). Also printed: the
prompt's token count, whether the threaded files equal the main-thread ones, and the largest difference
of batched latents from batch-1 latents (bf16).

TINY=1: the test model's sizes on the CPU, a plumbing check (its numbers mean nothing).
Env: PAIRS (default 40), WORKERS (4), VAE_BATCH (4). Writes gpu_cache_speed.json to $OUT; table last.
"""

import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.random_models import qwen25_vl_7b_config, random_text_encoder, random_vae, tiny_text_encoder_config  # noqa: E402
from trainer.config.parsing import parse_train_config  # noqa: E402
from trainer.data.caches import build_text_cache, build_vae_cache  # noqa: E402
from trainer.data.dataset_config import parse_dataset_config  # noqa: E402
from trainer.data.pairing import build_manifest  # noqa: E402

TINY = bool(os.environ.get("TINY"))
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not TINY else "cpu")
CUDA = DEVICE.type == "cuda"
DTYPE = torch.bfloat16 if CUDA else torch.float32
PAIRS = int(os.environ.get("PAIRS", 2 if TINY else 40))
WORKERS = int(os.environ.get("WORKERS", 4))
VAE_BATCH = int(os.environ.get("VAE_BATCH", 4))
SIDE = 64 if TINY else 1024
GiB = 2**30
# an instruction of the length users write (about 45 words)
CAPTION = ("Replace the cloudy grey sky behind the old stone lighthouse with a warm orange sunset, keep the waves, "
           "the dark rocks and the small red boat on the left exactly as they are, and add soft golden reflections "
           "of the evening light on the wet sand in the foreground {i}")


def sync():
    if CUDA:
        torch.cuda.synchronize()


def photo_like(args) -> None:
    """A PNG that decodes like a photograph (smooth structure plus grain), not like flat colour or pure noise."""
    path, seed, side = args
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 255, (side // 16, side // 16, 3), dtype=np.uint8)).resize((side, side), Image.BICUBIC)
    pixels = np.asarray(coarse).astype(np.int16) + rng.integers(-12, 12, (side, side, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)


def make_pairs(root: Path) -> None:
    for folder in ("edited", "reference"):
        (root / folder).mkdir(parents=True)
    jobs = [(root / folder / f"{i:04d}.png", 2 * i + k, SIDE) for i in range(PAIRS) for k, folder in enumerate(("edited", "reference"))]
    with ProcessPoolExecutor(max(1, min(16, os.cpu_count() or 1))) as pool:
        list(pool.map(photo_like, jobs))
    for i in range(PAIRS):
        (root / "edited" / f"{i:04d}.txt").write_text(CAPTION.format(i=i))


def project(root: Path, **settings):
    config = parse_train_config({
        "model_flavour": "edit-v1", "pretrained_model_name_or_path": "bench/random-qwen-image-edit",
        "mixed_precision": "bf16" if CUDA else "no", **settings,
    })
    entries = [
        {"id": "edits", "instance_data_dir": str(root / "edited"), "resolution": SIDE, "conditioning_data": ["reference"],
         "cache_dir_vae": str(root / "cache" / "vae")},
        {"id": "reference", "dataset_type": "conditioning", "instance_data_dir": str(root / "reference")},
    ]
    data = parse_dataset_config(entries, "bench", config.flavour, root)
    return config, data


def pipelines(tokenizer, processor):
    """Two pipelines as the cache stage loads them: the VL encoder alone, then the VAE alone."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline

    from trainer.demo.tiny_model import SCHEDULER_CONFIG

    def text():
        config = tiny_text_encoder_config(tokenizer) if TINY else qwen25_vl_7b_config(tokenizer)
        encoder = random_text_encoder(config, DEVICE, DTYPE)
        return QwenImageEditPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=None, text_encoder=encoder,
                                     tokenizer=tokenizer, processor=processor, transformer=None)

    def vae():
        return QwenImageEditPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=random_vae(DEVICE, DTYPE, tiny=TINY),
                                     text_encoder=None, tokenizer=tokenizer, processor=processor, transformer=None)

    return text, vae


def timed(function) -> float:
    sync()
    start = time.perf_counter()
    function()
    sync()
    return time.perf_counter() - start


def bare_text(pipe, manifest, data, config) -> dict:
    """The text encoder on exactly what the pipeline's encode_prompt gives it, back to back."""
    from trainer.data.cache_encoders import TextEmbeddingsEncoder

    encoder = TextEmbeddingsEncoder(data, config)
    inputs = []
    for row in manifest.to_dict("records"):
        (_, _, prepared), = encoder.prepare(pipe, row)
        inputs.append({k: v.to(DEVICE) for k, v in prepared.features.items()})
    tokens = int(inputs[0]["input_ids"].shape[1])
    image_tokens = int((inputs[0]["input_ids"] == pipe.text_encoder.config.image_token_id).sum())

    def forward(features):
        pipe.text_encoder(input_ids=features["input_ids"], attention_mask=features["attention_mask"],
                          pixel_values=features.get("pixel_values"), image_grid_thw=features.get("image_grid_thw"),
                          output_hidden_states=True)

    with torch.no_grad():
        for features in inputs[:2]:  # warm-up
            forward(features)
        seconds = timed(lambda: [forward(f) for f in inputs])
    return {"bare_text_s": seconds, "tokens": tokens, "image_tokens": image_tokens, "text_tokens": tokens - image_tokens}


def bare_vae(pipe, manifest, data, config) -> dict:
    from trainer.data.cache_encoders import VaeLatentsEncoder

    encoder = VaeLatentsEncoder(data, config)
    images = [image.to(DEVICE) for row in manifest.to_dict("records") for image in encoder.prepare(pipe, row).values()]
    with torch.no_grad():
        for image in images[:2]:
            pipe._encode_vae_image(image, generator=None)
        one = timed(lambda: [pipe._encode_vae_image(image, generator=None) for image in images])
        by_shape = {}
        for image in images:
            by_shape.setdefault(tuple(image.shape), []).append(image)
        batches = [torch.cat(same[i : i + VAE_BATCH]) for same in by_shape.values() for i in range(0, len(same), VAE_BATCH)]
        pipe._encode_vae_image(batches[0], generator=None)
        batched = timed(lambda: [pipe._encode_vae_image(batch, generator=None) for batch in batches])
    return {"bare_vae_batch1_s": one, f"bare_vae_batch{VAE_BATCH}_s": batched, "vae_images": len(images)}


def cache_pass(build, manifest, data, config, pipe, root: Path, folder: str) -> dict:
    shutil.rmtree(root / "cache", ignore_errors=True)
    start = time.perf_counter()
    stats = build(manifest, data, config, DEVICE, pipeline=pipe)
    seconds = time.perf_counter() - start
    assert stats.encoded == len(manifest), stats
    kept = root / "kept" / folder
    shutil.copytree(root / "cache", kept)
    return {"s": seconds, "peak_allocated_GiB": stats.peak_allocated_gib, "peak_reserved_GiB": stats.peak_reserved_gib}


def same_files(a: Path, b: Path) -> float:
    """The largest absolute difference between the tensors of two cache folders (0.0: bit-identical)."""
    from safetensors.torch import load_file

    worst = 0.0
    for path in sorted(a.rglob("*.safetensors")):
        x, y = load_file(str(path)), load_file(str(b / path.relative_to(a)))
        assert x.keys() == y.keys(), path
        for name in x:
            worst = max(worst, float((x[name].float() - y[name].float()).abs().max()))
    return worst


def main() -> None:
    from trainer.demo.tiny_model import _processor
    from trainer.demo.tiny_tokenizer import build_tiny_tokenizer

    info = {"gpu": torch.cuda.get_device_name(0) if CUDA else "cpu", "torch": torch.__version__, "pairs": PAIRS,
            "side": SIDE, "workers": WORKERS, "vae_batch": VAE_BATCH, "tiny": TINY}
    print(json.dumps(info), flush=True)
    root = Path(tempfile.mkdtemp(prefix="qe-cache-bench-"))
    start = time.perf_counter()
    make_pairs(root)
    info["make_pairs_s"] = time.perf_counter() - start
    tokenizer = build_tiny_tokenizer()
    processor = _processor(tokenizer)
    text_pipe, vae_pipe = pipelines(tokenizer, processor)
    config0, data = project(root, cache_workers=0)
    manifest, _ = build_manifest(data, config0.flavour)
    rows = {}

    # --- the VL encoder (alone on the card, as the cache stage loads it) ---
    start = time.perf_counter()
    pipe = text_pipe()
    info["build_text_encoder_s"] = time.perf_counter() - start
    info.update(bare_text(pipe, manifest, data, config0))
    for workers in (0, WORKERS):
        config, _ = project(root, cache_workers=workers)
        rows[f"text workers {workers}"] = cache_pass(build_text_cache, manifest, data, config, pipe, root, f"text-{workers}")
        print(json.dumps({f"text workers {workers}": rows[f"text workers {workers}"]}), flush=True)
    info["text_threaded_max_abs_diff"] = same_files(root / "kept" / "text-0", root / "kept" / f"text-{WORKERS}")
    del pipe
    if CUDA:
        torch.cuda.empty_cache()

    # --- the VAE ---
    pipe = vae_pipe()
    info.update(bare_vae(pipe, manifest, data, config0))
    for workers, batch in ((0, 1), (WORKERS, 1), (WORKERS, VAE_BATCH)):
        config, _ = project(root, cache_workers=workers, vae_batch_size=batch)
        name = f"vae workers {workers} batch {batch}"
        rows[name] = cache_pass(build_vae_cache, manifest, data, config, pipe, root, f"vae-{workers}-{batch}")
        print(json.dumps({name: rows[name]}), flush=True)
    info["vae_threaded_max_abs_diff"] = same_files(root / "kept" / "vae-0-1", root / "kept" / f"vae-{WORKERS}-1")
    info["vae_batched_max_abs_diff"] = same_files(root / "kept" / f"vae-{WORKERS}-1", root / "kept" / f"vae-{WORKERS}-{VAE_BATCH}")
    del pipe
    shutil.rmtree(root, ignore_errors=True)

    bare_vae_best = min(info["bare_vae_batch1_s"], info[f"bare_vae_batch{VAE_BATCH}_s"])
    bare = info["bare_text_s"] + bare_vae_best
    text_best = rows[f"text workers {WORKERS}"]["s"]
    vae_default = rows[f"vae workers {WORKERS} batch 1"]["s"]
    vae_batched = rows[f"vae workers {WORKERS} batch {VAE_BATCH}"]["s"]
    before = rows["text workers 0"]["s"] + rows["vae workers 0 batch 1"]["s"]
    summary = {
        "bare_s_per_pair": bare / PAIRS,
        "cache_s_per_pair_before": before / PAIRS,
        "cache_s_per_pair_default": (text_best + vae_default) / PAIRS,
        "cache_s_per_pair_batched": (text_best + vae_batched) / PAIRS,
        "fraction_of_gpu_bound_default": bare / (text_best + vae_default),
        "fraction_of_gpu_bound_batched": bare / (text_best + vae_batched),
        "fraction_of_gpu_bound_before": bare / before,
        "text_fraction": info["bare_text_s"] / text_best, "vae_fraction_default": bare_vae_best / vae_default,
    }
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu_cache_speed.json").write_text(json.dumps({"info": info, "rows": rows, "summary": summary}, indent=1))
    print(json.dumps(info), flush=True)
    print(f"\n{info['gpu']}, {PAIRS} edit-v1 pairs at {SIDE}x{SIDE}, prompt {info['tokens']} tokens "
          f"({info['text_tokens']} text + {info['image_tokens']} image); threads change nothing: text diff "
          f"{info['text_threaded_max_abs_diff']:.1e}, VAE diff {info['vae_threaded_max_abs_diff']:.1e}; batch {VAE_BATCH} vs 1: "
          f"{info['vae_batched_max_abs_diff']:.1e}")
    print("pass | s | s/pair | peak alloc GiB | peak reserved GiB")
    print(f"bare text encoder | {info['bare_text_s']:.2f} | {info['bare_text_s'] / PAIRS:.3f} | - | -")
    print(f"bare VAE batch 1 / {VAE_BATCH} | {info['bare_vae_batch1_s']:.2f} / {info[f'bare_vae_batch{VAE_BATCH}_s']:.2f} | "
          f"{bare_vae_best / PAIRS:.3f} | - | -")
    for name, row in rows.items():
        print(f"cache {name} | {row['s']:.2f} | {row['s'] / PAIRS:.3f} | {row['peak_allocated_GiB'] or 0:.2f} | {row['peak_reserved_GiB'] or 0:.2f}")
    print(f"cache stage s/pair: before (main thread) {summary['cache_s_per_pair_before']:.3f}, default {summary['cache_s_per_pair_default']:.3f}, "
          f"batched {summary['cache_s_per_pair_batched']:.3f}; GPU-bound {summary['bare_s_per_pair']:.3f}")
    print(f"fraction of the GPU-bound rate: default {summary['fraction_of_gpu_bound_default']:.1%}, batched "
          f"{summary['fraction_of_gpu_bound_batched']:.1%}, before {summary['fraction_of_gpu_bound_before']:.1%} (goal >= 80%)")


if __name__ == "__main__":
    main()
