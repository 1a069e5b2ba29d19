"""Many projects in one code location (QWEN_EDIT_PROJECTS): one group each, names prefixed, own resource,
pool, tags, job, schedule and sensor; a sweep partitions training and validation. No training here
(tests/assets/test_projects_materialize.py trains them)."""

import importlib
import json
from datetime import datetime

import dagster as dg
import pytest

from qwen_edit_assets.definitions import build_definitions
from qwen_edit_assets.projects import PROJECTS_ENV, discover_projects
from qwen_edit_assets.scope import PROJECT_TAG
from tests.conftest import write_small_project
from trainer.errors import ConfigError

SWEEP = {"learning_rate": [1e-4, 3e-4], "lora_rank": [4, 8]}
POINTS = ["learning_rate=1e-4;lora_rank=4", "learning_rate=1e-4;lora_rank=8", "learning_rate=3e-4;lora_rank=4", "learning_rate=3e-4;lora_rank=8"]


def _project(folder, name, **config):
    write_small_project(folder / name, folder.parent / "models", n_train=2, tracker_project_name=f"exp-{name}", **config)


@pytest.fixture
def projects(tmp_path):
    folder = tmp_path / "projects"
    _project(folder, "style")
    _project(folder, "product-swap", sweep=SWEEP, dagster_pool="gpu_1")
    (folder / "_drafts").mkdir()  # skipped: starts with _
    return folder


def _defs(folder) -> dg.Definitions:
    return build_definitions(projects=discover_projects(folder, folder.parent))


def test_each_project_is_a_group_of_its_own_with_prefixed_keys(projects):
    graph = _defs(projects).resolve_asset_graph()
    by_group: dict[str, set[str]] = {}
    for key in graph.get_all_asset_keys():
        by_group.setdefault(graph.get(key).group_name, set()).add(key.to_user_string())
    stages = {"pairing_manifest", "text_embeds", "vae_latents", "trained_lora", "validation_report", "run_comparison"}
    assert set(by_group) == {"style", "product_swap"}
    for group, keys in by_group.items():
        assert {f"{group}/{stage}" for stage in stages} <= keys
        assert all(key.startswith(f"{group}/") for key in keys)
        assert f"{group}/raw/edits" in keys  # the dataset folders too
    # each project's graph only reaches into itself
    parents = {p.to_user_string() for p in graph.get(dg.AssetKey(["style", "trained_lora"])).parent_keys}
    assert parents == {"style/text_embeds", "style/vae_latents", "style/pairing_manifest"}


def test_each_project_has_its_resource_pool_tags_job_schedule_and_sensor(projects):
    defs = _defs(projects)
    assert {"project_style", "project_product_swap"} <= set(defs.resources)
    assert defs.resources["project_style"].config_path == str(projects / "style" / "config.json")
    for name, folder, pool in (("style", "style", "gpu"), ("product_swap", "product-swap", "gpu_1")):  # dagster_pool
        for stage in ("text_embeds", "vae_latents", "trained_lora", "validation_report"):
            key = dg.AssetKey([name, stage])
            assets_def = defs.resolve_assets_def(key)
            assert assets_def.op.pool == pool, (name, stage)
            assert f"project_{name}" in assets_def.op.required_resource_keys
            assert assets_def.tags_by_key[key][PROJECT_TAG] == folder
        job = defs.resolve_job_def(f"{name}_retrain")
        assert job.tags[PROJECT_TAG] == folder
        selected = {key.path[0] for key in job.asset_layer.executable_asset_keys}
        assert selected == {name}  # retraining one project never touches another
        assert defs.resolve_schedule_def(f"{name}_weekly_retrain").default_status == dg.DefaultScheduleStatus.STOPPED
        assert defs.resolve_sensor_def(f"{name}_new_pairs_sensor").default_status == dg.DefaultSensorStatus.STOPPED


