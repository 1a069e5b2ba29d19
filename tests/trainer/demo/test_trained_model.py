"""The shipped trained demo pipeline (`trainer/demo/trained_model.py`) and what the demo's LoRA does on top of it."""

import json
import subprocess
import sys
from dataclasses import asdict

import pytest
from diffusers import AutoencoderKLQwenImage, QwenImageEditPlusPipeline, QwenImageTransformer2DModel

from trainer.demo import pretrain
from trainer.demo.trained_model import DEMO_NAME, MARKER_FILE, SHIPPED, install_trained_pipeline, shipped_report

# What the edit-v2 preset's 120-step LoRA must achieve on the demo's eval split over its base, in dB
# (measured: edit success 4.2 -> 18.5, PSNR 10.2 -> 20.6, preservation 15.5 -> 22.3 on a 2-core CPU).
EDIT_SUCCESS_MARGIN = 8.0
PSNR_MARGIN = 5.0


def test_the_shipped_pipeline_is_what_the_script_builds_by_default():
    """One budget: the script's defaults are the ones the shipped weights were built with, so
    `python -m trainer.demo.pretrain OUT --device cuda` rebuilds them."""
    report = shipped_report()
    assert report["budget"] == asdict(pretrain.Budget()) and report["seed"] == 0 and report["flavour"] == "edit-v2"
    assert report["base_edits"]["recolour"]["edit_success"] < 10  # the held-out edit: the base does not do it


def test_it_loads_through_from_pretrained_as_the_real_classes(tmp_path):
    pipe = QwenImageEditPlusPipeline.from_pretrained(install_trained_pipeline(tmp_path / DEMO_NAME), use_safetensors=True)
    assert isinstance(pipe.transformer, QwenImageTransformer2DModel) and isinstance(pipe.vae, AutoencoderKLQwenImage)
    assert pipe.transformer.config.num_attention_heads == pretrain.Budget().heads


def test_installing_copies_once_and_replaces_a_different_copy(tmp_path):
    out = install_trained_pipeline(tmp_path / DEMO_NAME)
    weights = out / "transformer" / "diffusion_pytorch_model.safetensors"
    assert weights.read_bytes() == (SHIPPED / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    stamp = weights.stat().st_mtime_ns
    install_trained_pipeline(out)
    assert weights.stat().st_mtime_ns == stamp  # the same pipeline is left alone
    (out / MARKER_FILE).write_text(json.dumps({"seed": 1}))
    install_trained_pipeline(out)
    assert json.loads((out / MARKER_FILE).read_text()) == shipped_report()
    assert sorted(p.name for p in tmp_path.iterdir()) == [DEMO_NAME]  # no staging folder left behind


@pytest.mark.slow
def test_the_demo_lora_performs_the_held_out_edit_the_base_does_not(demo_root):
    """The bundled edit-v2 preset, whole (120 steps), as `make demo` trains it: on the eval split the LoRA
    recolours the shape (edit success and PSNR up by the margins) and keeps the rest at least as well."""
    result = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "train", "example=qwen_image.edit-v2-lora",
         "--set", "output_dir=outputs/demo-margin", "--set", "report_to=none"],
        cwd=demo_root, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((demo_root / "outputs" / "demo-margin" / "latest" / "validation" / "report.json").read_text())["summary"]
    assert summary["lora_edit_success"] >= summary["base_edit_success"] + EDIT_SUCCESS_MARGIN, summary
    assert summary["lora_psnr"] >= summary["base_psnr"] + PSNR_MARGIN, summary
    assert summary["lora_preservation"] >= summary["base_preservation"], summary
