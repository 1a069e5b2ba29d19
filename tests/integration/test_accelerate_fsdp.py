"""config/accelerate/fsdp.yaml under Dagster Pipes: two sharded training processes (CPU, gloo), rank 0 alone reports.

accelerate shards only on GPUs; fsdp_on_cpu/sitecustomize.py lets it take its own FSDP2 path in CPU
processes here (see its docstring). The FSDP run resumes the step-2 checkpoint of a DDP run of the
same config and must end on that DDP run's own step-4 LoRA and optimiser state: loading a checkpoint
into shards, sharded steps (accumulation, clipping) and gathering for saving, checked at once.
"""

import shutil
import subprocess
from pathlib import Path

import dagster as dg
import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import prepare_small_project
from tests.integration.servers import REPO
from trainer.model.lora import LORA_WEIGHTS_NAME
from trainer.training.checkpoints import load_checkpoint
from trainer.workflow import ACCELERATE_CONFIG_ENV, training_command, training_env

pytestmark = pytest.mark.integration
STEPS, RESUMED_AT = 4, 2
SETTINGS = dict(
    max_train_steps=STEPS, checkpointing_steps=RESUMED_AT, resume_from_checkpoint="latest",
    gradient_accumulation_steps=2, max_grad_norm=0.01,  # one sample's gradient norm is about 0.05 here: clipping acts
)
FSDP_ON_CPU = Path(__file__).parent / "fsdp_on_cpu"


def on_this_cpu(name: str, folder: Path) -> Path:
    """The shipped accelerate config, on this machine's CPU: two processes over gloo."""
    settings = yaml.safe_load((REPO / "config" / "accelerate" / f"{name}.yaml").read_text())
    settings.update(use_cpu=True, num_processes=2)
    path = folder / f"{name}-cpu.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def train_with_ddp(project, output_dir: Path) -> None:
    command = training_command(project, {"output_dir": output_dir})
    run = subprocess.run(command, env=training_env(project), cwd=project.root, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]


def materialise_trained_lora(project, run_name: str):
    from qwen_edit_assets.assets.training import trained_lora_asset
    from qwen_edit_assets.resources import QwenEditProject

    resource = QwenEditProject(root=str(project.root), config_path=str(project.config_path), data_path=str(project.data_path))
    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize(
            [trained_lora_asset(resource)], instance=instance, raise_on_error=False,
            run_config={"ops": {"trained_lora": {"config": {"tracker_run_name": run_name}}}},
            resources={"project": resource, "pipes_subprocess_client": dg.PipesSubprocessClient()},
        )
        return result, [e.user_message for e in instance.all_logs(result.run_id)]


def assert_same_tensors(expected: dict, actual: dict) -> None:
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-7, msg=key)


def test_fsdp_resumes_a_ddp_checkpoint_and_ends_where_ddp_does(demo_root, tmp_path, monkeypatch):
    project = prepare_small_project(tmp_path, demo_root, **SETTINGS)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    monkeypatch.setenv(ACCELERATE_CONFIG_ENV, str(on_this_cpu("ddp", tmp_path)))
    ddp = tmp_path / "ddp-out"
    train_with_ddp(project, ddp)
    checkpoint = f"checkpoint-{RESUMED_AT}"
    # the folder of an interrupted run named "fsdp": the run of that name resumes it (resume_from_checkpoint: latest)
    project = project.for_run("fsdp")
    shutil.copytree(ddp / "checkpoints" / checkpoint, project.output_dir / "checkpoints" / checkpoint)

    monkeypatch.setenv(ACCELERATE_CONFIG_ENV, str(on_this_cpu("fsdp", tmp_path)))
    monkeypatch.setenv("PYTHONPATH", str(FSDP_ON_CPU))
    result, messages = materialise_trained_lora(project, "fsdp")

    failures = [e.event_specific_data.error.message for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert result.success, failures
    (materialization,) = result.asset_materializations_for_node("trained_lora")  # two reporting ranks would fail the run
    assert materialization.metadata["steps"].value == STEPS
    assert materialization.metadata["resumed_from"].value.endswith(checkpoint)
    started = [m for m in messages if "process(es)" in m]
    assert len(started) == 1 and "2 process(es), sharded by FSDP" in started[0], started  # rank 1 kept quiet

    lora = load_file(project.lora_dir / LORA_WEIGHTS_NAME)
    resumed = load_file(project.output_dir / "checkpoints" / checkpoint / "lora.safetensors")
    assert any(not torch.equal(value, resumed[key.removeprefix("transformer.")]) for key, value in lora.items())  # it trained
    assert_same_tensors(load_file(ddp / "lora" / LORA_WEIGHTS_NAME), lora)
    fsdp_state, ddp_state = (load_checkpoint(out / "checkpoints" / f"checkpoint-{STEPS}") for out in (project.output_dir, ddp))
    assert fsdp_state.optimizer["param_groups"] == ddp_state.optimizer["param_groups"]
    for index, slot in ddp_state.optimizer["state"].items():  # gathered to full tensors, in the same layout
        assert_same_tensors(slot, fsdp_state.optimizer["state"][index])
    assert_loads_into_the_pipeline(project, lora)


def assert_loads_into_the_pipeline(project, lora: dict) -> None:
    from peft.utils import get_peft_model_state_dict

    from trainer.model.loading import load_pipeline

    pipe = load_pipeline(project.config, torch.device("cpu"), torch.float32, text_encoder=False, vae=False)
    pipe.load_lora_weights(str(project.lora_dir), weight_name=LORA_WEIGHTS_NAME, adapter_name="trained")
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="trained")
    assert_same_tensors({k.removeprefix("transformer."): v for k, v in lora.items()}, loaded)
