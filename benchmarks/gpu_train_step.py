"""One LoRA training step of the full-size (20B) transformer through qwen-edit's own code path:
`trainer.model.lora.add_lora` (peft), `trainer.training.recipe.flow_matching_loss` (pipeline-exact conditioning,
packing and slicing), bf16 autocast as accelerate applies it, AdamW, gradient checkpointing.

Random weights, real architecture (no weights can be downloaded). Run it on the GPU machine in
the same command as the baseline (`../shared/bench/diffusers_lora_baseline.py`) and compare:

    CASES=bf16_ckpt SHAPES=1x1300 python .bench/diffusers_lora_baseline.py
    SHAPES=1x1300 python benchmarks/gpu_train_step.py
    CASES=int8_ckpt SHAPES=1x1300 python .bench/diffusers_lora_baseline.py
    PRECISION=int8-quanto VARIANTS=plain,act,act+opt SHAPES=1x1300 python benchmarks/gpu_train_step.py

PRECISION: `bf16` (default) or a quanto `base_model_precision` (`int8-quanto`, `int4-quanto`,
`fp8-quanto`). A quantised base is built as training loads it: the bf16 model sits in CPU memory
and `trainer.model.quantization.quantize_transformer` (quantize_via accelerator) quantises it onto the
GPU; the peak GPU memory of that phase is reported apart from the step's.
VARIANTS (run one after another on the same model, each from the same LoRA init and inputs):
`plain` (the step without memory savers), or `+`-joined savers: `act`
(`trainer.model.memory.OffloadActivations` around the forward, config `offload_activations`), `opt`
(`trainer.model.memory.offload_optimizer_state`, config `offload_optimizer_state`), e.g.
`VARIANTS=plain,act,act+opt`.
The self-test first trains a 3-block model with `plain` and with all savers and checks that the
two agree bit for bit (math attention, which is deterministic).
SHAPES: references x text tokens; the target and each reference are 1024x1024 (4096 tokens).
EXPANDABLE=1 calls `trainer.model.memory.use_expandable_segments()` first (or set
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True yourself).
Prints one JSON line per variant and shape, then a table; writes `gpu_train_step_<PRECISION>.json` to $OUT.
"""

import gc
import json
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.data.caches import CachedSample  # noqa: E402
from trainer.model.lora import add_lora  # noqa: E402
from trainer.model.memory import OffloadActivations, offload_optimizer_state  # noqa: E402
from trainer.training.recipe import flow_matching_loss  # noqa: E402

RANK = int(os.environ.get("LORA_RANK", 32))
STEPS = int(os.environ.get("STEPS", 6))
SHAPES = [tuple(map(int, s.split("x"))) for s in os.environ.get("SHAPES", "1x1300").split(",")]
CHECKPOINTING = os.environ.get("CHECKPOINTING", "1") == "1"
PRECISION = os.environ.get("PRECISION", "bf16")
VARIANTS = os.environ.get("VARIANTS", "plain").split(",")
SELFTEST = os.environ.get("SELFTEST", "1") == "1"
# TINY=1: a 2-block model with 32x32 latents, to check the script on a CPU; never for figures
TINY = dict(num_layers=2, attention_head_dim=32, num_attention_heads=2, axes_dims_rope=(8, 12, 12)) if os.environ.get("TINY") else {}
LATENT = 16 if TINY else 128  # latent side of a 1024x1024 image
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA = DEVICE.type == "cuda"
GiB = 2**30


def sync():
    if CUDA:
        torch.cuda.synchronize()


def gib(stat: str) -> float:
    return getattr(torch.cuda, stat)() / GiB if CUDA else 0.0


def reset_peak():
    if CUDA:
        torch.cuda.reset_peak_memory_stats()


def empty_cache():
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def build_full_size_transformer(**config):
    from diffusers import QwenImageTransformer2DModel
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

    with torch.device("meta"):
        model = QwenImageTransformer2DModel(**config)
    model = model.to_empty(device=DEVICE).to(torch.bfloat16)
    # RoPE tables are plain attributes computed at construction: rebuild them off the meta device
    model.pos_embed = QwenEmbedRope(theta=10000, axes_dim=list(model.config.axes_dims_rope), scale_rope=True)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def quantized_like_training(model):
    """The bf16 model in CPU memory (as `load_transformer` returns it), quantised as `setup` does."""
    from trainer.config.parsing import parse_train_config
    from trainer.model.quantization import quantize_transformer

    config = parse_train_config({"base_model_precision": PRECISION, "quantize_via": "accelerator", "gradient_checkpointing": CHECKPOINTING})
    model.to("cpu")
    empty_cache(); reset_peak()
    start = time.perf_counter()
    quantize_transformer(model, config, DEVICE)
    model.to(DEVICE)
    sync()
    info = {"quantize_s": time.perf_counter() - start, "quantize_peak_GiB": gib("max_memory_allocated")}
    return model, info