def test_a_sweep_partitions_training_and_validation_over_its_grid_not_the_caches(projects):
    defs = _defs(projects)
    for stage in ("trained_lora", "validation_report"):
        assets_def = defs.resolve_assets_def(dg.AssetKey(["product_swap", stage]))
        assert assets_def.partitions_def.get_partition_keys() == POINTS
        # a backfill of the grid: one run per point, each waiting for the GPU pool
        assert assets_def.backfill_policy == dg.BackfillPolicy.multi_run(1)
    for stage in ("pairing_manifest", "text_embeds", "vae_latents", "run_comparison"):
        assert defs.resolve_assets_def(dg.AssetKey(["product_swap", stage])).partitions_def is None, stage
    assert defs.resolve_assets_def(dg.AssetKey(["style", "trained_lora"])).partitions_def is None


def test_the_sweep_schedule_retrains_every_point(projects):
    defs = _defs(projects)
    schedule = defs.resolve_schedule_def("product_swap_weekly_retrain")
    context = dg.build_schedule_context(scheduled_execution_time=datetime(2026, 1, 4, 3), repository_def=defs.get_repository_def())
    requests = schedule.evaluate_tick(context).run_requests
    assert [r.partition_key for r in requests] == POINTS


def test_the_launchpad_of_a_prefixed_project_is_its_own_op(projects):
    """ops: {style__trained_lora: {config: ...}}: one project's overrides never reach another's run."""
    job = _defs(projects).resolve_implicit_global_asset_job_def()
    ops = set(job.run_config_schema.config_type.fields["ops"].config_type.fields)
    assert {"style__trained_lora", "product_swap__trained_lora"} <= ops


def test_a_new_folder_is_a_new_project_after_a_reload(projects, monkeypatch):
    """What the UI's "Reload" does: the code location imports the module again and reads the folder again."""
    from qwen_edit_assets import definitions

    monkeypatch.setenv(PROJECTS_ENV, str(projects))
    monkeypatch.setenv("QWEN_EDIT_ROOT", str(projects.parent))
    monkeypatch.delenv("QWEN_EDIT_CONFIG", raising=False)
    try:
        groups = lambda: {definitions.defs.resolve_asset_graph().get(k).group_name for k in definitions.defs.resolve_asset_graph().get_all_asset_keys()}  # noqa: E731
        importlib.reload(definitions)
        assert groups() == {"style", "product_swap"}
        _project(projects, "relight")
        importlib.reload(definitions)
        assert groups() == {"style", "product_swap", "relight"}
    finally:
        monkeypatch.undo()
        importlib.reload(definitions)  # the default project again, for whoever imports it next


def test_the_single_project_keeps_its_names_and_groups(tmp_path):
    config, data = write_small_project(tmp_path, tmp_path / "models")
    from qwen_edit_assets.resources import QwenEditProject

    defs = build_definitions(QwenEditProject(root=str(tmp_path), config_path=str(config), data_path=str(data)))
    graph = defs.resolve_asset_graph()
    assert graph.get(dg.AssetKey("trained_lora")).group_name == "training"
    assert graph.get(dg.AssetKey("text_embeds")).group_name == "caches"
    assert graph.get(dg.AssetKey(["raw", "edits"])).group_name == "raw_datasets"
    assert {"project", "pipes_subprocess_client", "io_manager"} <= set(defs.resources)
    assert defs.resolve_job_def("retrain").tags.get(PROJECT_TAG) is None


def test_a_single_config_with_a_sweep_is_partitioned_too(tmp_path):
    from qwen_edit_assets.resources import QwenEditProject

    config, data = write_small_project(tmp_path, tmp_path / "models", sweep={"seed": [1, 2]})
    defs = build_definitions(QwenEditProject(root=str(tmp_path), config_path=str(config), data_path=str(data)))
    assert defs.resolve_assets_def("trained_lora").partitions_def.get_partition_keys() == ["seed=1", "seed=2"]


# -- what is refused, and how it is said ---------------------------------------------------------


def test_a_missing_projects_folder_says_how_to_make_one(tmp_path):
    with pytest.raises(ConfigError, match="no such folder; create it with one sub-folder per project"):
        discover_projects(tmp_path / "nope", tmp_path)


