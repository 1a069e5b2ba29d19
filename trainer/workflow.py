"""The stages of a run, shared by the CLI and the Dagster assets: check -> cache -> train -> validate.

A `Project` is a loaded, validated config + dataset config with the folders they resolve to;
each stage is a plain function of it, so Dagster assets stay thin wrappers.
"""

import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from trainer.config.parsing import load_train_config
from trainer.config.schema import TrainConfig
from trainer.data.dataset_config import DatasetConfig, load_dataset_config
from trainer.data.pairing import PairingReport, build_manifest, read_manifest, write_manifest
from trainer.errors import ConfigError
from trainer.paths import check_inside_root, resolved_folder

EXAMPLES_DIR = Path(__file__).parent / "examples"
MANIFEST_NAME = "pairing_manifest.json"
ACCELERATE_CONFIG_ENV = "QWEN_EDIT_ACCELERATE_CONFIG"


@dataclass(frozen=True)
class Project:
    config: TrainConfig
    dataset_config: DatasetConfig
    config_path: Path
    data_path: Path
    root: Path  # relative paths, caches and mlruns/ live under it
    run_name: str | None = None  # set by for_run: output_dir is that run's folder under the configured one

    @property
    def output_dir(self) -> Path:
        return self.dataset_config.resolve(self.config.output_dir)

    @property
    def runs_dir(self) -> Path:
        """The configured output_dir, which holds the run folders and the `latest` link (trainer.run_folders)."""
        return self.output_dir.parent if self.run_name is not None else self.output_dir

    def for_run(self, folder: str) -> "Project":
        """This project writing into `output_dir/<folder>`; the MLflow run is named after the folder unless
        tracker_run_name names it."""
        if self.run_name is not None:
            raise ValueError(f"already the project of run {self.run_name!r}")
        update = {"output_dir": str(self.output_dir / folder), "tracker_run_name": self.config.tracker_run_name or folder}
        return replace(self, config=self.config.model_copy(update=update), run_name=folder)

    @property
    def notes(self) -> tuple[str, ...]:
        """SimpleTuner keys of either config that were read without effect."""
        return self.config.notes + self.dataset_config.notes

    @property
    def manifest_path(self) -> Path:
        return self.output_dir / MANIFEST_NAME

    @property
    def validation_dir(self) -> Path:
        return self.output_dir / "validation"

    @property
    def lora_dir(self) -> Path:
        return self.output_dir / "lora"


def load_project(config_path: Path, data_path: Path | None = None, root: Path | None = None, overrides: dict | None = None) -> Project:
    root = resolved_folder(Path(root or Path.cwd()), "project root")
    config_path = _under(root, Path(config_path))
    config = load_train_config(config_path, overrides)
    if data_path is None:
        if config.data_backend_config is None:
            raise ConfigError(f"{config_path}: set data_backend_config or pass --data multidatabackend.json")
        data_path = Path(config.data_backend_config)
    data_path = _under(root, Path(data_path))
    config = with_local_model_path(config, root)
    dataset_config = load_dataset_config(data_path, config.flavour, base_dir=root, defaults=config.dataset_defaults)
    check_inside_root(config, dataset_config, root, str(data_path))
    from trainer.model.adapters import check_adapter_config

    check_adapter_config(config, dataset_config.resolve)  # a bad lycoris_config fails `check`, its notes join the others
    if config.eval_dataset_id is not None:
        entry = dataset_config.by_id(config.eval_dataset_id)
        if entry.dataset_type != "image":
            raise ConfigError(f"{config_path}: eval_dataset_id {config.eval_dataset_id!r} must name an image dataset")
    return Project(config, dataset_config, config_path, data_path, root)


def with_local_model_path(config: TrainConfig, root: Path) -> TrainConfig:
    """A relative model path that exists under the root is a local folder; otherwise a Hub id."""
    local = root / config.model_path
    if not Path(config.model_path).is_absolute() and local.is_dir():
        return config.model_copy(update={"pretrained_model_name_or_path": str(local)})
    return config