def memory_breakdown(model) -> dict:
    quantized = plain = 0
    for p in model.parameters():
        if type(p.data) is torch.Tensor:
            plain += p.numel() * p.element_size()
        else:  # a quanto QTensor: its int8/int4 data and scales
            quantized += sum(t.numel() * t.element_size() for t in _inner_tensors(p.data))
    return {"params_B": sum(p.numel() for p in model.parameters()) / 1e9,
            "quantized_weights_GiB": quantized / GiB, "full_precision_params_GiB": plain / GiB}


def _inner_tensors(t):
    names, _ = t.__tensor_flatten__()
    for name in names:
        inner = getattr(t, name)
        yield from (_inner_tensors(inner) if type(inner) is not torch.Tensor else [inner])


def sample(n_references: int, text_tokens: int) -> CachedSample:
    generator = torch.Generator(device=DEVICE).manual_seed(1)
    latent = lambda: torch.randn(16, LATENT, LATENT, device=DEVICE, generator=generator)  # noqa: E731 - 1024x1024 image
    return CachedSample(
        name="bench",
        prompt_embeds=torch.randn(text_tokens, 3584, device=DEVICE, generator=generator).to(torch.bfloat16),
        prompt_embeds_mask=torch.ones(text_tokens, dtype=torch.long, device=DEVICE),
        target=latent(),
        references=[latent() for _ in range(n_references)],
    )


def train_steps(model, params, variant, batch, steps, record=None):
    """`steps` optimizer steps; returns (seconds per step, losses, per-phase peaks)."""
    savers = set(variant.split("+")) - {"plain"}
    assert savers <= {"act", "opt"}, variant
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)  # as trainer.training.recipe.make_optimizer
    if "opt" in savers:
        offload_optimizer_state(optimizer)
    offload = OffloadActivations() if "act" in savers else None
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    times, losses = [], []
    peaks = {"fwd": 0.0, "bwd": 0.0, "opt": 0.0, "reserved": 0.0}
    pools = [f"{kind}_bytes.{pool}_pool.peak" for kind in ("allocated", "reserved") for pool in ("large", "small")]

    def phase(name):
        peaks[name] = max(peaks[name], gib("max_memory_allocated"))
        peaks["reserved"] = max(peaks["reserved"], gib("max_memory_reserved"))
        if CUDA:
            stats = torch.cuda.memory_stats()
            for key in pools:
                peaks[key] = max(peaks.get(key, 0.0), stats.get(key, 0) / GiB)
        reset_peak()

    for _ in range(steps):
        sigma = torch.rand(1, device=DEVICE, generator=generator)
        noise = torch.randn(1, 16, batch.target.shape[-2], batch.target.shape[-1], device=DEVICE, generator=generator)
        sync()
        reset_peak()
        start = time.perf_counter()
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16), (offload if offload is not None else nullcontext()):
            loss = flow_matching_loss(model, batch, sigma, noise, torch.bfloat16)
        phase("fwd")
        loss.backward()
        phase("bwd")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        phase("opt")
        sync()
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    if record is not None:
        record["between_steps_GiB"] = gib("memory_allocated")
        record["offloaded_activations_GiB_per_step"] = offload.offloaded_bytes / steps / GiB if offload else 0.0
    del optimizer
    return times, losses, peaks


