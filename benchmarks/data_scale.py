"""Data-side scale: build the pairing manifest for N generated pairs, and time an incremental cache
pass that finds nothing to encode.

    .venv/bin/python benchmarks/data_scale.py --pairs 100000 [--workdir /tmp/qe-scale]

Goals (issue 4, 2-core CI machine): manifest for 100,000 pairs < 30 s; incremental pass < 1 ms/pair.
The incremental pass runs in a fresh process (no warm in-process caches), over cache files
written by a first pass whose encoder returns a placeholder tensor: the bookkeeping (stat,
safetensors header, fingerprint shortcut) is what is measured, not the encoders.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def generate(root: Path, pairs: int) -> None:
    """Small valid PNGs (8x8), one target + caption + reference per pair; reused when present."""
    marker = root / f"generated-{pairs}"
    if marker.exists():
        return
    edited, reference = root / "edited", root / "reference"
    edited.mkdir(parents=True, exist_ok=True)
    reference.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (8, 8), (120, 30, 200))
    for i in range(pairs):
        name = f"{i:06d}"
        image.save(edited / f"{name}.png")
        image.save(reference / f"{name}.png")
        (edited / f"{name}.txt").write_text("make the square blue")
    marker.touch()


def configs(root: Path):
    from trainer.config.parsing import parse_train_config
    from trainer.data.dataset_config import parse_dataset_config

    config = parse_train_config({"model_flavour": "edit-v1", "pretrained_model_name_or_path": "Qwen/Qwen-Image-Edit"})
    data = parse_dataset_config(
        [
            {"id": "edits", "instance_data_dir": str(root / "edited"), "resolution": 8, "conditioning_data": ["refs"],
             "cache_dir_vae": str(root / "cache" / "vae")},
            {"id": "refs", "dataset_type": "conditioning", "instance_data_dir": str(root / "reference")},
        ],
        "bench", config.flavour, base_dir=root,
    )
    return config, data


def manifest_seconds(root: Path) -> tuple[float, int]:
    from trainer.data.pairing import build_manifest, write_manifest

    config, data = configs(root)
    start = time.perf_counter()
    manifest, _ = build_manifest(data, config.flavour)
    elapsed = time.perf_counter() - start
    write_manifest(manifest, root / "manifest.json")
    return elapsed, len(manifest)


def cache_pass(root: Path, first: bool) -> dict:
    import torch

    from trainer.data.caches import _run_cache_pass, sample_paths, vae_key
    from trainer.data.pairing import read_manifest

    class Placeholder:  # the pass's encoder interface (trainer.data.cache_encoders), without a model
        description, rows_per_chunk = "placeholder encode", 1

        def order(self, row):
            return ()

        def prepare(self, pipe, row):
            return None

        def encode(self, pipe, chunk):
            return [{"target": torch.zeros(16, 1, 1)} for _ in chunk]

    config, data = configs(root)
    manifest = read_manifest(root / "manifest.json")
    start = time.perf_counter()
    stats = _run_cache_pass(
        manifest,
        Placeholder(),
        lambda row: sample_paths(data, config, row).vae,
        lambda row: vae_key(config, data, row),
        lambda: None,
        torch.device("cpu"),
    )
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "encoded": stats.encoded, "reused": stats.reused, "pairs": len(manifest)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qe-scale"))
    parser.add_argument("--cache-pass", choices=["first", "incremental"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = args.workdir / str(args.pairs)
    if args.cache_pass:
        print(json.dumps(cache_pass(root, args.cache_pass == "first")))
        return
    generate(root, args.pairs)
    seconds, rows = manifest_seconds(root)
    results = {}
    for phase in ("first", "incremental"):
        out = subprocess.run([sys.executable, __file__, "--pairs", str(args.pairs), "--workdir", str(args.workdir),
                              "--cache-pass", phase], capture_output=True, text=True, check=True)
        results[phase] = json.loads(out.stdout.strip().splitlines()[-1])
    inc = results["incremental"]
    print(f"| what | pairs | seconds | per pair |")
    print(f"|---|---|---|---|")
    print(f"| pairing manifest (build + pandera validation) | {rows} | {seconds:.2f} | {seconds / rows * 1e3:.3f} ms |")
    print(f"| incremental VAE-cache pass, nothing to encode (encoded {inc['encoded']}) | {inc['pairs']} | "
          f"{inc['seconds']:.2f} | {inc['seconds'] / inc['pairs'] * 1e3:.3f} ms |")


if __name__ == "__main__":
    main()
