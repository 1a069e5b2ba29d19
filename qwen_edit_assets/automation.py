"""Scheduled retraining and a sensor on new or changed pairs; both off until switched on in the UI.

Both run the `retrain` job: every asset, the raw dataset folders' observations first (so the run
records the data versions it trained on). The sensor also reports an observation of each folder it
sees change, so the UI marks everything built from that folder stale at once.

Each project of a projects folder has its own (`style_retrain`, `style_weekly_retrain`,
`style_new_pairs_sensor`), over its own group. A project with a sweep retrains every point: one run
per partition, which the GPU pool then trains one at a time.
"""

import json
import os

import dagster as dg

from qwen_edit_assets.assets.raw_datasets import folder_version, raw_asset_key
from qwen_edit_assets.resources import QwenEditProject
from qwen_edit_assets.scope import SINGLE, ProjectScope

# How often the daemon may evaluate the sensor; the integration tests shorten it.
SENSOR_INTERVAL_SECONDS = int(os.environ.get("QWEN_EDIT_SENSOR_INTERVAL", "60"))
DATA_VERSION_TAG = "dagster/data_version"  # where an observation carries its data version (as ObserveResult writes it)


def retrain_job(raw_keys: list[dg.AssetKey], scope: ProjectScope = SINGLE):
    everything = dg.AssetSelection.groups(scope.ident) if scope.ident else dg.AssetSelection.all()
    return dg.define_asset_job(
        scope.named("retrain"),
        selection=everything | dg.AssetSelection.assets(*raw_keys),
        tags=scope.tags,
        description="Observe the dataset folders, then re-materialise the whole graph"
        + (f" of project {scope.name}." if scope.name else "."),
    )


def retrain_requests(scope: ProjectScope, run_key: str | None = None, tags: dict | None = None) -> list[dg.RunRequest]:
    """One run, or with a sweep one run per point (the GPU pool trains them one at a time)."""
    if not scope.points:
        return [dg.RunRequest(run_key=run_key, tags=tags or {})]
    return [
        dg.RunRequest(run_key=f"{run_key}:{point.key}" if run_key else None, partition_key=point.key, tags=tags or {})
        for point in scope.points
    ]


def retrain_schedule(job, scope: ProjectScope = SINGLE) -> dg.ScheduleDefinition:
    @dg.schedule(
        name=scope.named("weekly_retrain"),
        job=job,
        cron_schedule="0 3 * * 0",
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description="Retrain every Sunday at 03:00, whether or not the data changed"
        + (" (every point of the sweep)." if scope.points else "."),
    )
    def weekly_retrain(context: dg.ScheduleEvaluationContext):
        tick = context.scheduled_execution_time.isoformat() if context.scheduled_execution_time else None
        return retrain_requests(scope, run_key=tick)

    return weekly_retrain


def dataset_folders_version(project: QwenEditProject) -> dict[str, str]:
    loaded = project.load()
    return {
        entry.id: folder_version(loaded.dataset_config.resolve(entry.instance_data_dir))
        for entry in loaded.dataset_config.entries
        if entry.dataset_type in ("image", "conditioning") and not entry.disabled
    }


def new_pairs_sensor(job, scope: ProjectScope = SINGLE) -> dg.SensorDefinition:
    @dg.sensor(
        name=scope.named("new_pairs_sensor"),
        job=job,
        minimum_interval_seconds=SENSOR_INTERVAL_SECONDS,
        default_status=dg.DefaultSensorStatus.STOPPED,
        required_resource_keys={scope.resource_key},
        description="Requests a retraining run when files are added, changed or removed in a dataset folder, "
        "and records the folder's new data version (downstream assets show as stale).",
    )
    def sensor(context: dg.SensorEvaluationContext):
        versions = dataset_folders_version(scope.project(context))
        previous = json.loads(context.cursor) if context.cursor else None
        context.update_cursor(json.dumps(versions, sort_keys=True))
        if previous is None:
            return dg.SkipReason("first evaluation: remembered the dataset folders")
        changed = sorted(k for k in versions if versions.get(k) != previous.get(k))
        if not changed:
            return dg.SkipReason("no dataset folder changed")
        observations = [
            dg.AssetObservation(asset_key=raw_asset_key(k, scope), tags={DATA_VERSION_TAG: versions[k]}, metadata={"seen_by": "new_pairs_sensor"})
            for k in changed
        ]
        requests = retrain_requests(scope, run_key=json.dumps(versions, sort_keys=True), tags={"qwen-edit/changed": ",".join(changed)})
        return dg.SensorResult(run_requests=requests, asset_events=observations)

    return sensor
