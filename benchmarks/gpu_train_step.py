"""One LoRA training step of the full-size (20B) transformer through qwen-edit's own code path:
`trainer.lora.add_lora` (peft), `trainer.train.flow_matching_loss` (pipeline-exact conditioning,
packing and slicing), bf16 autocast as accelerate applies it, AdamW, gradient checkpointing.

Random weights, real architecture (no weights can be downloaded). Run it on the GPU machine in
the same command as the baseline (`../shared/bench/diffusers_lora_baseline.py`) and compare:

    CASES=bf16_ckpt SHAPES=1x1300 python .bench/diffusers_lora_baseline.py
    SHAPES=1x1300 python benchmarks/gpu_train_step.py

SHAPES: references x text tokens; the target and each reference are 1024x1024 (4096 tokens).
Prints one JSON line per shape and a table.
"""

import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.caches import CachedSample  # noqa: E402
from trainer.lora import add_lora  # noqa: E402
from trainer.train import flow_matching_loss  # noqa: E402

RANK = int(os.environ.get("LORA_RANK", 32))
STEPS = int(os.environ.get("STEPS", 6))
SHAPES = [tuple(map(int, s.split("x"))) for s in os.environ.get("SHAPES", "1x1300").split(",")]
CHECKPOINTING = os.environ.get("CHECKPOINTING", "1") == "1"


def build_full_size_transformer():
    from diffusers import QwenImageTransformer2DModel
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

    with torch.device("meta"):
        model = QwenImageTransformer2DModel()
    model = model.to_empty(device="cuda").to(torch.bfloat16)
    # RoPE tables are plain attributes computed at construction: rebuild them off the meta device
    model.pos_embed = QwenEmbedRope(theta=10000, axes_dim=list(model.config.axes_dims_rope), scale_rope=True)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def sample(n_references: int, text_tokens: int) -> CachedSample:
    latent = lambda: torch.randn(16, 128, 128, device="cuda")  # noqa: E731 - 1024x1024 image
    return CachedSample(
        name="bench",
        prompt_embeds=torch.randn(text_tokens, 3584, device="cuda", dtype=torch.bfloat16),
        prompt_embeds_mask=torch.ones(text_tokens, dtype=torch.long, device="cuda"),
        target=latent(),
        references=[latent() for _ in range(n_references)],
    )


def main() -> None:
    model = build_full_size_transformer()
    params = add_lora(model, RANK, float(RANK), seed=0)
    if CHECKPOINTING:
        model.enable_gradient_checkpointing()
    model.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    rows = []
    for n_ref, text in SHAPES:
        batch = sample(n_ref, text)
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(STEPS):
            sigma = torch.rand(1, device="cuda")
            noise = torch.randn(1, 16, 128, 128, device="cuda")
            torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = flow_matching_loss(model, batch, sigma, noise, torch.bfloat16)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        steady = sorted(times[2:])
        row = {
            "case": f"qwen-edit bf16{' ckpt' if CHECKPOINTING else ''}",
            "shape": f"ref{n_ref}_T{text}",
            "s_per_step_median": steady[len(steady) // 2],
            "peak_GiB": torch.cuda.max_memory_allocated() / 2**30,
            "loss": float(loss),
            "gpu": torch.cuda.get_device_name(0),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\ncase | seq | s/step | peak GiB")
    for row in rows:
        print(f"{row['case']} | {row['shape']} | {row['s_per_step_median']:.2f} | {row['peak_GiB']:.1f}")


if __name__ == "__main__":
    main()
