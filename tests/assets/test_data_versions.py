"""The cache assets' data versions change exactly when their files do (the manifest and caches only, no training)."""

import dagster as dg

from qwen_edit_assets.definitions import build_definitions
from qwen_edit_assets.resources import QwenEditProject
from tests.conftest import write_small_project
from trainer.data.versions import manifest_version
from trainer.workflow import load_project

SELECTION = ["pairing_manifest", "text_embeds", "vae_latents"]


def _data_versions(root, config, data) -> dict[str, str]:
    defs = build_definitions(QwenEditProject(root=str(root), config_path=str(config), data_path=str(data)))
    job = defs.resolve_implicit_global_asset_job_def().get_subset(asset_selection={dg.AssetKey(k) for k in SELECTION})
    with dg.DagsterInstance.ephemeral() as instance:
        result = job.execute_in_process(instance=instance)
    assert result.success
    return {
        e.asset_key.to_user_string(): e.materialization.tags["dagster/data_version"]
        for e in result.get_asset_materialization_events()
    }


def test_caption_dropout_changes_the_text_cache_version_and_nothing_else(demo_root, tmp_path):
    models = demo_root / "demo" / "models"
    config, data = write_small_project(tmp_path, models, n_train=2)
    before = _data_versions(tmp_path, config, data)
    assert before["pairing_manifest"] == manifest_version(load_project(config, data, tmp_path).manifest_path)

    config, data = write_small_project(tmp_path, models, n_train=2, caption_dropout_probability=0.5)
    after = _data_versions(tmp_path, config, data)
    assert after["text_embeds"] != before["text_embeds"]  # its files now hold the empty-instruction embeddings
    assert after["vae_latents"] == before["vae_latents"]
    assert after["pairing_manifest"] == before["pairing_manifest"]
