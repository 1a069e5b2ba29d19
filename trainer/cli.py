"""`qwen-edit`: the command line. Every command runs without Dagster, through the same
`trainer` functions the Dagster assets call.

    qwen-edit train example=qwen_image.edit-v1-lora
    qwen-edit train --config config.json --data multidatabackend.json [--set learning_rate=1e-4]
    qwen-edit check --config config.json            # validate config + data, nothing else
    qwen-edit compare --last 5                      # the latest MLflow runs side by side
    qwen-edit demo-setup                            # tiny models + demo dataset under ./demo
    qwen-edit tiny-model OUT_DIR --flavour edit-v2
"""

import argparse
import sys
from pathlib import Path

from trainer.errors import QwenEditError

DEMO_DIR = Path("demo")


def _project_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("preset", nargs="?", help="example=NAME, a bundled preset (e.g. example=qwen_image.edit-v1-lora)")
    parser.add_argument("--config", type=Path, help="config.json")
    parser.add_argument("--data", type=Path, help="multidatabackend.json (default: the config's data_backend_config)")
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="base of relative paths (default: working directory)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def _load(args: argparse.Namespace):
    from trainer.config.parsing import parse_override
    from trainer.workflow import example_paths, load_project

    overrides = dict(parse_override(o) for o in args.overrides)
    if args.preset:
        if not args.preset.startswith("example="):
            raise QwenEditError(f"unexpected argument {args.preset!r}; did you mean example={args.preset}?")
        config, data = example_paths(args.preset.split("=", 1)[1])
        ensure_demo(args.root)
        project = load_project(config, data, args.root, overrides)
        overrides = {**real_model_overrides(project.config), **overrides}
        project = load_project(config, data, args.root, overrides)
    elif args.config is None:
        raise QwenEditError("give example=NAME or --config config.json")
    else:
        project = load_project(args.config, args.data, args.root, overrides)
    for note in project.notes:
        print(f"note: {note}")
    return project, overrides


def real_model_overrides(config) -> dict:
    """Presets train the real checkpoint where it can: a CUDA GPU and the weights in the local HF cache.

    Everywhere else they train the tiny model. Only the model changes; the demo data stays.
    """
    import torch

    if not torch.cuda.is_available():
        return {}
    from trainer.model.loading import cached_snapshot

    model = config.flavour.default_model
    if cached_snapshot(model) is None:
        print(f"note: {model} is not in the local Hugging Face cache; training the tiny demo model")
        return {}
    memory_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    return {
        "pretrained_model_name_or_path": model,
        "base_model_precision": "int8-quanto" if memory_gib < 60 else "no_change",
        "gradient_checkpointing": True,
        "validation_resolution": "768x768" if memory_gib < 40 else "1024x1024",
        "validation_num_inference_steps": 30,
    }


def ensure_demo(root: Path) -> None:
    """The bundled presets train the tiny model on the demo data; build both once."""
    from trainer.demo.dataset import generate_demo_dataset
    from trainer.demo.tiny_model import build_tiny_pipeline

    demo = Path(root) / DEMO_DIR
    for flavour in ("edit-v1", "edit-v2", "edit-v3"):
        build_tiny_pipeline(demo / "models" / f"tiny-{flavour}", flavour=flavour)
    generate_demo_dataset(demo / "data")


def cmd_check(args) -> int:
    from trainer.workflow import check_data

    project, _ = _load(args)
    manifest, report = check_data(project)
    counts = manifest["split"].value_counts().to_dict()
    print(f"config ok: {project.config_path}\ndata ok: {project.data_path}\nsamples: {counts}")
    for warning in report.warnings:
        print(f"warning: {warning}")
    print(f"manifest: {project.manifest_path}")
    for line in memory_report(project, manifest, args.gpu_memory):
        print(line)
    return 0


def memory_report(project, manifest, card_gb: float | None) -> list[str]:
    """The predicted GPU memory of a training step of the largest sample, against the card (--gpu-memory,
    else the GPU of this machine)."""
    import torch

    from trainer.model.memory_estimate import CARD_VISIBLE, check_report, largest_training_shape

    if card_gb is None and torch.cuda.is_available():
        card_gb = torch.cuda.get_device_properties(0).total_memory / 2**30 / CARD_VISIBLE
    shape = largest_training_shape(manifest, project.dataset_config, project.config)
    return check_report(project.config, shape, card_gb)


def cmd_cache(args) -> int:
    from trainer.data.caches import build_text_cache, build_vae_cache
    from trainer.workflow import check_data

    project, _ = _load(args)
    manifest, _ = check_data(project)
    for name, build in (("text embeddings", build_text_cache), ("VAE latents", build_vae_cache)):
        stats = build(manifest, project.dataset_config, project.config)
        print(f"{name}: {stats.encoded} encoded, {stats.reused} reused, {stats.pruned} pruned")
    return 0


