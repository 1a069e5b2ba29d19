"""`qwen-edit`: the command line. Every command runs without Dagster, through the same
`trainer` functions the Dagster assets call.

    qwen-edit train example=qwen_image.edit-v1-lora
    qwen-edit train --config config.json --data multidatabackend.json [--set learning_rate=1e-4]
    qwen-edit check --config config.json            # validate config + data, nothing else
    qwen-edit compare --last 5                      # the latest MLflow runs side by side
    qwen-edit promote --config config.json          # register the latest run's LoRA, champion or challenger
    qwen-edit champion --config config.json         # the registered model's champion and challenger
    qwen-edit demo-setup                            # demo models + demo dataset under ./demo
    qwen-edit tiny-model OUT_DIR --flavour edit-v2        # or edit-v1, edit-v3, edit-2.1
"""

import argparse
import sys
from pathlib import Path

from trainer.errors import QwenEditError, exit_status

DEMO_DIR = Path("demo")


def _project_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("preset", nargs="?", help="example=NAME, a bundled preset (e.g. example=qwen_image.edit-v1-lora)")
    parser.add_argument("--config", type=Path, help="config.json")
    parser.add_argument("--data", type=Path, help="multidatabackend.json (default: the config's data_backend_config)")
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="base of relative paths (default: working directory)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key for this run, e.g. --set learning_rate=5e-5 (repeatable; the value is "
                        "read as JSON when it parses, else as text; dotted keys reach nested ones: model_kwargs.match_target_res=true)")


def _load(args: argparse.Namespace):
    from trainer.config.parsing import parse_override
    from trainer.workflow import example_paths, load_project

    overrides = dict(parse_override(o) for o in args.overrides)
    if getattr(args, "run_name", None):
        overrides["tracker_run_name"] = args.run_name  # the MLflow run's name, and its folder's
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

    Everywhere else they train the demo models. Only the model changes; the demo data stays.
    """
    import torch

    if not torch.cuda.is_available():
        return {}
    from trainer.model.loading import cached_snapshot

    model = config.flavour.default_model
    if cached_snapshot(model) is None:
        print(f"note: {model} is not in the local Hugging Face cache; training the demo model")
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
    """The bundled presets train on the demo data: the tiny random models (edit-v1, edit-v3, edit-2.1)
    or the shipped trained one (edit-v2); build or copy each once."""
    from trainer.demo.dataset import generate_demo_dataset
    from trainer.demo.tiny_model import build_tiny_pipeline
    from trainer.demo.trained_model import DEMO_NAME, install_trained_pipeline

    from trainer.model.flavours import FLAVOURS

    demo = Path(root) / DEMO_DIR
    for flavour in FLAVOURS:
        build_tiny_pipeline(demo / "models" / f"tiny-{flavour}", flavour=flavour)
    install_trained_pipeline(demo / "models" / DEMO_NAME)
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
    from trainer.model.speed import speed_notes

    for note in speed_notes(project.config):
        print(f"warning: {note}")
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
    from trainer.workflow import build_caches, check_data

    project, overrides = _load(args)
    manifest, _ = check_data(project)
    for line in cache_lines(build_caches(project, manifest, overrides)):
        print(line)
    return 0


CACHE_NAMES = {"text": "text embeddings", "vae": "VAE latents"}


def cache_lines(stats: dict) -> list[str]:
    """One line per cache: counts, and where it encoded anything its time and GPU peak."""
    lines = []
    for kind, s in stats.items():
        line = f"{CACHE_NAMES[kind]}: {s.encoded} encoded, {s.reused} reused, {s.pruned} pruned"
        if s.encoded:
            line += f" in {s.seconds:.1f} s ({(s.seconds - s.load_seconds) / s.encoded:.3f} s/sample after {s.load_seconds:.1f} s loading"
            if len(s.encoded_per_rank) > 1:
                line += f"; {'+'.join(map(str, s.encoded_per_rank))} over {len(s.encoded_per_rank)} processes"
            line += ")" + (f", GPU peak {s.peak_reserved_gib:.2f} GiB reserved" if s.peak_reserved_gib is not None else "")
        lines.append(line)
    return lines


def peak_memory_line(caches: dict, training: dict, validation: dict) -> str | None:
    """Each phase's peak GPU memory (GiB allocated / reserved), or None off CUDA."""
    phases = [(f"caching {CACHE_NAMES[kind]}", {"allocated": s.peak_allocated_gib, "reserved": s.peak_reserved_gib})
              for kind, s in caches.items() if s.peak_reserved_gib is not None]
    phases += [(f"training {name}", peak) for name, peak in training.items() if peak]
    phases += [("validation", validation)] if validation else []
    if not phases:
        return None
    return "peak GPU memory (GiB allocated / reserved): " + ", ".join(
        f"{name} {peak['allocated']:.2f} / {peak['reserved']:.2f}" for name, peak in phases
    )


