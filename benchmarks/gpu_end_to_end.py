"""Issue 11, item 4: `qwen-edit` itself, end to end on the GPU, on a real-width shallow pipeline.

Builds a random-weight edit-v1 pipeline with the real configurations and the layer counts cut
(benchmarks/random_models.py: the transformer with BLOCKS blocks, Qwen2.5-VL-7B with 2 text layers and 2
vision blocks, the full VAE), saves it in the diffusers layout (`save_pretrained`), writes N_TRAIN + 1
synthetic 1024x1024 pairs (one reference each, an instruction of realistic length), then runs the CLI as
a user does, each in its own process: `qwen-edit check --gpu-memory 24`, then `qwen-edit train`: data
check, caching (the text encoder and VAE loaded by `from_pretrained` and freed), training through
`accelerate launch` (int8-quanto, gradient checkpointing, both offloads, LoRA rank 32, STEPS steps),
validation (30 steps, true CFG 4.0, base and LoRA edits of the eval pair at 1024x1024).

Everything is read from the files the trainer writes: `cache_summary.json` (s/pair, peaks), the
training summary (`seconds_per_step`: the median gap between consecutive steps' ends, the first left
out; `peak_memory_gib` of setup and loop) and validation/report.json (`timing`, `peak_memory_gib`).
Then the same with the next BLOCKS count (only the transformer folder is rewritten, so the caches are
reused: that run shows an incremental cache pass); the per-block slope extrapolates the step and the
validation edit to the real 60 blocks.

TINY=1: the test model's sizes on the CPU, a plumbing check (its numbers mean nothing).
Env: BLOCKS (default "2,4"), STEPS (16), N_TRAIN (4). Writes gpu_end_to_end.json and e2e_cli.log (every CLI
call's output) to $OUT.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.gpu_cache_speed import CAPTION, photo_like  # noqa: E402
from benchmarks.random_models import qwen25_vl_7b_config, random_text_encoder, random_transformer, random_vae, tiny_text_encoder_config  # noqa: E402

TINY = bool(os.environ.get("TINY"))
CUDA = torch.cuda.is_available() and not TINY
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
BLOCKS = [int(b) for b in os.environ.get("BLOCKS", "2,4").split(",")]
STEPS = int(os.environ.get("STEPS", 4 if TINY else 16))
N_TRAIN = int(os.environ.get("N_TRAIN", 2 if TINY else 4))
SIDE = 64 if TINY else 1024
FULL_BLOCKS = 60
OUT = Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="qe-e2e-out-"))


def build_pipeline(folder: Path, blocks: int) -> float:
    """The whole pipeline folder; returns seconds (building on the device + saving)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline

    from trainer.demo.tiny_model import SCHEDULER_CONFIG, _processor
    from trainer.demo.tiny_tokenizer import build_tiny_tokenizer

    start = time.perf_counter()
    tokenizer = build_tiny_tokenizer()
    config = tiny_text_encoder_config(tokenizer) if TINY else qwen25_vl_7b_config(tokenizer, text_layers=2, vision_depth=2)
    pipe = QwenImageEditPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=random_vae(DEVICE, DTYPE, tiny=TINY),
        text_encoder=random_text_encoder(config, DEVICE, DTYPE),
        tokenizer=tokenizer,
        processor=_processor(tokenizer),
        transformer=random_transformer(DEVICE, DTYPE, num_layers=blocks, tiny=TINY),
    )
    pipe.save_pretrained(folder)
    del pipe
    release()
    return time.perf_counter() - start


def replace_transformer(folder: Path, blocks: int) -> float:
    start = time.perf_counter()
    shutil.rmtree(folder / "transformer")
    model = random_transformer(DEVICE, DTYPE, num_layers=blocks, tiny=TINY)
    model.save_pretrained(folder / "transformer")
    del model
    release()
    return time.perf_counter() - start


