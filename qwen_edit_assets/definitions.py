"""The Dagster code location: `dagster dev -m qwen_edit_assets.definitions`.

Which projects it works on:
- QWEN_EDIT_PROJECTS=<folder>: every project of that folder, one asset group each, names prefixed by the
  project's (qwen_edit_assets.projects);
- otherwise the one project of QWEN_EDIT_ROOT / QWEN_EDIT_CONFIG / QWEN_EDIT_DATA (default: the bundled
  edit-v2 demo preset under the working directory), with the asset names it always had.
A project whose config declares a `sweep` has its training and validation partitioned over the grid.
"""

import dagster as dg

from qwen_edit_assets.assets.caches import cache_assets
from qwen_edit_assets.assets.comparison import run_comparison_asset
from qwen_edit_assets.assets.pairing import pairing_manifest_asset
from qwen_edit_assets.assets.promotion import promotion_asset
from qwen_edit_assets.assets.raw_datasets import raw_asset_key, raw_dataset_assets
from qwen_edit_assets.assets.training import trained_lora_asset
from qwen_edit_assets.assets.validation import validation_report_asset
from qwen_edit_assets.automation import new_pairs_sensor, retrain_job, retrain_schedule
from qwen_edit_assets.io_managers import ManifestIOManager
from qwen_edit_assets.projects import FolderProject, check_distinct, projects_from_env
from qwen_edit_assets.resources import QwenEditProject, project_from_env
from qwen_edit_assets.scope import ProjectScope


def project_scope(loaded, name: str | None = None) -> ProjectScope:
    """How the project's assets are named, pooled and partitioned (trainer.workflow.Project `loaded`)."""
    from trainer.config.sweep import sweep_points

    points = tuple(sweep_points(loaded.config.sweep)) if loaded.config.sweep else ()
    return ProjectScope(name=name, pool=loaded.config.dagster_pool, points=points)


def project_assets(project: QwenEditProject, scope: ProjectScope) -> list:
    """One project's assets, raw dataset folders to run comparison."""
    raw = raw_dataset_assets(project, scope)
    return [
        *raw,
        pairing_manifest_asset([asset.key for asset in raw], scope),
        *cache_assets(scope),
        trained_lora_asset(project, scope),
        validation_report_asset(scope),
        run_comparison_asset(scope),
        promotion_asset(scope),  # MLflow Model Registry: champion / challenger
    ]


def project_definitions(project: QwenEditProject, scope: ProjectScope) -> dg.Definitions:
    """One project's assets with its job, schedule, sensor and resource (under scope.resource_key)."""
    assets = project_assets(project, scope)
    raw_keys = [asset.key for asset in assets if isinstance(asset, dg.SourceAsset)]
    retrain = retrain_job(raw_keys, scope)
    return dg.Definitions(
        assets=assets,
        jobs=[retrain],
        schedules=[retrain_schedule(retrain, scope)],
        sensors=[new_pairs_sensor(retrain, scope)],
        resources={scope.resource_key: project},
    )


def build_definitions(project: QwenEditProject | None = None, projects: list[FolderProject] | None = None) -> dg.Definitions:
    """The code location of `projects` (a projects folder's), else of `project`, else of the environment's."""
    if project is None and projects is None:
        projects = projects_from_env()
    if projects:
        loaded = {p.name: p.resource.load() for p in projects}
        check_distinct(loaded)
        parts = [project_definitions(p.resource, project_scope(loaded[p.name], p.name)) for p in projects]
    else:
        project = project or project_from_env()
        parts = [project_definitions(project, project_scope(project.load()))]
    return dg.Definitions(
        assets=[asset for part in parts for asset in part.assets],
        jobs=[job for part in parts for job in part.jobs],
        schedules=[schedule for part in parts for schedule in part.schedules],
        sensors=[sensor for part in parts for sensor in part.sensors],
        # io_manager: the manifest handed to downstream assets as JSON, not Dagster's default pickles
        resources={
            **{key: value for part in parts for key, value in part.resources.items()},
            "pipes_subprocess_client": dg.PipesSubprocessClient(),
            "io_manager": ManifestIOManager(),
        },
        # one process per run: a process per step re-imports torch and diffusers each time (~3x slower
        # on the demo); training still runs in its own accelerate subprocess under Pipes
        executor=dg.in_process_executor,
    )


defs = build_definitions()

__all__ = ["build_definitions", "defs", "project_definitions", "raw_asset_key"]
