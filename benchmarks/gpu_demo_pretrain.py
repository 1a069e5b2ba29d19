"""Choosing the demo base model's budget (issue 12) on a GPU: many pretraining budgets side by side.

    python benchmarks/gpu_demo_pretrain.py prepare DIR [--set FIELD=VALUE ...]
    python benchmarks/gpu_demo_pretrain.py train DIR NAME [--set FIELD=VALUE ...]

`prepare` fits the VAE and encodes the pretraining pairs once (`trainer.demo.pretrain`'s own
functions); each `train` (several can run at once on one card) pretrains a transformer on them
with its budget, then does what the demo does on top: a rank-8 LoRA on the demo dataset's
recolouring pairs (120 steps of one pair at 1e-3, the edit-v2 preset's settings, the trainer's
loss), and measures base and LoRA on held-out recolouring pairs with the validation's metrics.
A proxy for `make demo` (no Dagster, no caches on disk), for ranking budgets only: the shipped
model is built by `python -m trainer.demo.pretrain` (`trainer/demo/trained_model.py`) and checked by `make demo` itself.
"""

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from trainer.demo import pretrain
from trainer.demo.edits import EditPair, edit_pairs
from trainer.model.lora import TARGET_MODULES

SIZE = pretrain.SIZE


def demo_pairs(root: Path, split: str) -> list[EditPair]:
    """The demo's own train split (24 pairs) and 16 held-out pairs, for a steadier mean than its 4."""
    return pretrain.recolour_pairs(root, split, n_train=24, n_eval=16)


def save_encoded(data: pretrain.EncodedPairs, path: Path) -> None:
    tensors = {k: getattr(data, k).contiguous() for k in pretrain.EncodedPairs.TENSORS}
    save_file(tensors, str(path), metadata={"kinds": json.dumps(data.kinds)})


def load_encoded(path: Path) -> pretrain.EncodedPairs:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        kinds = json.loads(f.metadata()["kinds"])
    return pretrain.EncodedPairs(**load_file(str(path)), kinds=kinds)


def prepare(out: Path, budget: pretrain.Budget, device: torch.device) -> None:
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    vae = pretrain.fit_vae(budget, 0, device)
    pretrain.measure_latent_statistics(vae, 0, device)
    vae.save_pretrained(out / "vae")
    pipe = pretrain.assemble(vae, None, 0).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        images = pretrain.demo_images(Path(tmp))
        psnr = pretrain.reconstruction_psnr(pipe, images)
        noisy = vae_noise_psnr(pipe, images[::4])
    print(f"vae: {time.time() - start:.0f} s, demo-image PSNR {psnr:.2f} dB; with latent noise {noisy}", flush=True)
    start = time.time()
    save_encoded(pretrain.encode_pairs(pipe, edit_pairs(0, budget.pairs, SIZE, budget.edit_kinds)), out / "pairs.safetensors")
    with tempfile.TemporaryDirectory() as tmp:
        save_encoded(pretrain.encode_pairs(pipe, demo_pairs(Path(tmp), "train")), out / "demo_train.safetensors")
    print(f"encoded {budget.pairs} pairs + the demo's train split in {time.time() - start:.0f} s", flush=True)
    (out / "prepare.json").write_text(json.dumps({"budget": asdict(budget), "vae_psnr_demo": psnr, "vae_noise_psnr": noisy}))


