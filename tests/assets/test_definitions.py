"""The code location loads and holds every asset, check, schedule and sensor the product promises."""

import dagster as dg

from qwen_edit_assets.definitions import build_definitions
from qwen_edit_assets.resources import QwenEditProject
from trainer.workflow import example_paths


def _defs(root) -> dg.Definitions:
    config, data = example_paths("qwen_image.edit-v2-lora")
    return build_definitions(QwenEditProject(root=str(root), config_path=str(config), data_path=str(data)))


def test_every_stage_is_an_asset(tmp_path):
    keys = {k.to_user_string() for k in _defs(tmp_path).resolve_asset_graph().get_all_asset_keys()}
    raw = {k for k in keys if k.startswith("raw/")}
    assert {"pairing_manifest", "text_embeds", "vae_latents", "trained_lora", "validation_report", "run_comparison"} <= keys
    # one raw asset per image/conditioning folder of the edit-v2 preset: 2 edit sets x (1 + 3 references)
    assert raw == {
        "raw/demo_edits", "raw/demo_reference", "raw/demo_swatch", "raw/demo_silhouette",
        "raw/demo_eval", "raw/demo_eval_reference", "raw/demo_eval_swatch", "raw/demo_eval_silhouette",
    }


def test_the_graph_runs_data_before_encoding_before_training(tmp_path):
    graph = _defs(tmp_path).resolve_asset_graph()
    parents = {k.to_user_string(): {p.to_user_string() for p in graph.get(k).parent_keys} for k in graph.get_all_asset_keys()}
    assert "raw/demo_edits" in parents["pairing_manifest"]
    assert parents["text_embeds"] == {"pairing_manifest"} and parents["vae_latents"] == {"pairing_manifest"}
    assert {"text_embeds", "vae_latents"} <= parents["trained_lora"]
    assert "trained_lora" in parents["validation_report"]
    assert parents["run_comparison"] == {"validation_report"}


def test_checks_schedule_and_sensor_exist_and_start_switched_off(tmp_path):
    defs = _defs(tmp_path)
    graph = defs.resolve_asset_graph()
    checks = {key.name for key in graph.asset_check_keys}
    assert {"no_orphan_references", "loss_decreased"} <= checks
    schedule = defs.resolve_schedule_def("weekly_retrain")
    sensor = defs.resolve_sensor_def("new_pairs_sensor")
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    assert sensor.default_status == dg.DefaultSensorStatus.STOPPED


def test_gpu_steps_share_one_pool(tmp_path):
    """With the instance's pool limit of 1, two runs never put GPU steps on the card together."""
    defs = _defs(tmp_path)
    for name in ("text_embeds", "vae_latents", "trained_lora", "validation_report"):
        assert defs.resolve_assets_def(name).op.pool == "gpu", name


def test_instance_limits_the_gpu_pool_to_one_step():
    import yaml

    from tests.conftest import REPO

    instance = yaml.safe_load((REPO / "dagster_home" / "dagster.yaml").read_text())
    assert instance["concurrency"]["pools"]["default_limit"] == 1


def test_the_module_level_definitions_load():
    from qwen_edit_assets import definitions

    assert isinstance(definitions.defs, dg.Definitions)