def cmd_train(args) -> int:
    import json

    from trainer.config.parsing import parse_override
    from trainer.evaluation.means import means_table
    from trainer.evaluation.validation import log_to_mlflow, run_validation
    from trainer.run_folders import default_run_name
    from trainer.tracking.loss_summary import FINAL_LOSS
    from trainer.tracking.store import parse_tag, tracking_uri
    from trainer.training.recipe import SUMMARY_NAME
    from trainer.workflow import build_caches, check_data, new_run, run_training_subprocess

    tags = dict(parse_tag(t) for t in args.tags)
    project, overrides = _load(args)
    asked = dict(parse_override(o) for o in args.overrides)  # the name shows what the user changed, not the preset's GPU settings
    run = new_run(project, project.config.tracker_run_name or default_run_name(project.config.model_flavour, asked))
    print(f"run {run.run_name}: {run.output_dir}")
    print("1/4 checking data")
    manifest, report = check_data(run)  # the manifest goes into the run's folder
    for warning in report.warnings:
        print(f"warning: {warning}")
    print("2/4 caching text embeddings and VAE latents")
    caches = build_caches(run, manifest, overrides)
    for line in cache_lines(caches):
        print(line)
    print("3/4 training")
    run_training_subprocess(run, overrides, tags)
    print("4/4 validating")
    summary = json.loads((run.output_dir / SUMMARY_NAME).read_text())
    report = run_validation(run.config, manifest, run.lora_dir, run.validation_dir)
    if summary.get("mlflow_run_id"):
        log_to_mlflow(report, summary["mlflow_run_id"], tracking_uri(run.root), step=summary["steps"])
    print(f"LoRA: {summary['lora_path']}\nvalidation report: {report.html_path}")
    print(f"{FINAL_LOSS}: {summary[FINAL_LOSS]:.5f} over {summary['steps']} steps")
    print("validation means:\n" + "\n".join(f"  {line}" for line in means_table(report.summary)))
    if (memory := peak_memory_line(caches, summary.get("peak_memory_gib", {}), report.peak_memory_gib)) is not None:
        print(memory)
    if summary.get("mlflow_run_url"):
        print(f"MLflow run: {summary['mlflow_run_url']}")
        _promote_after_training(run)
    print(f"latest run: {run.runs_dir / 'latest'} -> {run.run_name}")
    return 0


def _promote_after_training(run) -> None:
    """Every trained, validated LoRA becomes a registered version; a registry that does not answer is a
    warning (training and validation are done), with the command that registers it later."""
    from trainer.tracking.registry import RegistryError, promote_run
    from trainer.tracking.store import tracking_uri

    try:
        promotion = promote_run(run.output_dir, run.config, tracking_uri(run.root))
    except RegistryError as exc:
        print(f"warning: the LoRA is not registered ({exc}); `qwen-edit promote --config {run.config_path} --run "
              f"{run.output_dir}` registers it once MLflow answers", file=sys.stderr)
        return
    print(f"promotion: {promotion.message()}\nregistered model version: {promotion.new.url}")