def _under(root: Path, path: Path) -> Path:
    return path if path.is_absolute() else root / path


def example_paths(name: str) -> tuple[Path, Path]:
    """config.json and multidatabackend.json of a bundled preset, e.g. 'qwen_image.edit-v1-lora'."""
    folder = EXAMPLES_DIR / name
    if not folder.is_dir():
        from trainer.errors import suggest

        raise ConfigError(f"no example {name!r}; {suggest(name, [p.name for p in EXAMPLES_DIR.iterdir() if p.is_dir()])}")
    return folder / "config.json", folder / "multidatabackend.json"


def check_data(project: Project) -> tuple[pd.DataFrame, PairingReport]:
    """Build and validate the pairing manifest; raises PairingError listing every bad file."""
    manifest, report = build_manifest(project.dataset_config, project.config.flavour, project.config.eval_dataset_id)
    write_manifest(manifest, project.manifest_path)
    return manifest, report


def load_manifest(project: Project) -> pd.DataFrame:
    return read_manifest(project.manifest_path)


CACHE_SUMMARY_NAME = "cache_summary.json"


def build_caches(project: Project, manifest: pd.DataFrame, overrides: dict | None = None, num_processes: int | None = None) -> dict:
    """Both caches (text embeddings, then VAE latents), their stats in output_dir/cache_summary.json.

    One process per visible GPU: with several, `accelerate launch -m trainer.cache` shares the manifest
    between them (trainer.data.cache_ranks); with one (or none) it runs here. Either way the encoders
    are freed before this returns: none of them is on the card while the transformer trains.
    """
    import torch

    from trainer.data.caches import CacheStats, build_text_cache, build_vae_cache

    processes = num_processes or max(1, torch.cuda.device_count())
    summary = project.output_dir / CACHE_SUMMARY_NAME
    if processes > 1:
        command = caching_command(project, processes, summary, overrides)
        done = subprocess.run(command, env=training_env(project), cwd=project.root)
        if done.returncode != 0:  # its rank 0 printed the `error:` line
            from trainer.errors import QwenEditError

            raise QwenEditError(f"caching stopped (exit status {done.returncode}, its message is above)")
        return {kind: CacheStats.from_json(stats) for kind, stats in json.loads(summary.read_text())["caches"].items()}
    stats = {"text": build_text_cache(manifest, project.dataset_config, project.config),
             "vae": build_vae_cache(manifest, project.dataset_config, project.config)}
    write_cache_summary(summary, stats, processes=1)
    return stats


def write_cache_summary(path: Path, stats: dict, processes: int) -> None:
    from trainer.io import atomic_write_json

    atomic_write_json(path, {"processes": processes, "caches": {kind: s.to_json() for kind, s in stats.items()}})