def train_lora(transformer, data: pretrain.EncodedPairs, device, steps: int = 120, lr: float = 1e-3, rank: int = 8, start: int = 0) -> None:
    from peft import LoraConfig

    if start == 0:
        transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(TARGET_MODULES), init_lora_weights=True))
    params = [p for n, p in transformer.named_parameters() if "lora_" in n]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10))
    generator = torch.Generator().manual_seed(42)
    no_dropout = replace(pretrain.Budget(), uncond_probability=0.0)
    transformer.train()
    order = torch.randperm(data.targets.shape[0], generator=generator)
    for step in range(start, steps):
        index = order[step % len(order)].view(1)
        loss = pretrain.batch_loss(transformer, data, index, generator, no_dropout, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        warmup.step()
    transformer.eval()


def score(pipe, pairs, guidance: float) -> tuple[dict[str, float], list[Image.Image]]:
    """Mean edit metrics, plus the latent-space error (is a bad picture the transformer's or the VAE's?)."""
    samples = [pretrain.sample_edit(pipe, p, guidance, with_latents=True) for p in pairs]
    outputs = [image for image, _ in samples]
    metrics = pretrain.mean_edit_metrics(outputs, pairs)
    metrics["latent_mse"] = float(sum(F.mse_loss(z.float(), pretrain.encode_normalised(pipe, p.target).float()) for (_, z), p in zip(samples, pairs)) / len(pairs))
    return metrics, outputs


@torch.no_grad()
def vae_noise_psnr(pipe, images: list[Image.Image], levels=(0.0, 0.1, 0.3)) -> dict[str, float]:
    """PSNR of decoding the images' latents with noise added (relative to 1, the latents' normalised std):
    how forgiving the decoder is of a denoiser's small errors."""
    from trainer.evaluation.metrics import as_array, psnr

    result, generator = {}, torch.Generator().manual_seed(0)
    for level in levels:
        values = []
        for image in images:
            z = pretrain.encode_normalised(pipe, image)
            z = z + level * torch.randn(z.shape, generator=generator).to(z)
            values.append(psnr(as_array(image), as_array(pretrain.decode_normalised(pipe, z))))
        result[str(level)] = round(float(sum(values) / len(values)), 2)
    return result


def train(out: Path, name: str, budget: pretrain.Budget, device: torch.device, lora_steps: list[int], guidances: list[float],
          lora_lr: float, lora_rank: int) -> None:
    from diffusers import AutoencoderKLQwenImage

    start = time.time()
    data = load_encoded(out / "pairs.safetensors")
    keep = torch.tensor([i for i, kind in enumerate(data.kinds) if kind in budget.edit_kinds])[: budget.pairs]  # a prepared folder may hold more kinds
    data = replace(data, kinds=[data.kinds[i] for i in keep], **{k: getattr(data, k)[keep] for k in pretrain.EncodedPairs.TENSORS})
    transformer = pretrain.pretrain_transformer(data, budget, 0, device)
    pretrain_s = time.time() - start
    vae = AutoencoderKLQwenImage.from_pretrained(out / "vae")
    pipe = pretrain.assemble(vae, transformer, 0).to(device)
    base_kinds = {g: pretrain.evaluate_edits(pipe, 0, per_kind=6, grid_path=out / f"{name}_base_g{g:g}.png", kinds=budget.edit_kinds, guidance=g)
                  for g in guidances}
    with tempfile.TemporaryDirectory() as tmp:
        held_out = demo_pairs(Path(tmp), "eval")
    base = {g: score(pipe, held_out, g) for g in guidances}
    demo_train, lora, done = load_encoded(out / "demo_train.safetensors"), {}, 0
    for steps in lora_steps:
        train_lora(pipe.transformer, demo_train, device, steps=steps, start=done, lr=lora_lr, rank=lora_rank)
        lora[steps] = {g: score(pipe, held_out, g) for g in guidances}
        done = steps
    for g in guidances:
        rows = [(pair.references[0], pair.references[1], b, l, pair.target) for pair, b, l in zip(held_out, base[g][1], lora[done][g][1])]
        pretrain.save_grid(rows, out / f"{name}_recolour_g{g:g}.png", scale=2)
    result = {"name": name, "budget": asdict(budget), "pretrain_s": round(pretrain_s, 1), "lora_lr": lora_lr, "lora_rank": lora_rank,
              "base_kinds": {str(g): v for g, v in base_kinds.items()},
              "recolour_base": {str(g): m for g, (m, _) in base.items()},
              "recolour_lora": {str(s): {str(g): m for g, (m, _) in by_g.items()} for s, by_g in lora.items()}}
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("prepare", "train"))
    parser.add_argument("dir", type=Path)
    parser.add_argument("name", nargs="?", default="run")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--lora-steps", default="120,300,1000", help="score the LoRA after each of these step counts")
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--guidance", default="1,4", help="score at each of these true-CFG scales")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    budget, device = pretrain.budget_with(args.overrides), torch.device(args.device)
    if args.mode == "prepare":
        prepare(args.dir, budget, device)
    else:
        train(args.dir, args.name, budget, device, [int(v) for v in args.lora_steps.split(",")], [float(v) for v in args.guidance.split(",")],
              args.lora_lr, args.lora_rank)
    return 0


if __name__ == "__main__":
    sys.exit(main())
