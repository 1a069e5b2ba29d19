"""The Dagster code location: `dagster dev -m qwen_edit_assets.definitions`.

Which project it works on comes from QWEN_EDIT_ROOT / QWEN_EDIT_CONFIG / QWEN_EDIT_DATA
(default: the bundled edit-v2 demo preset under the working directory).
"""

import dagster as dg

from qwen_edit_assets.assets.caches import text_embeds, vae_latents
from qwen_edit_assets.assets.comparison import run_comparison
from qwen_edit_assets.assets.pairing import pairing_manifest_asset
from qwen_edit_assets.assets.raw_datasets import raw_asset_key, raw_dataset_assets
from qwen_edit_assets.assets.training import trained_lora_asset
from qwen_edit_assets.assets.validation import validation_report
from qwen_edit_assets.automation import new_pairs_sensor, retrain_job, retrain_schedule
from qwen_edit_assets.io_managers import ManifestIOManager
from qwen_edit_assets.resources import QwenEditProject, project_from_env


def build_definitions(project: QwenEditProject | None = None) -> dg.Definitions:
    project = project or project_from_env()
    raw = raw_dataset_assets(project)
    raw_keys = [asset.key for asset in raw]
    retrain = retrain_job(raw_keys)
    return dg.Definitions(
        assets=[
            *raw, pairing_manifest_asset(raw_keys), text_embeds, vae_latents, trained_lora_asset(project),
            validation_report, run_comparison,
        ],
        jobs=[retrain],
        schedules=[retrain_schedule(retrain)],
        sensors=[new_pairs_sensor(retrain)],
        # io_manager: the manifest handed to downstream assets as JSON, not Dagster's default pickles
        resources={"project": project, "pipes_subprocess_client": dg.PipesSubprocessClient(), "io_manager": ManifestIOManager()},
        # one process per run: a process per step re-imports torch and diffusers each time (~3x slower
        # on the demo); training still runs in its own accelerate subprocess under Pipes
        executor=dg.in_process_executor,
    )


defs = build_definitions()

__all__ = ["build_definitions", "defs", "raw_asset_key"]