def cmd_train(args) -> int:
    from trainer.data.caches import build_text_cache, build_vae_cache
    from trainer.evaluation.validation import log_to_mlflow, run_validation
    from trainer.tracking.store import tracking_uri
    from trainer.training.recipe import SUMMARY_NAME
    from trainer.workflow import check_data, run_training_subprocess

    project, overrides = _load(args)
    print("1/4 checking data")
    manifest, report = check_data(project)
    for warning in report.warnings:
        print(f"warning: {warning}")
    print("2/4 caching text embeddings and VAE latents")
    build_text_cache(manifest, project.dataset_config, project.config)
    build_vae_cache(manifest, project.dataset_config, project.config)
    print("3/4 training")
    run_training_subprocess(project, overrides)
    print("4/4 validating")
    import json

    summary = json.loads((project.output_dir / SUMMARY_NAME).read_text())
    report = run_validation(project.config, manifest, project.lora_dir, project.validation_dir)
    if summary.get("mlflow_run_id"):
        log_to_mlflow(report, summary["mlflow_run_id"], tracking_uri(project.root))
    print(f"LoRA: {summary['lora_path']}\nvalidation report: {report.html_path}\nfinal loss: {summary['final_loss']:.5f}")
    return 0


def cmd_tiny_model(args) -> int:
    from trainer.demo.tiny_model import build_tiny_pipeline

    print(build_tiny_pipeline(args.out_dir, flavour=args.flavour, seed=args.seed, overwrite=args.overwrite))
    return 0


def cmd_demo_setup(args) -> int:
    ensure_demo(args.root)
    print(f"demo models and data under {Path(args.root).resolve() / DEMO_DIR}")
    return 0


def cmd_compare(args) -> int:
    import os

    from trainer.tracking.compare import compare_runs, write_comparison_report
    from trainer.tracking.store import tracking_uri

    root = Path(args.root).resolve()
    experiment = args.experiment
    if experiment is None:
        if args.config is not None:
            from trainer.config.parsing import load_train_config

            config_path = args.config if args.config.is_absolute() else root / args.config
            experiment = load_train_config(config_path).tracker_project_name
        else:
            experiment = "qwen-edit"
    uri = args.tracking_uri or tracking_uri(root)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    out = args.out if args.out is not None else root / "outputs" / "comparison"
    comparison = compare_runs(uri, experiment, last_n=args.last, out_dir=out)
    report = write_comparison_report(comparison, out)
    print(f"experiment {experiment!r} at {comparison.tracking_uri}: the last {len(comparison.runs)} run(s)\n")
    print(comparison.runs_table() + "\n")
    if not comparison.differing_params:
        print("(all params are equal)\n")
    print(comparison.table() + "\n")
    print(f"report: {report} (and report.html)\nMLflow compare page: {comparison.compare_url}")
    return 0


def cmd_mlflow_sync(args) -> int:
    """Send what a training run could not log while MLflow was unreachable (output_dir/mlflow_unsent.json)."""
    from trainer.tracking.mlflow_run import sync_unsent
    from trainer.tracking.store import redact_url, tracking_uri

    uri = args.tracking_uri or tracking_uri(Path(args.root).resolve())
    for run_id, calls in sync_unsent(args.output_dir, uri):
        print(f"MLflow run {run_id}: {calls} call(s) sent to {redact_url(uri)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen-edit", description="LoRA fine-tuning of the Qwen-Image Edit models")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, func, help_text in (
        ("train", cmd_train, "check data, cache, train, validate"),
        ("check", cmd_check, "validate the config and the data (pairing manifest)"),
        ("cache", cmd_cache, "check data, then encode the text-embedding and VAE-latent caches"),
    ):
        sub = commands.add_parser(name, help=help_text)
        _project_args(sub)
        sub.set_defaults(func=func)
        if name == "check":
            sub.add_argument("--gpu-memory", type=float, metavar="GB",
                             help="the card to train on, as sold (24, 16, 12, ...): is the predicted peak within it?")
    tiny = commands.add_parser("tiny-model", help="write a tiny random-weight pipeline folder")
    tiny.add_argument("out_dir", type=Path)
    tiny.add_argument("--flavour", default="edit-v1", choices=["edit-v1", "edit-v2", "edit-v3"])
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--overwrite", action="store_true")
    tiny.set_defaults(func=cmd_tiny_model)
    compare = commands.add_parser("compare", help="the latest MLflow runs side by side: differing params, losses, edits")
    compare.add_argument("--last", type=int, default=5, metavar="N", help="compare the N most recent runs (default 5)")
    compare.add_argument("--experiment", help="MLflow experiment (default: --config's tracker_project_name, else qwen-edit)")
    compare.add_argument("--config", type=Path, help="config.json whose tracker_project_name names the experiment")
    compare.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else the store under --root")
    compare.add_argument("--root", type=Path, default=Path.cwd(), help="project folder holding mlruns/ (default: working directory)")
    compare.add_argument("--out", type=Path, help="report folder (default: ROOT/outputs/comparison)")
    compare.set_defaults(func=cmd_compare)
    sync = commands.add_parser("mlflow-sync", help="send to MLflow what a training run could not (the store was down)")
    sync.add_argument("output_dir", type=Path, help="the run's output_dir (it holds mlflow_unsent.json)")
    sync.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else the store under --root")
    sync.add_argument("--root", type=Path, default=Path.cwd(), help="project folder holding mlruns/ (default: working directory)")
    sync.set_defaults(func=cmd_mlflow_sync)
    demo = commands.add_parser("demo-setup", help="tiny models and the demo dataset under ./demo")
    demo.add_argument("--root", type=Path, default=Path.cwd())
    demo.set_defaults(func=cmd_demo_setup)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Bad input of any kind (config, data, paths, unwritable outputs) ends with one `error:` line and exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except QwenEditError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
