"""Shared fixtures: a project root holding the tiny models and the demo dataset, built once."""

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")

REPO = Path(__file__).resolve().parent.parent


def worker_unit(nodeid: str) -> str:
    """What one pytest-xdist worker runs whole: all integration tests together (one `make ui` session serves
    several files), otherwise the test's module (its module fixtures, trained runs among them, built once)."""
    path = nodeid.split("::")[0]
    return "integration" if path.startswith("tests/integration/") else path


def pytest_collection_modifyitems(config, items):
    """Alone: integration tests (real servers, a browser) run after everything else, so unit failures show up first.
    Under pytest-xdist (`make test` runs `-n 2`) the integration unit, the longest, goes first instead, while the
    other worker takes the modules."""
    parallel = hasattr(config, "workerinput")
    for item in items:  # worker_unit reads the path: every integration test must live in tests/integration/
        if (item.get_closest_marker("integration") is not None) != (worker_unit(item.nodeid) == "integration"):
            raise pytest.UsageError(f"{item.nodeid}: integration tests are those in tests/integration/ and only those")
    items.sort(key=lambda item: (item.get_closest_marker("integration") is not None) != parallel)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadgroup` scheduled by worker_unit, in collection order (integration first).

    Not xdist's own loadgroup: it reads xdist_group marks into a node-id suffix that pytest 9.2's node ids no
    longer take, so every test became its own unit and both workers started their own `make ui` session and
    built each module's fixtures again. The controller sees only node ids, hence a path rule."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class WorkerUnits(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return worker_unit(nodeid)

    config.option.loadscopereorder = False  # by size it would put the integration unit (25 tests) 8th
    return WorkerUnits(config, log)


@pytest.fixture(scope="module")
def one_torch_thread():
    """The tiny model's ops run faster on one thread than on two when other processes compete for this
    machine's two cores: a module asks for it with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """tmp/demo/{models/tiny-edit-v1..v3, data/} exactly as `qwen-edit demo-setup` writes them."""
    from trainer.cli import ensure_demo

    root = tmp_path_factory.mktemp("project")
    ensure_demo(root)
    return root


@pytest.fixture
def isolated_mlflow(tmp_path, monkeypatch):
    """A throwaway MLflow store: the trainer honours MLFLOW_TRACKING_URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def write_small_project(root: Path, models: Path, flavour: str = "edit-v2", n_train: int = 4, n_eval: int = 1, **config) -> tuple[Path, Path]:
    """A config.json + multidatabackend.json over a fresh small demo dataset under `root`."""
    import json

    from trainer.demo.dataset import generate_demo_dataset

    data = generate_demo_dataset(root / "data", n_train=n_train, n_eval=n_eval, size=32)
    n_refs = 1 if flavour == "edit-v1" else 3
    folders = ["reference", "reference_2", "reference_3"][:n_refs]
    entries = []
    for split, edit_id in (("train", "edits"), ("eval", "eval")):
        refs = [f"{edit_id}-{folder}" for folder in folders]
        entries.append({"id": edit_id, "instance_data_dir": str(data.folder(split, "edited")), "resolution": 32,
                        "conditioning_data": refs, "cache_dir_vae": str(root / "cache" / "vae" / edit_id)})
        entries += [{"id": ref, "dataset_type": "conditioning", "instance_data_dir": str(data.folder(split, folder))}
                    for ref, folder in zip(refs, folders)]
    settings = {
        "model_flavour": flavour,
        "pretrained_model_name_or_path": str(models / f"tiny-{flavour}"),
        "output_dir": str(root / "out"),
        "max_train_steps": 4,
        "learning_rate": 1e-3,
        "lora_rank": 4,
        "mixed_precision": "no",
        "eval_dataset_id": "eval",
        "validation_resolution": "32x32",
        "validation_num_inference_steps": 2,
        "report_to": "none",
        **({"model_kwargs": {"match_target_res": True}} if flavour != "edit-v1" else {}),
        **config,
    }
    (root / "config.json").write_text(json.dumps(settings, indent=1))
    (root / "multidatabackend.json").write_text(json.dumps(entries, indent=1))
    return root / "config.json", root / "multidatabackend.json"


def prepare_small_project(root: Path, demo_root: Path, **config):
    """A small project with its manifest checked and its caches encoded: ready to train.

    The demo data is generated bit-identically from its seed, so the caches this session already encoded for
    the same dataset are copied in first (CI time: most training tests share one dataset). The real cache pass
    then runs as before: it checks every copied file's fingerprint (image bytes, caption, model, settings) and
    encodes whatever does not match, so each test gets exactly the caches a fresh encode gives it."""
    import shutil

    from trainer.data.caches import build_text_cache, build_vae_cache
    from trainer.workflow import check_data, load_project

    config_path, data_path = write_small_project(root, demo_root / "demo" / "models", **config)
    project = load_project(config_path, data_path, root)
    manifest, _ = check_data(project)
    shape = {key: config.get(key, default) for key, default in (("flavour", "edit-v2"), ("n_train", 4), ("n_eval", 1))}
    template = demo_root.parent / ("encoded-caches-" + "-".join(str(v) for v in shape.values()))
    if template.is_dir() and not (root / "cache").exists():
        shutil.copytree(template, root / "cache")
    build_text_cache(manifest, project.dataset_config, project.config)
    build_vae_cache(manifest, project.dataset_config, project.config)
    if not template.exists() and (root / "cache").is_dir():
        staging = template.with_name(f".{template.name}.{os.getpid()}")
        shutil.copytree(root / "cache", staging)
        staging.rename(template)  # whole or not at all
    return project


# --- promotion (MLflow Model Registry): one project trained three times, each run registered and promoted ---

# the second made worse on purpose (learning rate 0: the LoRA stays zero, its edits are the base's), the third
# better than the first (lora_latent_mse, seeded: 1.42401, 1.42415, 1.42258 on the tiny edit-v2 model)
PROMOTION_RUNS = (("first", {"learning_rate": 1e-3}), ("worse", {"learning_rate": 0.0}), ("better", {"learning_rate": 1e-2}))


@contextmanager
def tracking_uri_env(uri: str):
    """MLFLOW_TRACKING_URI set to `uri` for the block (the trainer and tracking_uri() read it), restored after."""
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield uri
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI") if saved is None else os.environ.__setitem__("MLFLOW_TRACKING_URI", saved)


def train_and_promote(project, run_name: str, uri: str, **settings):
    """What `qwen-edit train` does after the data check and caches, in this process: train `project` (with
    `settings`) in its run folder `run_name`, validate, log the report to the MLflow run, register and promote.
    Returns the Promotion and the registered model's aliases right after it ({alias: version})."""
    from dataclasses import replace

    from mlflow.tracking import MlflowClient

    from trainer.evaluation.validation import log_to_mlflow, run_validation
    from trainer.run_folders import point_latest
    from trainer.tracking.registry import promote_run
    from trainer.training.recipe import run_training
    from trainer.workflow import load_manifest

    with tracking_uri_env(uri):
        run = project.for_run(run_name)
        run = replace(run, config=run.config.model_copy(update=settings))
        result = run_training(run.config, run.dataset_config, project.manifest_path, run.root, tags={"team": "tests"})
        point_latest(run.runs_dir, run.output_dir)  # as trainer.train does after training
        report = run_validation(run.config, load_manifest(project), run.lora_dir, run.validation_dir)
        log_to_mlflow(report, result.mlflow_run_id, uri, step=result.steps)
        promotion = promote_run(run.output_dir, run.config, uri)
    aliases = {alias: str(version) for alias, version in MlflowClient(uri).get_registered_model(promotion.model_name).aliases.items()}
    return promotion, aliases


@dataclass
class PromotedRuns:
    project: object  # trainer.workflow.Project (report_to mlflow)
    uri: str
    steps: list  # (Promotion, aliases after it) per PROMOTION_RUNS entry


@pytest.fixture(scope="session")
def promoted_runs(demo_root, tmp_path_factory) -> PromotedRuns:
    """PROMOTION_RUNS of one small edit-v2 project on an embedded sqlite store, in order."""
    base = tmp_path_factory.mktemp("promotion")
    uri = f"sqlite:///{base / 'mlflow.db'}"
    with tracking_uri_env(uri):
        project = prepare_small_project(base / "project", demo_root, report_to="mlflow", tracker_project_name="promotion-demo")
    return PromotedRuns(project, uri, [train_and_promote(project, name, uri, **settings) for name, settings in PROMOTION_RUNS])
