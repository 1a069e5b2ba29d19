"""Choosing the demo base model's budget (issue 12) on a GPU: many pretraining budgets side by side.

    python benchmarks/gpu_demo_pretrain.py prepare DIR [--set FIELD=VALUE ...]
    python benchmarks/gpu_demo_pretrain.py train DIR NAME [--set FIELD=VALUE ...]

`prepare` fits the VAE and encodes the pretraining pairs once (`trainer.demo.pretrain`'s own
functions); each `train` (several can run at once on one card) pretrains a transformer on them
with its budget, then does what the demo does on top: a rank-8 LoRA on the demo dataset's
recolouring pairs (120 steps of one pair at 1e-3, the edit-v2 preset's settings, the trainer's
loss), and measures base and LoRA on held-out recolouring pairs with the validation's metrics.
A proxy for `make demo` (no Dagster, no caches on disk), for ranking budgets only: the shipped
model is built by `python -m trainer.demo.pretrain` on the CPU and checked by `make demo` itself.
"""

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
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
        psnr = pretrain.reconstruction_psnr(pipe, pretrain.demo_images(Path(tmp)))
    print(f"vae: {time.time() - start:.0f} s, demo-image PSNR {psnr:.2f} dB", flush=True)
    start = time.time()
    save_encoded(pretrain.encode_pairs(pipe, edit_pairs(0, budget.pairs, SIZE, budget.edit_kinds)), out / "pairs.safetensors")
    with tempfile.TemporaryDirectory() as tmp:
        save_encoded(pretrain.encode_pairs(pipe, demo_pairs(Path(tmp), "train")), out / "demo_train.safetensors")
    print(f"encoded {budget.pairs} pairs + the demo's train split in {time.time() - start:.0f} s", flush=True)
    (out / "prepare.json").write_text(json.dumps({"budget": asdict(budget), "vae_psnr_demo": psnr}))


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


def score(pipe, pairs) -> tuple[dict[str, float], list[Image.Image]]:
    outputs = [pretrain.sample_edit(pipe, p) for p in pairs]
    return pretrain.mean_edit_metrics(outputs, pairs), outputs


def train(out: Path, name: str, budget: pretrain.Budget, device: torch.device, lora_steps: list[int]) -> None:
    from diffusers import AutoencoderKLQwenImage

    start = time.time()
    data = load_encoded(out / "pairs.safetensors")
    data = replace(data, **{k: getattr(data, k)[: budget.pairs] for k in pretrain.EncodedPairs.TENSORS})
    transformer = pretrain.pretrain_transformer(data, budget, 0, device)
    pretrain_s = time.time() - start
    vae = AutoencoderKLQwenImage.from_pretrained(out / "vae")
    pipe = pretrain.assemble(vae, transformer, 0).to(device)
    base_kinds = pretrain.evaluate_edits(pipe, 0, per_kind=6, grid_path=out / f"{name}_base.png", kinds=budget.edit_kinds)
    with tempfile.TemporaryDirectory() as tmp:
        held_out = demo_pairs(Path(tmp), "eval")
    base, base_out = score(pipe, held_out)
    demo_train, lora, done = load_encoded(out / "demo_train.safetensors"), {}, 0
    for steps in lora_steps:
        train_lora(pipe.transformer, demo_train, device, steps=steps, start=done)
        lora[steps], lora_out = score(pipe, held_out)
        done = steps
    rows = [(pair.references[0], pair.references[1], b, l, pair.target) for pair, b, l in zip(held_out, base_out, lora_out)]
    pretrain.save_grid(rows, out / f"{name}_recolour.png", scale=2)
    result = {"name": name, "budget": asdict(budget), "pretrain_s": round(pretrain_s, 1), "base_kinds": base_kinds,
              "recolour_base": base, "recolour_lora": lora}
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("prepare", "train"))
    parser.add_argument("dir", type=Path)
    parser.add_argument("name", nargs="?", default="run")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--lora-steps", default="120,300", help="score the LoRA after each of these step counts")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    budget, device = pretrain.budget_with(args.overrides), torch.device(args.device)
    if args.mode == "prepare":
        prepare(args.dir, budget, device)
    else:
        train(args.dir, args.name, budget, device, [int(v) for v in args.lora_steps.split(",")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
