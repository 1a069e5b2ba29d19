"""The training entry point that `accelerate launch` runs, one process per device:

    accelerate launch -m trainer.train --config CONFIG --data DATA --manifest MANIFEST [--set key=value ...]

It reads the caches written by `trainer.data.caches` (prompt embeddings, VAE latents), trains a
LoRA on the transformer with flow matching exactly as the diffusers pipeline conditions it
(`trainer.training.recipe`), checkpoints, and saves the LoRA. Rank 0 alone reports to Dagster
(Pipes) and MLflow.
"""

import argparse
import shlex
from pathlib import Path

from trainer.config.parsing import parse_override
from trainer.errors import exit_status
from trainer.tracking.store import parse_tag
from trainer.training.recipe import run_training


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="trainer.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, type=Path, help="training config.json")
    parser.add_argument("--data", type=Path, help="multidatabackend.json (default: the config's data_backend_config)")
    parser.add_argument("--manifest", required=True, type=Path, help="pairing manifest written by the pairing step")
    parser.add_argument("--project-root", type=Path, default=Path.cwd(), help="where relative paths and mlruns/ live")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--tag", dest="tags", action="append", default=[], metavar="KEY=VALUE", help="MLflow run tag")
    parser.add_argument("--run-name", help="train in output_dir/RUN_NAME (the launcher picks it: trainer.run_folders) "
                        "and point output_dir/latest at it once trained; without it, in output_dir itself")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Bad input (config, data, stale caches) ends with one `error:` line and exit status 2, no traceback."""
    from trainer.training.run_lock import exit_with_parent

    exit_with_parent()  # killing `accelerate launch` must not leave this process training on as an orphan
    return exit_status(_train, parse_args(argv))


def _train(args: argparse.Namespace) -> int:
    from trainer.workflow import load_project

    overrides = dict(parse_override(o) for o in args.overrides)
    project = load_project(args.config, args.data, args.project_root, overrides)
    if args.run_name:
        project = project.for_run(args.run_name)
    tags = dict(parse_tag(t) for t in args.tags)
    result = run_training(project.config, project.dataset_config, args.manifest, project.root, tags, cache_command(project, args.overrides))
    if result is not None and project.run_name is not None:  # rank 0, trained: the LoRA and summary are written
        from trainer.run_folders import point_latest

        point_latest(project.runs_dir, project.output_dir)
    return 0


def cache_command(project, overrides: list[str]) -> str:
    """The `qwen-edit cache` call that (re)builds the caches this run reads."""
    command = ["qwen-edit", "cache", "--config", str(project.config_path), "--data", str(project.data_path), "--root", str(project.root)]
    for override in overrides:
        command += ["--set", override]
    return shlex.join(command)


if __name__ == "__main__":
    raise SystemExit(main())