def test_an_empty_projects_folder_is_refused(tmp_path):
    (tmp_path / "projects" / "_skipped").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no project in it"):
        discover_projects(tmp_path / "projects", tmp_path)


def test_a_folder_without_config_json_is_named_not_skipped(projects):
    (projects / "relight").mkdir()
    (projects / "relight" / "Config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"relight: a project folder needs a config.json"):
        discover_projects(projects, projects.parent)


def test_a_project_name_dagster_cannot_take_is_refused(projects):
    _project(projects, "my project")
    with pytest.raises(ConfigError, match="rename the folder"):
        discover_projects(projects, projects.parent)


def test_two_names_that_become_one_dagster_name_are_refused(projects):
    _project(projects, "product_swap")
    with pytest.raises(ConfigError, match="both become the Dagster name 'product_swap'"):
        discover_projects(projects, projects.parent)


@pytest.mark.parametrize("key, what", [("tracker_project_name", "MLflow experiment"), ("output_dir", "output_dir")])
def test_two_projects_never_share_an_experiment_or_an_output_dir(projects, key, what):
    style = json.loads((projects / "style" / "config.json").read_text())
    swap_config = projects / "product-swap" / "config.json"
    swap = json.loads(swap_config.read_text())
    swap[key] = style[key]
    swap_config.write_text(json.dumps(swap))
    with pytest.raises(ConfigError, match=f"projects 'product-swap' and 'style' share the {what}.*give each project its own"):
        _defs(projects)


def test_a_broken_project_is_one_message_naming_its_file(projects):
    (projects / "style" / "config.json").write_text('{"learning_rat": 1}')
    with pytest.raises(ConfigError, match=r"(?s)style/config.json.*learning_rat.*did you mean 'learning_rate'"):
        _defs(projects)


def test_projects_and_a_single_config_together_are_refused(projects, monkeypatch):
    from qwen_edit_assets.projects import projects_from_env

    monkeypatch.setenv(PROJECTS_ENV, str(projects))
    monkeypatch.setenv("QWEN_EDIT_CONFIG", str(projects / "style" / "config.json"))
    with pytest.raises(ConfigError, match="both QWEN_EDIT_PROJECTS and QWEN_EDIT_CONFIG are set: use one"):
        projects_from_env()


def test_the_example_projects_folder_loads_and_pairs_on_the_demo_data(demo_root):
    """config/projects (README "Projects"): both examples build one code location and their data checks pass."""
    from tests.conftest import REPO
    from trainer.workflow import check_data

    found = discover_projects(REPO / "config" / "projects", demo_root)
    assert [p.name for p in found] == ["demo-style", "demo-sweep"]
    defs = build_definitions(projects=found)
    sweep = defs.resolve_assets_def(dg.AssetKey(["demo_sweep", "trained_lora"])).partitions_def.get_partition_keys()
    assert sweep == ["learning_rate=5e-4;lora_rank=4", "learning_rate=5e-4;lora_rank=8",
                     "learning_rate=1e-3;lora_rank=4", "learning_rate=1e-3;lora_rank=8"]
    for project in found:
        manifest, report = check_data(project.resource.load())
        assert not report.errors and len(manifest) > 0, project.name


def test_a_launchpad_override_of_a_swept_key_is_refused_before_training(projects):
    """A point trains its own values: learning_rate from the Launchpad on a learning_rate sweep is one Failure
    naming the key and the point (the trainer is never launched); a key the sweep leaves alone is not refused."""
    defs = _defs(projects)
    key = dg.AssetKey(["product_swap", "trained_lora"])
    run_config = {"ops": {"product_swap__trained_lora": {"config": {"learning_rate": 0.01}}}}
    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize(list(defs.assets), selection=[key], partition_key=POINTS[0], resources=defs.resources,
                                run_config=run_config, instance=instance, raise_on_error=False)
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.event_specific_data.error.message
    assert f"learning_rate: set by this partition's sweep point ({POINTS[0]}) and in the Launchpad" in message
    assert "Traceback" not in failure.event_specific_data.error.message
