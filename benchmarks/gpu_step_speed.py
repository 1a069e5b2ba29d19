"""Issue 10: the recipe's own training step on the full-size (20B) transformer, with each speed lever.

What is timed is `LoraTrainingRecipe.train` itself (its `optimizer_step`: data loading from cache files,
conditioning, forward, backward, clipping, AdamW), set up by the recipe's own `setup()` steps around a
random-weight, real-architecture transformer (only the loader is replaced: no weights can be
downloaded). Per-step time is the interval between the recipe's `on_step` calls in steady state.

Levers (config keys, applied by `trainer.model.speed.apply_speed_settings`, the function the recipe
calls): `attention_backend`, `gradient_checkpointing_keep_attention`, `compile_transformer_blocks`,
`base_model_precision: fp8-native`. VARIANTS (in this order, each on the same model, levers added):

    before       the default config: gradient checkpointing, PyTorch's attention choice
    cudnn        + attention_backend cudnn
    keep         + gradient_checkpointing_keep_attention
    after        + compile_transformer_blocks                 (the bf16 recipe this issue ships)
    fp8-eager    fp8-native base, cudnn + keep, no compile     (a second model, converted from the same weights)
    fp8          + compile_transformer_blocks

The self-test first trains one micro-step of a 3-block full-width model under every variant and
prints the loss and the LoRA gradients' relative difference from `before` (equal-results check).
A 50-step loss run on a small sample compares fp8 with bf16 (`after`) from the same LoRA init.

Env: SHAPES (refs x text tokens, first one also gets the lever-by-lever rows; default 1x1300,3x300),
STEPS (per shape, default 4; the first two are warm-up), VARIANTS, LOSS_STEPS (50), SELFTEST (1), TINY=1 (a 2-block model with
small latents, to check the script on a CPU; never for figures). Writes gpu_step_speed.json to $OUT.
"""

import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from safetensors.torch import save_file  # noqa: E402

import trainer.training.recipe as recipe_module  # noqa: E402
from trainer.config.parsing import parse_train_config  # noqa: E402
from trainer.data.caches import CachedSample, SamplePaths, load_sample  # noqa: E402
from trainer.model.compile import compile_counts  # noqa: E402
from trainer.model.speed import apply_speed_settings  # noqa: E402
from trainer.tracking.reporting import SilentReporter  # noqa: E402
from trainer.training.data_order import conditioning_for_step, micro_step_generator  # noqa: E402
from trainer.training.loss import flow_matching_loss  # noqa: E402

SHAPES = [tuple(map(int, s.split("x"))) for s in os.environ.get("SHAPES", "1x1300,3x300").split(",")]
STEPS = int(os.environ.get("STEPS", 4))
VARIANTS = os.environ.get("VARIANTS", "before,cudnn,keep,after,fp8-eager,fp8").split(",")
LOSS_STEPS = int(os.environ.get("LOSS_STEPS", 50))
SELFTEST = os.environ.get("SELFTEST", "1") == "1"
RANK = 32
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
TINY = os.environ.get("TINY") == "1"
MODEL = dict(num_layers=2, attention_head_dim=32, num_attention_heads=2, axes_dims_rope=(8, 12, 12)) if TINY else {}
if os.environ.get("BLOCKS"):  # full width, fewer blocks: for PROFILE runs (per-block kernels are the same)
    MODEL = {**MODEL, "num_layers": int(os.environ["BLOCKS"])}
PROFILE = [v for v in os.environ.get("PROFILE", "").split(",") if v]
SELFTEST_MODEL = MODEL if TINY else dict(num_layers=3)  # full width, 3 blocks
LATENT = 16 if TINY else 128  # latent side of a 1024x1024 image
GiB = 2**30

# each variant: config keys on top of the defaults (gradient checkpointing on), levers added in this order
LEVERS = {
    "before": {},
    "cudnn": {"attention_backend": "cudnn"},
    "keep": {"attention_backend": "cudnn", "gradient_checkpointing_keep_attention": True},
    "after": {"attention_backend": "cudnn", "gradient_checkpointing_keep_attention": True, "compile_transformer_blocks": True},
    "fp8-eager": {"attention_backend": "cudnn", "gradient_checkpointing_keep_attention": True, "base_model_precision": "fp8-native"},
    "fp8": {"attention_backend": "cudnn", "gradient_checkpointing_keep_attention": True, "compile_transformer_blocks": True,
            "base_model_precision": "fp8-native"},
}
LOSS_VARIANTS = ("after", "fp8")  # the 50-step loss comparison, from the same LoRA init