def run_folder(project, run: str | None) -> Path:
    """`--run`: a run folder, or the name of one under output_dir; default output_dir/latest."""
    from trainer.run_folders import LATEST

    output_dir = project.output_dir
    candidates = [output_dir / LATEST] if run is None else [Path(run), output_dir / run]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    finished = sorted(p.parent.name for p in output_dir.glob("*/training_summary.json")) if output_dir.is_dir() else []
    known = f"run folders there: {', '.join(finished)}" if finished else "none has finished training yet"
    what = "no latest run" if run is None else f"no run folder {run!r}"
    raise QwenEditError(f"{what} under {output_dir} ({known}); train one, or name one with --run NAME_OR_FOLDER")


def cmd_promote(args) -> int:
    from trainer.tracking.registry import promote_run
    from trainer.tracking.store import redact_url, tracking_uri

    project, _ = _load(args)
    folder = run_folder(project, args.run)
    uri = args.tracking_uri or tracking_uri(project.root)
    promotion = promote_run(folder, project.config, uri)
    print(f"run {folder.name}: {folder}\nregistered model {promotion.model_name!r} at {redact_url(uri)}")
    print(f"rule: {promotion.rule.describe()}")
    print(f"{'registered' if promotion.registered else 'already registered:'} version {promotion.new.version}")
    print(f"decision: {promotion.decision.alias} ({promotion.decision.reason})")
    views = [("new", promotion.new)] + ([("champion before", promotion.previous_champion)] if promotion.previous_champion else [])
    for line in version_lines(views, promotion.rule):
        print(line)
    print(f"MLflow: {promotion.model_url}")
    return 0


def cmd_champion(args) -> int:
    from trainer.tracking.promotion import CHALLENGER, CHAMPION, PromotionRule
    from trainer.tracking.registry import model_url, standing
    from trainer.tracking.store import redact_url, tracking_uri

    root = Path(args.root).resolve()
    config = configured_config(args.config, root, args.preset)
    name = args.model or config.model_registry_name
    uri = args.tracking_uri or tracking_uri(root)
    champion, challenger = standing(uri, name)
    rule = PromotionRule.from_config(config)
    print(f"registered model {name!r} at {redact_url(uri)}\nrule: {rule.describe()}")
    views = [(alias, view) for alias, view in ((CHAMPION, champion), (CHALLENGER, challenger)) if view is not None]
    if champion is None:
        print(f"no {CHAMPION} yet: `qwen-edit promote` decides for a trained, validated run")
    for line in version_lines(views, rule):
        print(line)
    print(f"MLflow: {model_url(uri, name)}")
    return 0


def version_lines(views: list, rule) -> list[str]:
    """One line per version (alias, version, run, the deciding metric, its MLflow page), then the LoRA's
    validation means side by side."""
    import time

    lines = []
    for alias, view in views:
        value = view.value(rule)
        shown = "none" if value is None else f"{value:.6g}"
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(view.created_ms / 1000)) if view.created_ms else "?"
        lines.append(f"{alias}: version {view.version} (run {view.run_name}, registered {created}), "
                     f"{rule.metric} {shown}: {view.url}")
    keys = sorted({k for _, view in views for k in view.metrics if k.startswith("validation_lora_")})
    if keys:
        width = max(len(k) for k in keys) - len("validation_") + 2
        lines.append("")
        lines.append("metric".ljust(width) + "".join(f"{alias + ' v' + view.version:>22}" for alias, view in views))
        for key in keys:
            name = key.removeprefix("validation_")
            cells = "".join(f"{view.metrics[key]:>22.6g}" if key in view.metrics else " " * 22 for _, view in views)
            lines.append(name.ljust(width) + cells + ("   <- decides" if name == rule.metric else ""))
    return lines


