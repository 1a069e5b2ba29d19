"""The caching entry point that `accelerate launch` runs when several GPUs share the cache stage:

    accelerate launch --multi_gpu --num_processes N -m trainer.cache --config CONFIG --data DATA \\
        --manifest MANIFEST --summary cache_summary.json [--set key=value ...]

`trainer.workflow.build_caches` starts it with one process per GPU. Each rank encodes its share of the
manifest's stale samples and writes their files (trainer.data.cache_ranks); rank 0 waits for the
others, prunes, and writes the summary the launcher reads back.
"""

import argparse
from pathlib import Path

from trainer.config.parsing import parse_override
from trainer.errors import exit_status


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="trainer.cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, type=Path, help="training config.json")
    parser.add_argument("--data", type=Path, help="multidatabackend.json (default: the config's data_backend_config)")
    parser.add_argument("--manifest", required=True, type=Path, help="pairing manifest written by the data check")
    parser.add_argument("--project-root", type=Path, default=Path.cwd(), help="where relative paths live")
    parser.add_argument("--summary", required=True, type=Path, help="where rank 0 writes the stats (JSON)")
    parser.add_argument("--run-name", help="the run folder under output_dir, as trainer.train takes it")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Bad input ends with one `error:` line (rank 0) and exit status 2, no traceback."""
    from trainer.training.run_lock import exit_with_parent

    exit_with_parent()  # killing `accelerate launch` must not leave this process encoding on
    return exit_status(_cache, parse_args(argv))


def _cache(args: argparse.Namespace) -> int:
    from trainer.data.cache_ranks import CacheRanks
    from trainer.data.caches import build_text_cache, build_vae_cache
    from trainer.data.pairing import read_manifest
    from trainer.workflow import load_project, write_cache_summary

    project = load_project(args.config, args.data, args.project_root, dict(parse_override(o) for o in args.overrides))
    if args.run_name:
        project = project.for_run(args.run_name)
    ranks = CacheRanks.from_accelerate()
    manifest = read_manifest(args.manifest)
    stats = {
        "text": build_text_cache(manifest, project.dataset_config, project.config, ranks.device, ranks=ranks),
        "vae": build_vae_cache(manifest, project.dataset_config, project.config, ranks.device, ranks=ranks),
    }
    if ranks.is_main:
        write_cache_summary(args.summary, stats, processes=ranks.world)
    ranks.wait()  # the summary is there when the launcher sees the processes end
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