def levers(variant: str) -> dict:
    keys = dict(LEVERS[variant])
    if not CUDA and keys.get("attention_backend") == "cudnn":
        keys["attention_backend"] = "native"  # the CPU smoke run: cuDNN attention needs CUDA
    return keys


def sync():
    if CUDA:
        torch.cuda.synchronize()


def gib(stat: str) -> float:
    return getattr(torch.cuda, stat)() / GiB if CUDA else 0.0


def free():
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def base_weights(**config) -> dict[str, torch.Tensor]:
    """The real architecture's frozen weights, random (bf16 on the GPU), as a state dict."""
    from diffusers import QwenImageTransformer2DModel

    with torch.device("meta"):
        model = QwenImageTransformer2DModel(**config)
    model = model.to(torch.bfloat16 if CUDA else torch.float32).to_empty(device=DEVICE)  # bf16 from the start: 41 GB
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return dict(model.state_dict())


def model_from(state: dict[str, torch.Tensor], **config):
    """A transformer module over `state`'s tensors (shared, not copied); RoPE tables rebuilt off meta."""
    from diffusers import QwenImageTransformer2DModel
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

    with torch.device("meta"):
        model = QwenImageTransformer2DModel(**config)
    model.load_state_dict(state, assign=True)
    model.pos_embed = QwenEmbedRope(theta=10000, axes_dim=list(model.config.axes_dims_rope), scale_rope=True)
    return model


def write_sample(folder: Path, name: str, n_references: int, text_tokens: int, latent: int = LATENT) -> tuple[str, SamplePaths]:
    """A cached sample in the cache files' format (what `load_sample` reads every micro-step)."""
    g = torch.Generator().manual_seed(n_references * 10_000 + text_tokens)
    joint = 3584
    paths = SamplePaths(folder / f"{name}.text.safetensors", folder / f"{name}.vae.safetensors")
    save_file({"prompt_embeds": torch.randn(text_tokens, joint, generator=g).to(torch.bfloat16),
               "prompt_embeds_mask": torch.ones(text_tokens, dtype=torch.long)}, str(paths.text))
    vae = {"target": torch.randn(16, latent, latent, generator=g)}
    vae.update({f"reference_{i}": torch.randn(16, latent, latent, generator=g) for i in range(n_references)})
    save_file(vae, str(paths.vae))
    return name, paths


def make_recipe(variant: str, model, samples, workdir: Path):
    """The recipe's own setup (accelerator, quantisation, LoRA, speed settings, optimizer, prepare, EMA),
    with the loader replaced by `model` and the cache check by nothing (the samples are synthetic)."""
    config = parse_train_config({"model_flavour": "edit-v2", "lora_rank": RANK, "gradient_checkpointing": True,
                                 "max_train_steps": 100_000, "checkpointing_steps": 10**9, "report_to": "none", "output_dir": str(workdir / "out"),
                                 **levers(variant)})
    recipe = recipe_module.LoraTrainingRecipe.__new__(recipe_module.LoraTrainingRecipe)
    recipe.config, recipe.cache_command, recipe.dataset_config, recipe.project_root = config, "", None, workdir
    recipe.tags, recipe.manifest, recipe.data_version, recipe.samples = {}, None, "bench", list(samples)
    recipe.output_dir = workdir / "out"
    recipe.checkpoint_root = recipe.output_dir / "checkpoints"
    recipe.notices, recipe.peak_memory_gib, recipe.step_ends = [], {}, []  # the rest of what __init__ sets
    recipe._check_caches = lambda: None
    recipe_module.load_transformer = lambda config, dtype: model
    recipe.setup()
    return recipe


def switch(recipe, variant: str) -> None:
    """Add a variant's levers to a set-up recipe (the same function its setup calls)."""
    recipe.config = recipe.config.model_copy(update=levers(variant))
    apply_speed_settings(recipe.accelerator.unwrap_model(recipe.transformer), recipe.config, recipe.accelerator.device)