def release() -> None:
    import gc

    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def write_project(root: Path, model: Path) -> tuple[Path, Path]:
    from concurrent.futures import ProcessPoolExecutor

    jobs = []
    for split, count in (("train", N_TRAIN), ("eval", 1)):
        for folder in ("edited", "reference"):
            (root / "data" / split / folder).mkdir(parents=True)
        for i in range(count):
            jobs += [(root / "data" / split / folder / f"{i:04d}.png", len(jobs) + k, SIDE) for k, folder in enumerate(("edited", "reference"))]
            (root / "data" / split / "edited" / f"{i:04d}.txt").write_text(CAPTION.format(i=i))
    with ProcessPoolExecutor(max(1, min(16, os.cpu_count() or 1))) as pool:
        list(pool.map(photo_like, jobs))
    entries = []
    for split, edit_id in (("train", "edits"), ("eval", "eval")):
        entries += [
            {"id": edit_id, "instance_data_dir": str(root / "data" / split / "edited"), "resolution": SIDE,
             "conditioning_data": [f"{edit_id}-reference"], "cache_dir_vae": str(root / "cache" / "vae" / edit_id)},
            {"id": f"{edit_id}-reference", "dataset_type": "conditioning", "instance_data_dir": str(root / "data" / split / "reference")},
        ]
    config = {
        "model_flavour": "edit-v1", "pretrained_model_name_or_path": str(model), "output_dir": str(root / "out"),
        "max_train_steps": STEPS, "checkpointing_steps": 10_000, "learning_rate": 1e-4, "lora_rank": 32, "lora_alpha": 32,
        "mixed_precision": "bf16" if CUDA else "no", "gradient_checkpointing": True,
        "base_model_precision": "int8-quanto", "quantize_via": "accelerator",
        "offload_activations": True, "offload_optimizer_state": True,
        "eval_dataset_id": "eval", "validation_resolution": f"{SIDE}x{SIDE}",
        "validation_num_inference_steps": 2 if TINY else 30, "validation_guidance": 4.0, "report_to": "none",
    }
    (root / "config.json").write_text(json.dumps(config, indent=1))
    (root / "multidatabackend.json").write_text(json.dumps(entries, indent=1))
    return root / "config.json", root / "multidatabackend.json"


LOG = "e2e_cli.log"  # every CLI call's output, one after another (the device returns at most 8 files)


def cli(root: Path, *args: str) -> tuple[float, str]:
    """`qwen-edit ARGS` in its own process (as `python -m trainer.cli`); returns (seconds, its output),
    which is also appended to $OUT/e2e_cli.log."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)  # the wheels' folder stays
    if TINY:
        env["CUDA_VISIBLE_DEVICES"] = ""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "trainer.cli", *args, "--root", str(root)], cwd=root, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - start
    output = done.stdout.replace("\r", "\n")
    with open(OUT / LOG, "a") as log:
        log.write(f"\n=== qwen-edit {' '.join(args)} ({seconds:.0f} s, exit {done.returncode})\n{output}")
    if done.returncode != 0:
        raise SystemExit(f"qwen-edit {args[0]} failed (exit {done.returncode}); the end of its output:\n{output[-3000:]}")
    return seconds, output


def run_figures(run: Path) -> dict:
    caches = json.loads((run / "cache_summary.json").read_text())["caches"]
    training = json.loads((run / "training_summary.json").read_text())
    report = json.loads((run / "validation" / "report.json").read_text())
    encoded = caches["text"]["encoded"]
    return {
        "cache_encoded": encoded,
        "cache_s": caches["text"]["seconds"] + caches["vae"]["seconds"],
        "cache_load_s": caches["text"]["load_seconds"] + caches["vae"]["load_seconds"],
        "cache_s_per_pair": (caches["text"]["seconds"] + caches["vae"]["seconds"]) / encoded if encoded else None,
        "cache_s_per_pair_after_loading": ((caches["text"]["seconds"] - caches["text"]["load_seconds"]
                                            + caches["vae"]["seconds"] - caches["vae"]["load_seconds"]) / encoded) if encoded else None,
        "cache_peak_reserved_GiB": {k: v["peak_reserved_gib"] for k, v in caches.items()},
        "cache_reserved_after_GiB": {k: v["reserved_after_gib"] for k, v in caches.items()},
        "s_per_step": training["seconds_per_step"],
        "train_peak_GiB": training["peak_memory_gib"],
        "steps": training["steps"],
        "validation_s_per_edit": report["timing"]["generate_s_per_edit"],
        "validation_timing": report["timing"],
        "validation_peak_GiB": report["peak_memory_gib"],
    }


def slope(rows: dict, key) -> tuple[float | None, float | None]:
    """(per block, at 60 blocks) from the first two block counts' figures."""
    (b0, r0), (b1, r1) = list(rows.items())[:2]
    a, b = key(r0), key(r1)
    if a is None or b is None:
        return None, None
    per_block = (b - a) / (b1 - b0)
    return per_block, a + per_block * (FULL_BLOCKS - b0)


