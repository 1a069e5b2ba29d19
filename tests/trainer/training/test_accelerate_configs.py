"""config/accelerate/*.yaml: valid accelerate configs, picked up by training_command through QWEN_EDIT_ACCELERATE_CONFIG."""

from pathlib import Path

import pytest

from trainer.errors import ConfigError
from trainer.workflow import ACCELERATE_CONFIG_ENV, accelerate_config_launch

CONFIGS = Path(__file__).resolve().parents[3] / "config" / "accelerate"


@pytest.mark.parametrize("name, kind", [("ddp", "MULTI_GPU"), ("fsdp", "FSDP")])
def test_configs_load_as_accelerate_configs(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert config.distributed_type.value == kind
    assert config.num_processes == -1  # left to qwen-edit: GPUs x machines


def test_fsdp_wraps_the_qwen_image_transformer_blocks():
    import yaml
    from diffusers.models.transformers import transformer_qwenimage

    fsdp = yaml.safe_load((CONFIGS / "fsdp.yaml").read_text())["fsdp_config"]
    assert hasattr(transformer_qwenimage, fsdp["fsdp_transformer_layer_cls_to_wrap"])


def test_launch_takes_the_config_and_one_process_per_gpu_on_each_machine(tmp_path):
    multi_node = tmp_path / "two-nodes.yaml"
    multi_node.write_text((CONFIGS / "ddp.yaml").read_text().replace("num_machines: 1", "num_machines: 2"))
    launch = accelerate_config_launch(multi_node, gpus=4)
    assert launch[launch.index("--config_file") + 1] == str(multi_node.resolve())
    assert launch[launch.index("--num_processes") + 1] == "8"
    fixed = tmp_path / "fixed.yaml"
    fixed.write_text((CONFIGS / "ddp.yaml").read_text() + "num_processes: 3\n")
    assert "--num_processes" not in accelerate_config_launch(fixed, gpus=4)  # the file's own count stands


def test_training_command_uses_the_config_from_the_environment(demo_root, tmp_path, monkeypatch):
    from tests.conftest import write_small_project
    from trainer.workflow import load_project, training_command

    config, data = write_small_project(tmp_path, demo_root / "demo" / "models")
    project = load_project(config, data, tmp_path)
    monkeypatch.setenv(ACCELERATE_CONFIG_ENV, str(CONFIGS / "ddp.yaml"))
    command = training_command(project, {"max_train_steps": 2})
    assert command[command.index("--config_file") + 1] == str(CONFIGS / "ddp.yaml")
    assert "--multi_gpu" not in command and "--cpu" not in command  # the file decides
    assert command[command.index("-m", 3) + 1] == "trainer.train"
    monkeypatch.setenv(ACCELERATE_CONFIG_ENV, str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="missing.yaml"):
        training_command(project)


@pytest.mark.parametrize(
    "setting, key",
    [
        ({"base_model_precision": "int8-quanto"}, "base_model_precision"),
        ({"use_ema": True}, "use_ema"),
        ({"validation_step_interval": 10}, "validation_step_interval"),
        ({"offload_optimizer_state": True}, "offload_optimizer_state"),
    ],
)
def test_fsdp_refuses_what_cannot_run_sharded_naming_the_key_and_the_way_out(setting, key):
    from trainer.config.schema import TrainConfig
    from trainer.training.distributed import check_fsdp_config

    check_fsdp_config(TrainConfig())  # the defaults shard
    with pytest.raises(ConfigError, match=rf"^{key} .*ddp\.yaml"):
        check_fsdp_config(TrainConfig(**setting))


def test_fsdp_where_accelerate_cannot_shard_is_refused_rather_than_run_unsharded():
    """accelerate 1.15 keeps FSDP for GPUs: a CPU process asked for FSDP would otherwise train plain data parallel."""
    import os
    import subprocess
    import sys

    probe = "from trainer.config.schema import TrainConfig; from trainer.training.distributed import make_accelerator; make_accelerator(TrainConfig())"
    env = {**os.environ, "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, cwd=CONFIGS.parents[1])
    assert run.returncode != 0
    assert "ConfigError: the accelerate config asks for FSDP" in run.stderr and "ddp.yaml" in run.stderr, run.stderr[-2000:]