def run_steps(recipe, samples, steps: int) -> dict:
    """`steps` optimizer steps of `recipe.train`, continuing the step count. Per-step time: the intervals
    between the ends of consecutive `optimizer_step`s on the device's own timeline (CUDA events), which
    include any idle gap the host leaves between steps."""
    recipe.samples = list(samples)
    recipe.start_step = getattr(recipe, "_next_step", 0)
    recipe.max_steps = recipe.start_step + steps
    recipe._next_step = recipe.max_steps
    losses, marks = [], []
    queue_step = type(recipe).optimizer_step

    def timed_step(step):
        queued = queue_step(recipe, step)
        marks.append(_mark())
        return queued

    recipe.optimizer_step = timed_step
    sync()
    before = compile_counts()
    marks.append(_mark())
    wall = time.perf_counter()
    recipe.train(SilentReporter(), lambda step, loss, lr: losses.append(loss))
    sync()
    wall = time.perf_counter() - wall
    del recipe.optimizer_step
    intervals = [_seconds(a, b) for a, b in zip(marks[:-1], marks[1:])]
    steady = intervals[2:] or intervals[1:] or intervals
    after = compile_counts()
    return {"s_per_step": statistics.median(steady), "intervals": intervals, "wall_s": wall, "losses": losses,
            "first_step_s": intervals[0], "new_graphs": after["graphs"] - before["graphs"],
            "graph_breaks": after["graph_breaks"]}


KERNEL_KINDS = (("fp8 matmul", ("f8", "fp8", "e4m3", "scaled_mm")), ("attention", ("flash", "fmha", "cudnn", "sdpa", "attention")),
                ("bf16 matmul", ("gemm", "sm90_xmma", "cutlass", "nvjet")), ("copies", ("memcpy", "memset", "copy")))


def kernel_kind(name: str) -> str:
    lower = name.lower()
    return next((kind for kind, marks in KERNEL_KINDS if any(m in lower for m in marks)), "other (fused elementwise, reductions)")


