"""Load: `qwen-edit check`, `qwen-edit cache` and a short `qwen-edit train` on N demo pairs with the tiny
model, each stage timed and its peak memory measured (issue 15 §7).

    .venv/bin/python benchmarks/load.py --pairs 1000 10000 [--steps 20] [--workdir /tmp/qe-load]
    .venv/bin/python benchmarks/load.py --pairs --copies 10 --source-pairs 1000   # 10,000 from the 1,000 above

Every stage is the real command in its own process, as a user runs it. Peak memory is the largest
resident set of any process of the stage (the CLI, or the accelerate-launched trainer for `train`),
read from the kernel's rusage of the waited-for children. `train` re-runs check and cache (both
incremental then) before training and validating, as it always does.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QWEN_EDIT = [sys.executable, "-m", "trainer.cli"]


def write_project(root: Path, models: Path, pairs: int, steps: int) -> None:
    """edit-v2 on the demo's first reference, 32-pixel targets, two eval pairs."""
    sys.path.insert(0, str(REPO))
    from trainer.demo.dataset import generate_demo_dataset

    data = generate_demo_dataset(root / "data", n_train=pairs, n_eval=2, size=32)
    entries = []
    for split, dataset_id in (("train", "edits"), ("eval", "eval")):
        entries += [
            {"id": dataset_id, "instance_data_dir": str(data.folder(split, "edited")), "resolution": 32,
             "conditioning_data": [f"{dataset_id}-refs"]},
            {"id": f"{dataset_id}-refs", "dataset_type": "conditioning", "instance_data_dir": str(data.folder(split, "reference"))},
        ]
    config = {
        "model_flavour": "edit-v2", "pretrained_model_name_or_path": str(models / "tiny-edit-v2"),
        "model_kwargs": {"match_target_res": True}, "output_dir": "out", "max_train_steps": steps, "learning_rate": 1e-3,
        "lora_rank": 4, "mixed_precision": "no", "checkpointing_steps": steps, "eval_dataset_id": "eval",
        "validation_resolution": "32x32", "validation_num_inference_steps": 2, "report_to": "mlflow",
    }
    (root / "config.json").write_text(json.dumps(config, indent=1))
    (root / "multidatabackend.json").write_text(json.dumps(entries, indent=1))


def replicate(source: Path, root: Path, models: Path, copies: int, steps: int) -> None:
    """`root`: `source`'s project with each training pair `copies` times under new names (hard links), and
    each copy's cache files linked from the original's. Encoding is per sample and the same code at any
    size; what grows with the pair count (manifest, probes, cache bookkeeping, the training set) is what
    this measures, without re-encoding identical pairs for hours on a 2-core machine."""
    import shutil

    write_project(root, models, 1, steps)  # configs; the data folders are replaced below
    for split in ("train", "eval"):
        for folder in (source / "data" / split).iterdir():
            target = root / "data" / split / folder.name
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            for path in folder.iterdir():
                for copy in range(copies if split == "train" else 1):
                    os.link(path, target / (f"{copy}{path.name}" if split == "train" else path.name))
    for cache in (source / "cache").glob("*/*"):
        target = root / cache.relative_to(source)
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for path in cache.glob("*.safetensors"):
            for copy in range(copies if cache.name == "edits" else 1):
                os.link(path, target / (f"{copy}{path.name}" if cache.name == "edits" else path.name))


def measured(command: list[str], cwd: Path, env: dict) -> dict:
    """Wall seconds and the peak RSS (MiB) of the largest process of `command`, in a fresh measuring process."""
    probe = (
        "import json, resource, subprocess, sys, time\n"
        "start = time.perf_counter()\n"
        "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "usage = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
        "print(json.dumps({'rc': done.returncode, 'seconds': time.perf_counter() - start,\n"
        "                  'peak_mib': usage.ru_maxrss / 1024, 'tail': (done.stdout + done.stderr)[-2000:]}))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe, *command], cwd=cwd, env=env, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result['rc']}):\n{result['tail']}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, nargs="*", default=[1000, 10000])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qe-load"))
    parser.add_argument("--copies", type=int, default=0, help="also: the --source-pairs project replicated this many times")
    parser.add_argument("--source-pairs", type=int, default=1000)
    parser.add_argument("--stages", nargs="+", default=["check", "cache", "train"], choices=["check", "cache", "train"])
    args = parser.parse_args()
    models = args.workdir / "demo" / "models"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run([*QWEN_EDIT, "demo-setup", "--root", str(args.workdir)], env=env, check=True, capture_output=True)
    rows = []
    for pairs in args.pairs:
        root = args.workdir / f"pairs-{pairs}"
        root.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        write_project(root, models, pairs, args.steps)
        generated = time.perf_counter() - start
        stage_env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"}
        (root / "mlruns").mkdir(exist_ok=True)
        project = ["--config", "config.json", "--data", "multidatabackend.json", "--root", str(root)]
        for stage, extra in (("check", []), ("cache", []), ("train", ["--set", f"max_train_steps={args.steps}"])):
            if stage not in args.stages:
                continue
            result = measured([*QWEN_EDIT, stage, *project, *extra], root, stage_env)
            rows.append((stage, pairs, result["seconds"], result["peak_mib"]))
            print(f"{stage} {pairs}: {result['seconds']:.1f} s, peak {result['peak_mib']:.0f} MiB", flush=True)
        print(f"  generated in {generated:.0f} s")
        if "train" in args.stages:
            out = root / "out" / "latest" if (root / "out" / "latest").exists() else root / "out"  # run folders, or one
            summary = json.loads((out / "training_summary.json").read_text())
            print(f"  trained {summary['steps']} steps in {summary['seconds']:.0f} s")
    if args.copies:
        source = args.workdir / f"pairs-{args.source_pairs}"
        pairs = args.source_pairs * args.copies
        root = args.workdir / f"pairs-{pairs}-replicated"
        replicate(source, root, models, args.copies, args.steps)
        stage_env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"}
        (root / "mlruns").mkdir(exist_ok=True)
        project = ["--config", "config.json", "--data", "multidatabackend.json", "--root", str(root)]
        for stage, extra in (("check", []), ("cache", []), ("train", ["--set", f"max_train_steps={args.steps}"])):
            result = measured([*QWEN_EDIT, stage, *project, *extra], root, stage_env)
            rows.append((f"{stage} (replicated)", pairs, result["seconds"], result["peak_mib"]))
            print(f"{stage} {pairs} replicated: {result['seconds']:.1f} s, peak {result['peak_mib']:.0f} MiB", flush=True)
            if stage == "cache":
                print("  " + result["tail"].strip().splitlines()[-1])
    print("\n| stage | pairs | seconds | peak RSS MiB |\n|---|---|---|---|")
    for stage, pairs, seconds, peak in rows:
        print(f"| {stage} | {pairs:,} | {seconds:.1f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