def summarise(rows: dict) -> dict:
    summary = {}
    if len(rows) >= 2:
        summary["step_per_block_s"], summary["step_60_blocks_s"] = slope(rows, lambda r: r["s_per_step"])
        summary["validation_edit_per_block_s"], summary["validation_edit_60_blocks_s"] = slope(rows, lambda r: r["validation_s_per_edit"])
        summary["train_reserved_per_block_GiB"], summary["train_reserved_60_blocks_GiB"] = slope(
            rows, lambda r: r["train_peak_GiB"].get("train", {}).get("reserved"))
    return summary


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / LOG).unlink(missing_ok=True)
    root = Path(tempfile.mkdtemp(prefix="qe-e2e-"))
    model = root / "models" / "shallow-qwen-image-edit"
    info = {"gpu": torch.cuda.get_device_name(0) if CUDA else "cpu", "blocks": BLOCKS, "steps": STEPS, "n_train": N_TRAIN, "side": SIDE}
    rows = {}
    for index, blocks in enumerate(BLOCKS):
        info[f"build_{blocks}_s"] = build_pipeline(model, blocks) if index == 0 else replace_transformer(model, blocks)
        if index == 0:
            config, data = write_project(root, model)
            info["check_s"], check = cli(root, "check", "--config", str(config), "--data", str(data), "--gpu-memory", "24")
            info["check_prediction"] = [line for line in check.splitlines() if "GiB" in line][:12]
        wall, output = cli(root, "train", "--config", str(config), "--data", str(data), "--run-name", f"e2e-{blocks}")
        info[f"train_{blocks}_peak_line"] = [line for line in output.splitlines() if line.startswith("peak GPU memory")]
        rows[blocks] = {"train_command_wall_s": wall, **run_figures(root / "out" / f"e2e-{blocks}")}
        print(json.dumps({"blocks": blocks, **rows[blocks]}), flush=True)
        # after every block count: a later one that fails or runs past its timeout keeps the earlier figures
        summary = summarise(rows)
        (OUT / "gpu_end_to_end.json").write_text(json.dumps({"info": info, "rows": rows, "summary": summary}, indent=1))
    shutil.rmtree(root, ignore_errors=True)

    print(f"\n{info['gpu']}: qwen-edit train, edit-v1, {N_TRAIN} + 1 pairs at {SIDE}x{SIDE}, int8-quanto + checkpointing + "
          f"offloads, rank 32, {STEPS} steps; validation {2 if TINY else 30} steps, true CFG 4.0, base + LoRA edits")
    print("blocks | cache s/pair (after loading) | train s/step | validation s/edit | peak reserved GiB: cache text / vae, "
          "train setup / loop, validation | wall s")
    for blocks, r in rows.items():
        cache = f"{r['cache_s_per_pair']:.3f} ({r['cache_s_per_pair_after_loading']:.3f})" if r["cache_encoded"] else "reused (0 encoded)"
        peaks = r["cache_peak_reserved_GiB"]
        memory = " / ".join(f"{v:.2f}" if v is not None else "-" for v in (peaks["text"], peaks["vae"]))
        train = " / ".join(f"{r['train_peak_GiB'].get(p, {}).get('reserved', 0):.2f}" for p in ("setup", "train"))
        print(f"{blocks} | {cache} | {r['s_per_step'] or 0:.3f} | {r['validation_s_per_edit']:.3f} | {memory}, {train}, "
              f"{r['validation_peak_GiB'].get('reserved', 0):.2f} | {r['train_command_wall_s']:.0f}")
    if summary.get("step_60_blocks_s") is not None:
        print(f"per block: step {summary['step_per_block_s']:.4f} s, validation edit {summary['validation_edit_per_block_s']:.4f} s; "
              f"at {FULL_BLOCKS} blocks: step {summary['step_60_blocks_s']:.2f} s, validation edit {summary['validation_edit_60_blocks_s']:.1f} s"
              + (f", training reserved ~{summary['train_reserved_60_blocks_GiB']:.1f} GiB" if summary.get("train_reserved_60_blocks_GiB") else ""))


if __name__ == "__main__":
    main()