def profile_steps(recipe, sample, variant: str, out: Path, steps: int = 2) -> None:
    """The GPU kernels of `steps` steps of `variant` (torch.profiler): the top kernels and the time by kind."""
    from torch.profiler import ProfilerActivity, profile

    run_steps(recipe, [sample], 1)  # warm
    with profile(activities=[ProfilerActivity.CUDA if CUDA else ProfilerActivity.CPU]) as prof:
        run_steps(recipe, [sample], steps)
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or not CUDA]
    own = "self_device_time_total" if CUDA else "self_cpu_time_total"  # CPU: a plumbing check only
    total = sum(getattr(e, own) for e in kernels) or 1
    by_kind: dict[str, float] = {}
    for e in kernels:
        by_kind[kernel_kind(e.key)] = by_kind.get(kernel_kind(e.key), 0) + getattr(e, own)
    lines = [f"profile {variant}: {total / steps / 1e3:.1f} ms of kernels per step"]
    lines += [f"  {kind}: {t / steps / 1e3:.1f} ms ({t / total:.0%})" for kind, t in sorted(by_kind.items(), key=lambda kv: -kv[1])]
    for e in sorted(kernels, key=lambda e: -getattr(e, own))[:25]:
        lines.append(f"    {getattr(e, own) / steps / 1e3:8.2f} ms  x{e.count // steps:<5} {e.key[:110]}")
    (out / f"profile_{variant}.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def _mark():
    if CUDA:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def _seconds(a, b) -> float:
    if CUDA:
        b.synchronize()
        return a.elapsed_time(b) / 1000
    return b - a


def transformer_only(recipe, sample_files, steps: int = 3) -> float:
    """The same step with the sample already on the device and a sync after every step: the transformer's
    share (forward, backward, clip, AdamW) without data loading, logging or the loop's overlap."""
    name, paths = sample_files
    sample = load_sample(paths, name)
    sample = CachedSample(sample.name, sample.prompt_embeds.to(DEVICE), sample.prompt_embeds_mask, sample.target.to(DEVICE),
                          [r.to(DEVICE) for r in sample.references])
    acc, times = recipe.accelerator, []
    for i in range(steps):
        g = torch.Generator().manual_seed(i)
        sigma = torch.rand(1, generator=g).to(DEVICE)
        noise = torch.randn((1, *sample.target.shape), generator=g).to(DEVICE)
        sync()
        start = time.perf_counter()
        loss = flow_matching_loss(recipe.transformer, sample, sigma, noise, recipe.weight_dtype)
        acc.backward(loss)
        acc.clip_grad_norm_(recipe.params, recipe.config.max_grad_norm)
        recipe.optimizer.step()
        recipe.optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def host_costs(sample_files) -> dict:
    """Host-side work of one micro-step outside the transformer: reading the cache files + conditioning."""
    name, paths = sample_files
    times = []
    for i in range(5):
        start = time.perf_counter()
        sample = load_sample(paths, name)
        conditioning_for_step(sample, 0.0, micro_step_generator(0, i, 0))
        times.append(time.perf_counter() - start)
    return {"load_sample_ms": 1000 * statistics.median(times)}


def ema_cost(recipe) -> dict:
    """What use_ema adds per optimizer step (EMAModel.step over the LoRA), CPU and accelerator copies."""
    from diffusers.training_utils import EMAModel

    out = {}
    for where in ("cpu", "accelerator"):
        device = torch.device("cpu") if where == "cpu" else DEVICE
        ema = EMAModel([p.detach().to(device).clone() for p in recipe.params], decay=0.999)
        times = []
        for _ in range(3):
            sync()
            start = time.perf_counter()
            ema.step([p.detach().to(device).requires_grad_(True) for p in recipe.params])
            sync()
            times.append(time.perf_counter() - start)
        out[f"ema_{where}_s"] = statistics.median(times[1:])
        del ema
    return out


def lora_grads(recipe, sample: CachedSample, seed: int = 0) -> tuple[float, dict[str, torch.Tensor]]:
    """One micro-step's loss and LoRA gradients (the recipe's loss function and backward), no update."""
    g = torch.Generator().manual_seed(seed)
    sigma = torch.full((1,), 0.6).to(DEVICE)
    noise = torch.randn((1, *sample.target.shape), generator=g).to(DEVICE)
    loss = flow_matching_loss(recipe.transformer, sample, sigma, noise, recipe.weight_dtype)
    recipe.accelerator.backward(loss)
    model = recipe.accelerator.unwrap_model(recipe.transformer)
    grads = {n: p.grad.detach().float().cpu().clone() for n, p in model.named_parameters() if p.grad is not None}
    recipe.optimizer.zero_grad(set_to_none=True)
    return float(loss), grads


def rel_diff(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> float:
    """‖g - g_ref‖ / ‖g_ref‖ over all LoRA gradients that get one in the reference."""
    keys = [k for k in reference if reference[k].norm() > 0]
    num = sum(float((other.get(k, torch.zeros_like(reference[k])) - reference[k]).pow(2).sum()) for k in keys)
    den = sum(float(reference[k].pow(2).sum()) for k in keys)
    return math.sqrt(num / den)


def randomise_lora_b(recipe, seed: int = 1) -> None:
    """A non-zero lora_B (its init is zero), so every LoRA weight gets a gradient in the check."""
    g = torch.Generator().manual_seed(seed)
    model = recipe.accelerator.unwrap_model(recipe.transformer)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def selftest(workdir: Path) -> dict:
    """Equal results: every variant's loss and LoRA gradients against `before`, on a 3-block full-width model."""
    torch.manual_seed(0)
    state = base_weights(**SELFTEST_MODEL)
    side = 8 if TINY else 32
    sample = load_sample(*reversed(write_sample(workdir, "selftest", 1, 64, latent=side)))
    results, reference = {}, None
    for precision_group in (("before", "cudnn", "keep", "after"), ("fp8-eager", "fp8")):
        group = [v for v in precision_group if v in VARIANTS or v == "before"]
        if not group:
            continue
        recipe = make_recipe(group[0], model_from(state, **SELFTEST_MODEL), [], workdir)
        randomise_lora_b(recipe)
        for variant in group:
            try:
                if variant != group[0]:
                    switch(recipe, variant)
                start = time.perf_counter()
                loss, grads = lora_grads(recipe, sample)
                first = time.perf_counter() - start
                loss2, grads2 = lora_grads(recipe, sample)  # compiled variants: the compiled graph's result
            except Exception as exc:  # report and go on: one broken lever must not cost the call's other figures
                results[variant] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
                print(json.dumps({"selftest": variant, **results[variant]}), flush=True)
                continue
            if reference is None:
                reference = (loss, grads)
            results[variant] = {"loss": loss2, "loss_rel_diff": abs(loss2 - reference[0]) / abs(reference[0]),
                                "grad_rel_diff": rel_diff(reference[1], grads2), "first_call_s": first,
                                "repeat_grad_rel_diff": rel_diff(grads, grads2)}
            print(json.dumps({"selftest": variant, **results[variant]}), flush=True)
        recipe.accelerator.free_memory()
        del recipe
        free()
    del state
    free()
    return results


def ideal_seconds(n_ref: int, text: int, tflops: float) -> float:
    """GPU.md's ideal column: model FLOPs of a LoRA step with recompute over the measured bf16 matmul rate."""
    tokens = 4096 * (1 + n_ref) + text
    linear, attention = 2 * 6.79e9 * tokens, 4 * tokens * tokens * 3072 * 60
    return (3 * linear + 4 * attention) / (tflops * 1e12)


def matmul_tflops(fp8: bool = False, n: int = 8192, reps: int = 20) -> float:
    a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    if fp8:
        a, b = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()
        one = torch.ones((), device=DEVICE)
        op = lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)  # noqa: E731
    else:
        op = lambda: a @ b  # noqa: E731
    for _ in range(3):
        op()
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        op()
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def measure(recipe, variant: str, shapes, files, workdir: Path, rows: list, extra: dict) -> None:
    for shape in shapes:
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
        allocated = gib("memory_allocated")
        row = {"variant": variant, "shape": f"{shape[0]}x{shape[1]}", "allocated_before_GiB": allocated}
        try:
            row.update(run_steps(recipe, [files[shape]], STEPS))
            row["peak_GiB"] = gib("max_memory_allocated")
            row["peak_reserved_GiB"] = gib("max_memory_reserved")
        except torch.cuda.OutOfMemoryError:
            row.update(oom=True, peak_GiB=gib("max_memory_allocated"))
        row.update(extra.pop(shape, {}))
        rows.append(row)
        print(json.dumps(row), flush=True)


def loss_run(recipe, files_small, init, variant: str) -> list[float]:
    """LOSS_STEPS steps on a small sample from the LoRA init and a fresh optimizer state (same σ, noise)."""
    with torch.no_grad():
        for p, v in zip(recipe.params, init):
            p.copy_(v.to(p.device))
    recipe.optimizer.optimizer.state.clear()
    saved = getattr(recipe, "_next_step", 0)
    recipe._next_step = 0
    result = run_steps(recipe, [files_small], LOSS_STEPS)
    recipe._next_step = saved + LOSS_STEPS
    print(json.dumps({"loss_run": variant, "mean": statistics.mean(result["losses"]), "s_per_step": result["s_per_step"]}), flush=True)
    return result["losses"]


def main() -> None:
    out = Path(os.environ.get("OUT") or tempfile.mkdtemp())
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="step-speed-"))
    info = {"gpu": torch.cuda.get_device_name(0) if CUDA else "cpu", "torch": torch.__version__, "variants": VARIANTS,
            "steps": STEPS, "date": time.strftime("%Y-%m-%d")}
    if CUDA:
        info["matmul_bf16_tflops"] = matmul_tflops()
        info["matmul_fp8_tflops"] = matmul_tflops(fp8=True)
    print(json.dumps(info), flush=True)
    results = {"info": info, "rows": [], "selftest": {}}
    if SELFTEST:
        results["selftest"] = selftest(workdir)
    files = {shape: write_sample(workdir, f"s{shape[0]}x{shape[1]}", *shape) for shape in SHAPES}
    files_small = write_sample(workdir, "small", 1, 300, latent=LATENT // 2)
    results["host"] = host_costs(files[SHAPES[0]])
    torch.manual_seed(0)
    state = base_weights(**MODEL)
    losses, rows = {}, results["rows"]
    bf16 = [v for v in VARIANTS if not v.startswith("fp8")]
    fp8 = [v for v in VARIANTS if v.startswith("fp8")]
    for group in (bf16, fp8):
        if not group:
            continue
        model = model_from(state, **MODEL)
        if group is fp8:
            state.clear()  # the conversion frees each bf16 weight as its fp8 copy is made
        start = time.perf_counter()
        try:
            recipe = make_recipe(group[0], model, [files[SHAPES[0]]], workdir)
        except Exception as exc:  # report and go on
            rows.append({"variant": group[0], "error": f"setup: {type(exc).__name__}: {exc}"[:2000]})
            print(json.dumps(rows[-1]), flush=True)
            del model
            free()
            continue
        sync()
        results[f"setup_{group[0]}_s"] = time.perf_counter() - start
        init = [p.detach().cpu().clone() for p in recipe.params]
        for variant in group:
            try:
                if variant != group[0]:
                    switch(recipe, variant)
                full = variant in ("before", "after", "fp8")
                measure(recipe, variant, SHAPES if full else SHAPES[:1], files, workdir, rows, {})
                if full:
                    rows[-len(SHAPES)]["transformer_only_s"] = transformer_only(recipe, files[SHAPES[0]])
                if variant in PROFILE:
                    profile_steps(recipe, files[SHAPES[0]], variant, out)
            except Exception as exc:  # report and go on
                rows.append({"variant": variant, "error": f"{type(exc).__name__}: {exc}"[:2000]})
                print(json.dumps(rows[-1]), flush=True)
        try:
            if group[-1] in LOSS_VARIANTS and LOSS_STEPS:  # last: the timings above come first
                losses[group[-1]] = loss_run(recipe, files_small, init, group[-1])
            if group is bf16:
                results["ema"] = ema_cost(recipe)
        except Exception as exc:  # report and go on
            results[f"error_{group[-1]}"] = f"{type(exc).__name__}: {exc}"[:2000]
            print(json.dumps({"loss_or_ema_error": results[f"error_{group[-1]}"]}), flush=True)
        recipe.accelerator.free_memory()
        del recipe, model
        free()
    if len(losses) == 2:
        a, b = (losses[v] for v in LOSS_VARIANTS)
        results["loss_50"] = {"bf16_mean": statistics.mean(a), "fp8_mean": statistics.mean(b),
                              "mean_rel_diff": abs(statistics.mean(b) - statistics.mean(a)) / statistics.mean(a),
                              "max_step_rel_diff": max(abs(x - y) / abs(x) for x, y in zip(a, b))}
        print(json.dumps({"loss_50": results["loss_50"]}), flush=True)
    (out / "gpu_step_speed.json").write_text(json.dumps(results, indent=1))
    print_table(results)


def print_table(results: dict) -> None:
    info = results["info"]
    tflops = info.get("matmul_bf16_tflops")
    print(f"\n{info['gpu']}, torch {info['torch']}, bf16 matmul {tflops or 0:.0f} TFLOP/s, fp8 {info.get('matmul_fp8_tflops', 0):.0f}")
    for variant, r in results["selftest"].items():
        if "error" in r:
            print(f"equal-results {variant}: ERROR {r['error'][:300]}")
            continue
        print(f"equal-results {variant}: loss {r['loss']:.5f} (rel {r['loss_rel_diff']:.1e}), LoRA grads rel diff {r['grad_rel_diff']:.1e}")
    print("variant | shape | s/step | peak GiB | ideal fraction | first step s | new graphs | transformer-only s")
    for r in results["rows"]:
        if "error" in r:
            print(f"{r['variant']} | ERROR {r['error'][:300]}")
            continue
        if r.get("oom"):
            print(f"{r['variant']} | {r['shape']} | OOM | {r['peak_GiB']:.1f}")
            continue
        n_ref, text = map(int, r["shape"].split("x"))
        ideal = ideal_seconds(n_ref, text, tflops) / r["s_per_step"] if tflops and not TINY else float("nan")
        print(f"{r['variant']} | {r['shape']} | {r['s_per_step']:.3f} | {r['peak_GiB']:.2f} | {ideal:.2f} | "
              f"{r['first_step_s']:.1f} | {r['new_graphs']} | {r.get('transformer_only_s', float('nan')):.3f}")
    print(json.dumps({k: results[k] for k in ("host", "ema", "loss_50") if k in results}))


if __name__ == "__main__":
    main()
