"""The training entry point that `accelerate launch` runs, one process per device:

    accelerate launch -m trainer.train --config CONFIG --data DATA --manifest MANIFEST [--set key=value ...]

It reads the caches written by `trainer.data.caches` (prompt embeddings, VAE latents), trains a
LoRA on the transformer with flow matching exactly as the diffusers pipeline conditions it
(`trainer.training.recipe`), checkpoints, and saves the LoRA. Rank 0 alone reports to Dagster
(Pipes) and MLflow.
"""

import argparse
from pathlib import Path

from trainer.config.parsing import parse_override
from trainer.training.recipe import run_training


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="trainer.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, type=Path, help="training config.json")
    parser.add_argument("--data", type=Path, help="multidatabackend.json (default: the config's data_backend_config)")
    parser.add_argument("--manifest", required=True, type=Path, help="pairing manifest written by the pairing step")
    parser.add_argument("--project-root", type=Path, default=Path.cwd(), help="where relative paths and mlruns/ live")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--tag", dest="tags", action="append", default=[], metavar="KEY=VALUE", help="MLflow run tag")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from trainer.workflow import load_project

    args = parse_args(argv)
    overrides = dict(parse_override(o) for o in args.overrides)
    project = load_project(args.config, args.data, args.project_root, overrides)
    tags = dict(t.split("=", 1) for t in args.tags)
    run_training(project.config, project.dataset_config, args.manifest, project.root, tags)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