def configured_config(config: Path | None, root: Path, preset: str | None = None):
    """The training config of example=NAME or --config, else $QWEN_EDIT_CONFIG (the Dagster project's), else the defaults."""
    import os

    from trainer.config.parsing import load_train_config
    from trainer.config.schema import TrainConfig
    from trainer.workflow import example_paths

    if preset:
        if not preset.startswith("example="):
            raise QwenEditError(f"unexpected argument {preset!r}; did you mean example={preset}?")
        return load_train_config(example_paths(preset.split("=", 1)[1])[0])
    path = config or (Path(os.environ["QWEN_EDIT_CONFIG"]) if os.environ.get("QWEN_EDIT_CONFIG") else None)
    if path is None:
        return TrainConfig()
    return load_train_config(path if path.is_absolute() else root / path)


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
    experiment = args.experiment or configured_experiment(args.config, root)
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


def configured_experiment(config: Path | None, root: Path) -> str:
    """tracker_project_name of --config, else of $QWEN_EDIT_CONFIG (the Dagster project's), else its default."""
    import os

    from trainer.config.parsing import load_train_config
    from trainer.config.schema import TrainConfig

    path = config or (Path(os.environ["QWEN_EDIT_CONFIG"]) if os.environ.get("QWEN_EDIT_CONFIG") else None)
    if path is None:
        return TrainConfig.model_fields["tracker_project_name"].default
    return load_train_config(path if path.is_absolute() else root / path).tracker_project_name


def build_parser() -> argparse.ArgumentParser:
    from trainer.model.flavours import FLAVOURS

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
        if name == "train":
            sub.add_argument("--run-name", help="the MLflow run's name and its folder under output_dir (default: the flavour "
                             "and the --set overrides, e.g. edit-v2_learning_rate-5e-05)")
            sub.add_argument("--tag", dest="tags", action="append", default=[], metavar="KEY=VALUE",
                             help="an MLflow tag on the run, e.g. --tag team=vision (repeatable)")
        if name == "check":
            sub.add_argument("--gpu-memory", type=float, metavar="GB",
                             help="the card to train on, as sold (24, 16, 12, ...): is the predicted peak within it?")
    tiny = commands.add_parser("tiny-model", help="write a tiny random-weight pipeline folder")
    tiny.add_argument("out_dir", type=Path)
    tiny.add_argument("--flavour", default="edit-v1", choices=list(FLAVOURS))
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--overwrite", action="store_true")
    tiny.set_defaults(func=cmd_tiny_model)
    compare = commands.add_parser("compare", help="the latest MLflow runs side by side: differing params, losses, edits")
    compare.add_argument("--last", type=int, default=5, metavar="N", help="compare the N most recent runs (default 5)")
    compare.add_argument("--experiment", help="MLflow experiment (default: tracker_project_name of --config, else of "
                         "$QWEN_EDIT_CONFIG, else qwen-edit); a name that does not exist lists the ones that do")
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
    promote = commands.add_parser("promote", help="register a trained, validated run's LoRA in the MLflow Model "
                                  "Registry; champion if it beats the champion, else challenger")
    _project_args(promote)
    promote.add_argument("--run", metavar="NAME_OR_FOLDER", help="the run folder, or its name under output_dir "
                         "(default: output_dir/latest)")
    promote.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else the store under --root")
    promote.set_defaults(func=cmd_promote)
    champion = commands.add_parser("champion", help="the registered model's champion and challenger with their metrics")
    champion.add_argument("preset", nargs="?", help="example=NAME, a bundled preset")
    champion.add_argument("--config", type=Path, help="config.json (registered_model_name / tracker_project_name, "
                          "the promotion rule; default $QWEN_EDIT_CONFIG)")
    champion.add_argument("--model", help="the registered model's name (default: the config's)")
    champion.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else the store under --root")
    champion.add_argument("--root", type=Path, default=Path.cwd(), help="project folder holding mlruns/ (default: working directory)")
    champion.set_defaults(func=cmd_champion)
    demo = commands.add_parser("demo-setup", help="tiny models and the demo dataset under ./demo")
    demo.add_argument("--root", type=Path, default=Path.cwd())
    demo.set_defaults(func=cmd_demo_setup)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Bad input of any kind (config, data, paths, unwritable outputs) ends with one `error:` line and exit status 2."""
    args = build_parser().parse_args(argv)
    return exit_status(args.func, args)


if __name__ == "__main__":
    raise SystemExit(main())