def caching_command(project: Project, processes: int, summary: Path, overrides: dict | None = None) -> list[str]:
    """`accelerate launch` of `trainer.cache` on `processes` processes (one per GPU; on a machine without
    one, CPU processes over gloo: trainer.data.cache_ranks)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--num_processes", str(processes),
               "--num_machines", "1", "--dynamo_backend", "no", "--mixed_precision", "no", "--multi_gpu",
               "-m", "trainer.cache", "--config", str(project.config_path), "--data", str(project.data_path),
               "--manifest", str(project.manifest_path), "--project-root", str(project.root), "--summary", str(summary)]
    if project.run_name is not None:
        command += ["--run-name", project.run_name]
    for key, value in (overrides or {}).items():  # as training_command writes them
        command += ["--set", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    return command


def new_run(project: Project, run_name: str) -> Project:
    """The project of a new training run: its own folder under output_dir (trainer.run_folders), or the
    folder of the interrupted run of that name when the config resumes (`resume_from_checkpoint`)."""
    from trainer.run_folders import choose_run_dir

    folder = choose_run_dir(project.output_dir, run_name, resuming=project.config.resume_from_checkpoint is not None)
    return project.for_run(folder.name)


def keep_manifest(run: Project, manifest_path: Path) -> Path:
    """A copy of the manifest the run trains on, in its folder: a later data check cannot change it."""
    import shutil

    from trainer.io import atomic_write_with

    return atomic_write_with(run.manifest_path, lambda tmp: shutil.copyfile(manifest_path, tmp))


def training_command(
    project: Project, overrides: dict | None = None, tags: dict | None = None, num_processes: int | None = None
) -> list[str]:
    """`accelerate launch` of the training entry point, hyperparameters on the command line.

    One process per visible GPU (DDP when there are several), or, with QWEN_EDIT_ACCELERATE_CONFIG
    naming an accelerate config file (config/accelerate/ddp.yaml, fsdp.yaml), what that file says.
    """
    import torch

    gpus = torch.cuda.device_count()
    accelerate_config = os.environ.get(ACCELERATE_CONFIG_ENV)
    if accelerate_config:
        launch = accelerate_config_launch(Path(accelerate_config), gpus, num_processes)
    else:
        processes = num_processes or max(1, gpus)
        # --quiet: a failed process ends with its own message, not also accelerate's CalledProcessError traceback
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--num_processes", str(processes), "--num_machines", "1"]
        launch += ["--dynamo_backend", "no", "--mixed_precision", "no" if gpus == 0 else project.config.mixed_precision]
        launch += ["--cpu"] if gpus == 0 else (["--multi_gpu"] if processes > 1 else [])
    command = launch + [
        "-m", "trainer.train",
        "--config", str(project.config_path),
        "--data", str(project.data_path),
        "--manifest", str(project.manifest_path),
        "--project-root", str(project.root),
    ]
    if project.run_name is not None:
        command += ["--run-name", project.run_name]
    for key, value in (overrides or {}).items():
        # text and paths as they are, anything else as JSON, as parse_override reads it back: true, null (not True, None)
        text = str(value) if isinstance(value, (str, os.PathLike)) else json.dumps(value)
        command += ["--set", f"{key}={text}"]
    for key, value in (tags or {}).items():
        command += ["--tag", f"{key}={value}"]
    return command


def accelerate_config_launch(config_file: Path, gpus: int, num_processes: int | None = None) -> list[str]:
    """`accelerate launch --config_file`; unless the file fixes num_processes, one process per GPU on each of its machines."""
    import yaml

    if not config_file.is_file():
        raise ConfigError(f"{ACCELERATE_CONFIG_ENV}={config_file}: no such accelerate config file")
    settings = yaml.safe_load(config_file.read_text()) or {}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--config_file", str(config_file.resolve())]
    if num_processes or not settings.get("num_processes"):
        launch += ["--num_processes", str(num_processes or max(1, gpus) * int(settings.get("num_machines") or 1))]
    return launch


def training_env(project: Project) -> dict[str, str]:
    """The subprocess sees the project on its path and the same MLflow store as we do."""
    from trainer.tracking.store import tracking_uri

    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    env["MLFLOW_TRACKING_URI"] = tracking_uri(project.root)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # before CUDA starts: once an import has started it (bitsandbytes does), the recipe's own request is too late
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    return env


def run_training_subprocess(project: Project, overrides: dict | None = None, tags: dict | None = None) -> None:
    command = training_command(project, overrides, tags)
    print("$", shlex.join(command), flush=True)
    done = subprocess.run(command, env=training_env(project), cwd=project.root)
    if done.returncode != 0:  # the trainer printed its own `error:` line above
        from trainer.errors import QwenEditError

        raise QwenEditError(
            f"training stopped (exit status {done.returncode}, its message is above); the checkpoints under "
            f"{project.output_dir / 'checkpoints'} are kept"
        )