def selftest() -> dict:
    """The offloads are data movement only: a small model's LoRA training must match bit for bit."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = build_full_size_transformer(num_layers=3, attention_head_dim=64, num_attention_heads=4, axes_dims_rope=(16, 24, 24))
    if PRECISION != "bf16":
        from trainer.config.parsing import parse_train_config
        from trainer.model.quantization import quantize_transformer

        quantize_transformer(model, parse_train_config({"base_model_precision": PRECISION}), DEVICE)
    params = add_lora(model, 8, 8.0, seed=0)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.02)  # a non-zero lora_B, so every LoRA weight gets a gradient
    init = [p.detach().clone() for p in params]
    model.enable_gradient_checkpointing()
    model.train()
    batch = CachedSample("t", torch.randn(40, 3584, device=DEVICE).to(torch.bfloat16), torch.ones(40, dtype=torch.long, device=DEVICE),
                         torch.randn(16, 64, 64, device=DEVICE), [torch.randn(16, 64, 64, device=DEVICE)])
    results = {}
    with sdpa_kernel(SDPBackend.MATH):  # deterministic attention backward
        for variant in ("plain", "act+opt"):
            with torch.no_grad():
                for p, v in zip(params, init):
                    p.copy_(v)
            _, losses, _ = train_steps(model, params, variant, batch, 3)
            results[variant] = (losses, [p.detach().clone() for p in params])
    same = results["plain"][0] == results["act+opt"][0] and all(
        torch.equal(a, b) for a, b in zip(results["plain"][1], results["act+opt"][1]))
    del model, params, init, results
    empty_cache()
    return {"selftest_bitwise_identical": same}


def main() -> None:
    if os.environ.get("EXPANDABLE") == "1":  # as training would ask for it, from inside the process
        from trainer.model.memory import use_expandable_segments

        use_expandable_segments()
    info = {"gpu": torch.cuda.get_device_name(0) if CUDA else "cpu", "torch": torch.__version__, "precision": PRECISION,
            "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")}
    if SELFTEST and any(v != "plain" for v in VARIANTS):
        info.update(selftest())
    print(json.dumps(info), flush=True)
    torch.manual_seed(0)  # the same random weights whether or not the self-test ran
    model = build_full_size_transformer(**TINY)
    if PRECISION != "bf16":
        model, quant_info = quantized_like_training(model)
        info.update(quant_info)
    params = add_lora(model, RANK, float(RANK), seed=0)
    info.update(memory_breakdown(model))
    info["weights_and_lora_GiB"] = gib("memory_allocated")
    if CUDA:
        info["expandable_segments_active"] = any(seg.get("is_expandable", False) for seg in torch.cuda.memory_snapshot())
    info["lora_params_M"] = sum(p.numel() for p in params) / 1e6
    print(json.dumps(info), flush=True)
    if CHECKPOINTING:
        model.enable_gradient_checkpointing()
    model.train()
    init = [p.detach().cpu().clone() for p in params]
    rows, first_final = [], None
    for variant in VARIANTS:
        for n_ref, text in SHAPES:
            with torch.no_grad():
                for p, v in zip(params, init):
                    p.copy_(v)
            batch = sample(n_ref, text)
            empty_cache(); reset_peak()
            row = {"case": f"qwen-edit {PRECISION}{' ckpt' if CHECKPOINTING else ''} {variant}", "shape": f"ref{n_ref}_T{text}"}
            try:
                times, losses, peaks = train_steps(model, params, variant, batch, STEPS, record=row)
            except torch.cuda.OutOfMemoryError:
                row.update(oom=True, peak_GiB=gib("max_memory_allocated"))
                rows.append(row); print(json.dumps(row), flush=True)
                continue
            steady = sorted(times[2:])
            final = torch.cat([p.detach().flatten().cpu() for p in params])
            if first_final is None:
                first_final = final
            row.update({
                "s_per_step_median": steady[len(steady) // 2], "s_min": steady[0],
                "peak_GiB": max(peaks["fwd"], peaks["bwd"], peaks["opt"]), "peak_reserved_GiB": peaks["reserved"],
                "peak_fwd_GiB": peaks["fwd"], "peak_bwd_GiB": peaks["bwd"], "peak_opt_GiB": peaks["opt"],
                **{k: v for k, v in peaks.items() if k.endswith(".peak")},
                "losses": losses, "lora_rel_diff_vs_first_variant": float((final - first_final).norm() / first_final.norm()),
                "gpu": info["gpu"],
            })
            rows.append(row)
            print(json.dumps(row), flush=True)
            del batch
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, f"gpu_train_step_{PRECISION}.json"), "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1)
    print("\ncase | seq | s/step | peak GiB | peak reserved GiB | fwd/bwd/opt peak GiB")
    for row in rows:
        if row.get("oom"):
            print(f"{row['case']} | {row['shape']} | OOM | {row['peak_GiB']:.1f} | - | -")
            continue
        print(f"{row['case']} | {row['shape']} | {row['s_per_step_median']:.2f} | {row['peak_GiB']:.2f} | "
              f"{row['peak_reserved_GiB']:.2f} | {row['peak_fwd_GiB']:.1f}/{row['peak_bwd_GiB']:.1f}/{row['peak_opt_GiB']:.1f}")


if __name__ == "__main__":
    main()
