"""How one project's assets are named in the code location, and what they share.

The single project of QWEN_EDIT_CONFIG keeps the names it always had (`trained_lora`, groups `data`,
`caches`, `training`, the `retrain` job). A project of a projects folder (QWEN_EDIT_PROJECTS,
qwen_edit_assets.projects) gets its name in front of everything: asset keys `style/trained_lora`, one
group `style`, its resource `project_style`, the job `style_retrain`, and the tag `qwen-edit/project`.

A project whose config has a `sweep` partitions trained_lora and validation_report over its points
(trainer.config.sweep): one Dagster partition, one run folder and one MLflow run per point.
"""

import warnings
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import dagster as dg

from trainer.config.sweep import SweepPoint

# backfill_policy is a beta parameter of @asset in Dagster 1.13: chosen knowingly (said once here), its
# warning is not repeated at every load of the code location
warnings.filterwarnings("ignore", message="Parameter `backfill_policy` of function `asset`", category=dg.BetaWarning)

PROJECT_TAG = "qwen-edit/project"
PARTITION_TAG = "dagster_partition"  # the MLflow tag holding a sweep point's partition key


@dataclass(frozen=True)
class ProjectScope:
    name: str | None = None  # the project's folder name; None: the single project (names as they always were)
    pool: str = "gpu"  # the concurrency pool of its GPU steps (config key dagster_pool)
    points: tuple[SweepPoint, ...] = ()  # its sweep, if any

    @property
    def ident(self) -> str | None:
        """The name as Dagster takes it in keys, groups, jobs and resources (`-` becomes `_`)."""
        return None if self.name is None else self.name.replace("-", "_")

    def key(self, *path: str) -> dg.AssetKey:
        return dg.AssetKey([*([self.ident] if self.ident else []), *path])

    def group(self, stage: str) -> str:
        """The single project's assets are grouped by stage; a folder project's all in its own group."""
        return self.ident or stage

    def named(self, base: str) -> str:
        """A job, schedule or sensor name: `retrain`, or `style_retrain`."""
        return f"{self.ident}_{base}" if self.ident else base

    @property
    def resource_key(self) -> str:
        return f"project_{self.ident}" if self.ident else "project"

    def op_name(self, asset: str) -> str:
        """The op of one of this project's assets, as the Launchpad's `ops:` section names it."""
        return self.key(asset).to_python_identifier()

    @property
    def tags(self) -> dict[str, str]:
        return {PROJECT_TAG: self.name} if self.name else {}

    def project(self, context):
        """This project's QwenEditProject resource, from an asset's or a sensor's context."""
        return getattr(context.resources, self.resource_key)

    # -- sweeps ------------------------------------------------------------------------------------

    @cached_property
    def partitions_def(self) -> dg.StaticPartitionsDefinition | None:
        return dg.StaticPartitionsDefinition([point.key for point in self.points]) if self.points else None

    @property
    def backfill_policy(self) -> dg.BackfillPolicy | None:
        """A backfill of the grid is one run per point; the GPU pool then trains them one at a time."""
        return dg.BackfillPolicy.multi_run(max_partitions_per_run=1) if self.points else None

    def point_overrides(self, context: dg.AssetExecutionContext) -> dict[str, Any]:
        """The overrides of the sweep point this run materialises ({} without a sweep)."""
        if not self.points:
            return {}
        by_key = {point.key: point.overrides for point in self.points}
        if not context.has_partition_key or context.partition_key not in by_key:
            raise dg.Failure(
                f"{self.name or 'the project'} sweeps {len(self.points)} points: materialise one partition "
                f"(one of {', '.join(by_key)}) or backfill them, not the asset as a whole"
            )
        return dict(by_key[context.partition_key])


SINGLE = ProjectScope()
