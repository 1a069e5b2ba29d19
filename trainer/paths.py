"""Where the paths of a project may lead.

The rule: a relative path in a config, and every path derived from one (cache folders named after
dataset ids), stays inside the project root after `..` and symlinks are followed. A path the user
typed as absolute (or `~/...`) is where they chose to put it and is not checked: SimpleTuner users
point at data and caches on other disks that way. `allow_paths_outside_root: true` in the training
config lifts the rule for relative paths too (e.g. a `data` symlink onto a bigger disk).
"""

import os
from pathlib import Path

from trainer.errors import ConfigError

ALLOW_KEY = "allow_paths_outside_root"


def resolved_folder(path: Path, what: str) -> Path:
    """`path.resolve()`, with a symlink loop or an unusable name as a ConfigError naming `what`."""
    try:
        return Path(path).expanduser().resolve()
    except (RuntimeError, OSError, ValueError) as exc:
        raise ConfigError(f"{what} {path}: cannot be resolved ({exc}); fix the symlink loop or the name") from None


def _typed_absolute(typed: str | None) -> Path | None:
    if typed is None:
        return None
    path = Path(typed).expanduser()
    return Path(os.path.normpath(path)) if path.is_absolute() else None


def _under(path: Path, folder: Path) -> bool:
    return Path(os.path.normpath(path)).is_relative_to(folder)


def outside_root_problems(config, dataset_config, root: Path) -> list[str]:
    """Every relative or derived path of the two configs that leads outside `root`, one line each."""
    root = resolved_folder(root, "project root")
    typed: list[tuple[str, str | None, Path]] = [("output_dir", config.output_dir, dataset_config.resolve(config.output_dir))]
    if getattr(config, "lycoris_config", None) is not None:
        typed.append(("lycoris_config", config.lycoris_config, dataset_config.resolve(config.lycoris_config)))
    for entry in dataset_config.entries:
        for key in ("instance_data_dir", "cache_dir_vae", "cache_dir"):
            value = getattr(entry, key)
            if value is not None:
                typed.append((f"dataset {entry.id!r} {key}", value, dataset_config.resolve(value)))
    # derived cache folders inside a cache folder the user typed as absolute are their choice too
    chosen = [p for label, value, _ in typed if "cache_dir" in label and (p := _typed_absolute(value)) is not None]
    derived: list[tuple[str, str | None, Path]] = []
    for entry in dataset_config.image_entries:
        try:
            tset = dataset_config.training_set(entry, config.flavour)
        except ConfigError:
            continue  # a dangling id, reported on its own
        derived += [
            (f"dataset {entry.id!r} VAE cache", None, tset.vae_cache_dir),
            (f"dataset {entry.id!r} prompt-embedding cache", None, tset.text_cache_dir),
        ]
    problems = []
    for label, value, path in typed + derived:
        if _typed_absolute(value) is not None or (value is None and any(_under(path, folder) for folder in chosen)):
            continue
        real = resolved_folder(path, label)
        if not real.is_relative_to(root):
            shown = f"{value!r} " if value is not None else ""
            problems.append(
                f"{label} {shown}leads to {real}, outside the project root {root} (through '..' or a symlink); "
                f"write the absolute path if it is meant to be there, or set {ALLOW_KEY}: true in the training config"
            )
    return problems


def check_inside_root(config, dataset_config, root: Path, source: str) -> None:
    if getattr(config, ALLOW_KEY, False):
        return
    problems = outside_root_problems(config, dataset_config, root)
    if problems:
        from trainer.config.parsing import problems_message

        raise ConfigError(problems_message(source, problems))
