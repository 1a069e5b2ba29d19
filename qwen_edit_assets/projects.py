"""A folder of projects in one code location: QWEN_EDIT_PROJECTS=projects, one asset group per project.

    projects/
      style/config.json              its training config (every key as in a single config)
      style/multidatabackend.json    its dataset config (without it: the config's data_backend_config)
      relight/config.json
      relight/multidatabackend.json

Each sub-folder holding a config.json is a project named after the folder: its asset keys start with
the name (`style/trained_lora`), its assets form the group `style`, and it has its own resource, job,
schedule and sensor (qwen_edit_assets.scope). Folders starting with `.` or `_` are skipped; any other
folder without a config.json is an error, so a misnamed file is never silently left out. The folder is
read when the code location loads: a new project appears after "Reload" in the UI (or a restart).

Relative paths in a project's files resolve against QWEN_EDIT_ROOT (the working directory by default),
as with QWEN_EDIT_CONFIG, so projects can share the models and the data; the MLflow store is shared too
(QWEN_EDIT_ROOT/mlruns, or MLFLOW_TRACKING_URI). Two projects must not share an MLflow experiment
(tracker_project_name) or an output_dir: both are checked at load.
"""

import os
import re
from dataclasses import dataclass
from pathlib import Path

from qwen_edit_assets.resources import QwenEditProject

PROJECTS_ENV = "QWEN_EDIT_PROJECTS"
SINGLE_CONFIG_ENV = "QWEN_EDIT_CONFIG"
CONFIG_NAME = "config.json"
DATA_NAME = "multidatabackend.json"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,39}")  # a Dagster group, key prefix and tag value once `-` is `_`


@dataclass(frozen=True)
class FolderProject:
    name: str  # the folder's name
    resource: QwenEditProject


def discover_projects(folder: Path, root: Path) -> list[FolderProject]:
    """The projects of `folder`, sorted by name; a ConfigError names the folder and the fix for anything amiss."""
    from trainer.errors import ConfigError

    folder = Path(folder) if Path(folder).is_absolute() else Path(root) / folder
    if not folder.is_dir():
        raise ConfigError(f"{PROJECTS_ENV}={folder}: no such folder; create it with one sub-folder per project "
                          f"(<name>/{CONFIG_NAME} and <name>/{DATA_NAME}), or unset {PROJECTS_ENV}")
    projects, idents = [], {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        config = sub / CONFIG_NAME
        if not config.is_file():
            raise ConfigError(f"{sub}: a project folder needs a {CONFIG_NAME} (and usually a {DATA_NAME}); add it, or "
                              f"move the folder out of {folder} (or start its name with '_' to skip it)")
        if not NAME.fullmatch(sub.name):
            raise ConfigError(f"{sub}: a project's name is its folder's: 1 to 40 letters, digits, '-' or '_', starting "
                              "with a letter or digit; rename the folder")
        ident = sub.name.replace("-", "_")
        if ident in idents:
            raise ConfigError(f"{sub} and {folder / idents[ident]}: both become the Dagster name {ident!r}; rename one")
        idents[ident] = sub.name
        data = sub / DATA_NAME
        projects.append(FolderProject(sub.name, QwenEditProject(
            root=str(root), config_path=str(config), data_path=str(data) if data.is_file() else None,
        )))
    if not projects:
        raise ConfigError(f"{PROJECTS_ENV}={folder}: no project in it; add a sub-folder with a {CONFIG_NAME} per project")
    return projects


def projects_from_env() -> list[FolderProject] | None:
    """The projects of QWEN_EDIT_PROJECTS; None when it is not set (the single project of QWEN_EDIT_CONFIG)."""
    from trainer.errors import ConfigError

    folder = os.environ.get(PROJECTS_ENV)
    if not folder:
        return None
    if os.environ.get(SINGLE_CONFIG_ENV):
        raise ConfigError(f"both {PROJECTS_ENV} and {SINGLE_CONFIG_ENV} are set: use one. To keep that config beside the "
                          f"others, move it to {folder}/<name>/{CONFIG_NAME} and unset {SINGLE_CONFIG_ENV}")
    return discover_projects(Path(folder), Path(os.environ.get("QWEN_EDIT_ROOT") or Path.cwd()))


def check_distinct(loaded: dict[str, "object"]) -> None:
    """No two projects (name -> trainer.workflow.Project) log to one MLflow experiment or write one output_dir."""
    from trainer.errors import ConfigError

    for what, value_of in (
        ("MLflow experiment (tracker_project_name)", lambda p: p.config.tracker_project_name),
        ("output_dir", lambda p: str(p.output_dir.resolve())),
    ):
        seen: dict[str, str] = {}
        for name, project in loaded.items():
            value = value_of(project)
            if value in seen:
                other = loaded[seen[value]]
                raise ConfigError(
                    f"projects {seen[value]!r} and {name!r} share the {what} {value!r} ({other.config_path}, "
                    f"{project.config_path}): give each project its own"
                )
            seen[value] = name
