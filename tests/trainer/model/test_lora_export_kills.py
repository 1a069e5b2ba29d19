"""kill -9 during the LoRA export (a forked process kills itself at each named point): every file
under its final name is complete, the earlier export's or the new one's, never a part of one."""

import multiprocessing
import os
import signal

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file

from trainer.model.flavours import get_flavour
from trainer.model.lora import COMFYUI_WEIGHTS_NAME, LORA_WEIGHTS_NAME, save_lora

KEY = "transformer_blocks.0.attn.to_q.lora_A.weight"


def _layers(value: float) -> dict[str, torch.Tensor]:
    return {KEY: torch.full((4, 32), value), KEY.replace("lora_A", "lora_B"): torch.full((32, 4), value)}


def _save(out, value: float) -> None:
    metadata = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q"]).to_dict()
    save_lora(get_flavour("edit-v2").pipeline_cls(), _layers(value), metadata, out)


def _export_killed_at(out, point: str) -> int:
    def child():
        os.environ["QWEN_EDIT_KILL_AT"] = point
        _save(out, 2.0)
        os._exit(0)

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join(120)
    return process.exitcode


def _value(path) -> float:
    (value,) = [v for k, v in load_file(str(path)).items() if k.endswith(KEY)]  # a truncated file would not load
    return float(value.flatten()[0])


@pytest.mark.parametrize("point, diffusers, comfyui", [("lora.diffusers_written", 1.0, 1.0), ("lora.before_comfyui", 2.0, 1.0)])
def test_an_export_killed_midway_leaves_whole_files(tmp_path, point, diffusers, comfyui):
    _save(tmp_path, 1.0)  # the export of an earlier run
    assert _export_killed_at(tmp_path, point) == -signal.SIGKILL
    assert _value(tmp_path / LORA_WEIGHTS_NAME) == diffusers
    assert _value(tmp_path / COMFYUI_WEIGHTS_NAME) == comfyui
