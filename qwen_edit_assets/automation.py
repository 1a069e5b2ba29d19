"""Scheduled retraining and a sensor on new or changed pairs; both off until switched on in the UI."""

import json
import os

import dagster as dg

from qwen_edit_assets.assets.raw_datasets import folder_version
from qwen_edit_assets.resources import QwenEditProject

retrain_job = dg.define_asset_job("retrain", selection=dg.AssetSelection.all(), description="Re-materialise the whole graph.")

retrain_schedule = dg.ScheduleDefinition(
    name="weekly_retrain",
    job=retrain_job,
    cron_schedule="0 3 * * 0",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Retrain every Sunday at 03:00, whether or not the data changed.",
)


# How often the daemon may evaluate the sensor; the integration tests shorten it.
SENSOR_INTERVAL_SECONDS = int(os.environ.get("QWEN_EDIT_SENSOR_INTERVAL", "60"))


def dataset_folders_version(project: QwenEditProject) -> dict[str, str]:
    loaded = project.load()
    return {
        entry.id: folder_version(loaded.dataset_config.resolve(entry.instance_data_dir))
        for entry in loaded.dataset_config.entries
        if entry.dataset_type in ("image", "conditioning") and not entry.disabled
    }


@dg.sensor(
    job=retrain_job,
    minimum_interval_seconds=SENSOR_INTERVAL_SECONDS,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Requests a retraining run when files are added, changed or removed in a dataset folder.",
)
def new_pairs_sensor(context: dg.SensorEvaluationContext, project: QwenEditProject):
    versions = dataset_folders_version(project)
    previous = json.loads(context.cursor) if context.cursor else None
    context.update_cursor(json.dumps(versions, sort_keys=True))
    if previous is None:
        return dg.SkipReason("first evaluation: remembered the dataset folders")
    changed = sorted(k for k in versions if versions.get(k) != previous.get(k))
    if not changed:
        return dg.SkipReason("no dataset folder changed")
    return dg.RunRequest(run_key=json.dumps(versions, sort_keys=True), tags={"qwen-edit/changed": ",".join(changed)})
