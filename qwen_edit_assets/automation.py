"""Scheduled retraining and a sensor on new or changed pairs; both off until switched on in the UI.

Both run the `retrain` job: every asset, the raw dataset folders' observations first (so the run
records the data versions it trained on). The sensor also reports an observation of each folder it
sees change, so the UI marks everything built from that folder stale at once.
"""

import json
import os

import dagster as dg

from qwen_edit_assets.assets.raw_datasets import folder_version, raw_asset_key
from qwen_edit_assets.resources import QwenEditProject

# How often the daemon may evaluate the sensor; the integration tests shorten it.
SENSOR_INTERVAL_SECONDS = int(os.environ.get("QWEN_EDIT_SENSOR_INTERVAL", "60"))
DATA_VERSION_TAG = "dagster/data_version"  # where an observation carries its data version (as ObserveResult writes it)


def retrain_job(raw_keys: list[dg.AssetKey]):
    return dg.define_asset_job(
        "retrain",
        selection=dg.AssetSelection.all() | dg.AssetSelection.assets(*raw_keys),
        description="Observe the dataset folders, then re-materialise the whole graph.",
    )


def retrain_schedule(job) -> dg.ScheduleDefinition:
    return dg.ScheduleDefinition(
        name="weekly_retrain",
        job=job,
        cron_schedule="0 3 * * 0",
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description="Retrain every Sunday at 03:00, whether or not the data changed.",
    )


def dataset_folders_version(project: QwenEditProject) -> dict[str, str]:
    loaded = project.load()
    return {
        entry.id: folder_version(loaded.dataset_config.resolve(entry.instance_data_dir))
        for entry in loaded.dataset_config.entries
        if entry.dataset_type in ("image", "conditioning") and not entry.disabled
    }


def new_pairs_sensor(job) -> dg.SensorDefinition:
    @dg.sensor(
        name="new_pairs_sensor",
        job=job,
        minimum_interval_seconds=SENSOR_INTERVAL_SECONDS,
        default_status=dg.DefaultSensorStatus.STOPPED,
        description="Requests a retraining run when files are added, changed or removed in a dataset folder, "
        "and records the folder's new data version (downstream assets show as stale).",
    )
    def sensor(context: dg.SensorEvaluationContext, project: QwenEditProject):
        versions = dataset_folders_version(project)
        previous = json.loads(context.cursor) if context.cursor else None
        context.update_cursor(json.dumps(versions, sort_keys=True))
        if previous is None:
            return dg.SkipReason("first evaluation: remembered the dataset folders")
        changed = sorted(k for k in versions if versions.get(k) != previous.get(k))
        if not changed:
            return dg.SkipReason("no dataset folder changed")
        observations = [
            dg.AssetObservation(asset_key=raw_asset_key(k), tags={DATA_VERSION_TAG: versions[k]}, metadata={"seen_by": "new_pairs_sensor"})
            for k in changed
        ]
        request = dg.RunRequest(run_key=json.dumps(versions, sort_keys=True), tags={"qwen-edit/changed": ",".join(changed)})
        return dg.SensorResult(run_requests=[request], asset_events=observations)

    return sensor
