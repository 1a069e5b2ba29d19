"""Where the fp8-native step's time goes, one linear layer at a time (issue 10's follow-up).

The 20B step with `fp8-native` measured only 1.12x the compiled bf16 step although the card's fp8 matmul
rate is 1.8x its bf16 rate. This times, at the real layer shapes of a Qwen-Image block (9,492 tokens
= 1024x1024 target + 1 reference + 1300 text tokens, or the image stream's 8,192), the pieces of one
frozen linear layer's training step:

    matmul   bf16 x bf16 | fp8 with one scale per tensor | fp8 with one scale per row/column (what
             Fp8Linear runs: `torch._scaled_mm` with row-wise scales)
    quantise the activation rows (the fused kernel Fp8Linear uses outside a compiled block)
    layer    forward + input-gradient backward of Fp8Linear vs nn.Linear in bf16, eager and compiled

Env: TOKENS (default 9492), TINY=1 (small shapes, CPU: a plumbing check only). Prints a table.
"""

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.model.fp8_linear import E4M3, Fp8Linear, native_fp8, quantize_rows  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
TINY = os.environ.get("TINY") == "1"
TOKENS = int(os.environ.get("TOKENS", 64 if TINY else 9492))
# (in, out) of the block's linear layers: attention q/k/v/out, MLP up, MLP down
SHAPES = [(64, 64), (64, 256), (256, 64)] if TINY else [(3072, 3072), (3072, 12288), (12288, 3072)]


def timed(fn, reps: int = 3 if TINY else 30) -> float:
    for _ in range(2):
        fn()
    if CUDA:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    if CUDA:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e3


def matmul_times(k: int, n: int) -> dict[str, float]:
    a = torch.randn(TOKENS, k, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16)
    times = {"bf16": timed(lambda: a @ w.t())}
    if CUDA and native_fp8(DEVICE):
        aq, wq = a.to(E4M3), w.to(E4M3)
        one = torch.ones((), device=DEVICE)
        times["fp8 tensor-wise"] = timed(lambda: torch._scaled_mm(aq, wq.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
        rows, cols = torch.ones(TOKENS, 1, device=DEVICE), torch.ones(1, n, device=DEVICE)
        times["fp8 row-wise"] = timed(lambda: torch._scaled_mm(aq, wq.t(), scale_a=rows, scale_b=cols, out_dtype=torch.bfloat16))
    times["quantise rows"] = timed(lambda: quantize_rows(a))
    return times


def layer_times(k: int, n: int, compiled: bool) -> dict[str, float]:
    linear = torch.nn.Linear(k, n, device=DEVICE, dtype=torch.bfloat16).requires_grad_(False)
    layers = {"bf16 layer": linear, "fp8 layer": Fp8Linear(linear)}
    x = torch.randn(TOKENS, k, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(TOKENS, n, device=DEVICE, dtype=torch.bfloat16)
    times = {}
    for name, layer in layers.items():
        forward = torch.compile(layer) if compiled else layer
        times[name] = timed(lambda: torch.autograd.grad(forward(x), x, grad))
    return times


def kernel_ms(fn, reps: int = 10) -> float:
    """GPU kernel time per call (the profiler's own device time: no host launch gaps), ms."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA") / reps / 1e3


def _quantize_bf16_amax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate: the row maximum taken on the bf16 values (exact: a maximum only selects), then one cast."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12) / 448.0
    return (x.float() / scale).to(E4M3), scale


def quantise_kernel_times(k: int) -> dict[str, float]:
    x = torch.randn(TOKENS, k, device=DEVICE, dtype=torch.bfloat16)
    variants = {
        "quantise eager": quantize_rows,
        "quantise compiled dynamic": torch.compile(quantize_rows, dynamic=True),
        "quantise compiled static": torch.compile(quantize_rows, dynamic=False),
        "quantise bf16-amax eager": _quantize_bf16_amax,
        "quantise bf16-amax compiled": torch.compile(_quantize_bf16_amax, dynamic=False),
    }
    return {name: kernel_ms(lambda: fn(x)) for name, fn in variants.items()}


def main() -> None:
    device = torch.cuda.get_device_name(0) if CUDA else "cpu"
    print(f"{device}, torch {torch.__version__}, {TOKENS} tokens; ms per call (TFLOP/s)")
    print("in x out | case | ms | TFLOP/s")
    for k, n in SHAPES:
        flops = 2 * TOKENS * k * n
        for case, ms in matmul_times(k, n).items():
            rate = f"{flops / ms / 1e9:.0f}" if "quantise" not in case else "-"
            print(f"{k}x{n} | {case} | {ms:.3f} | {rate}")
        if CUDA:
            for case, ms in quantise_kernel_times(k).items():
                print(f"{k}x{n} | {case} (kernel time) | {ms:.3f} | -")
        for compiled in (False, True):
            for case, ms in layer_times(k, n, compiled).items():
                label = f"{case} fwd+input-grad{' compiled' if compiled else ''}"
                print(f"{k}x{n} | {label} | {ms:.3f} | {2 * flops / ms / 1e9:.0f}")


if __name__ == "__main__":
    main()
