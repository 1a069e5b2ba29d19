"""edit-2.1 through the command line: `qwen-edit check` and `qwen-edit train` (2 steps) on the tiny
Qwen-Image-2.1 model, four references a sample; the LoRA it exports loads into a fresh
`QwenImage21Pipeline` with `load_lora_weights` and changes the edit."""

import json

import numpy as np
import pytest
import torch
from diffusers import QwenImage21Pipeline
from PIL import Image

from trainer.cli import main
from trainer.demo.dataset import generate_demo_dataset

N_REFS = 4  # more than edit-v2/v3 take: the manifest's reference_4 column, the caches and training use it


def write_project(root, models) -> tuple:
    data = generate_demo_dataset(root / "data", n_train=2, n_eval=1, size=32)
    folders = ["reference", "reference_2", "reference_3", "reference"]
    entries = []
    for split, edit_id in (("train", "edits"), ("eval", "eval")):
        refs = [f"{edit_id}-ref{i + 1}" for i in range(N_REFS)]
        entries.append({"id": edit_id, "instance_data_dir": str(data.folder(split, "edited")), "resolution": 32,
                        "conditioning_data": refs})
        entries += [{"id": ref, "dataset_type": "conditioning", "instance_data_dir": str(data.folder(split, folder))}
                    for ref, folder in zip(refs, folders)]
    config = {
        "model_flavour": "edit-2.1", "pretrained_model_name_or_path": str(models / "tiny-edit-2.1"),
        "output_dir": str(root / "out"), "max_train_steps": 2, "learning_rate": 1e-2, "lora_rank": 4,
        "mixed_precision": "no", "eval_dataset_id": "eval", "validation_resolution": "32x32",
        "validation_num_inference_steps": 2, "report_to": "none",
    }
    (root / "config.json").write_text(json.dumps(config, indent=1))
    (root / "multidatabackend.json").write_text(json.dumps(entries, indent=1))
    return root / "config.json", root / "multidatabackend.json", data


def edit(pipe, references) -> torch.Tensor:
    with torch.no_grad():
        return pipe(prompt="make it blue", image=references, height=32, width=32, output_resolution=32, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(0), output_type="latent").images


@pytest.mark.slow
def test_check_then_train_two_steps_and_the_lora_loads_into_qwen_image_21(demo_root, tmp_path, capsys):
    config, data_config, data = write_project(tmp_path, demo_root / "demo" / "models")
    args = ["--config", str(config), "--data", str(data_config), "--root", str(tmp_path)]
    assert main(["check", *args]) == 0
    checked = capsys.readouterr().out
    assert "samples: {'train': 2, 'eval': 1}" in checked and "predicted GPU memory" in checked

    assert main(["train", *args, "--run-name", "v21"]) == 0
    out = tmp_path / "out" / "v21"
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 2 and np.isfinite(summary["final_loss_mean_last_10pct"])
    manifest = json.loads((out / "pairing_manifest.json").read_text())
    assert manifest[0]["n_references"] == N_REFS and manifest[0]["reference_4"].endswith("reference/0000.png")
    report = json.loads((out / "validation" / "report.json").read_text())
    assert [row["name"] for row in report["rows"]] == ["0000"] and "lora_latent_mse" in report["summary"]
    with Image.open(report["rows"][0]["lora_image"]) as image:
        assert image.mode == "RGBA" and image.size == (32, 32)  # Qwen-Image-2.1 decodes RGBA

    lora_dir = out / "lora"
    pipe = QwenImage21Pipeline.from_pretrained(demo_root / "demo" / "models" / "tiny-edit-2.1")
    pipe.set_progress_bar_config(disable=True)
    references = [Image.open(data.folder("eval", folder) / "0000.png") for folder in ("reference", "reference_2")]
    base = edit(pipe, references)
    pipe.load_lora_weights(str(lora_dir), use_safetensors=True)
    with_lora = edit(pipe, references)
    assert not torch.allclose(base, with_lora, atol=1e-5)  # the adapter changes the edit
    # the ComfyUI-keyed copy loads into diffusers as the same adapter
    pipe.unload_lora_weights()
    torch.testing.assert_close(edit(pipe, references), base)
    pipe.load_lora_weights(str(lora_dir), weight_name="pytorch_lora_weights_comfyui.safetensors", use_safetensors=True)
    torch.testing.assert_close(edit(pipe, references), with_lora)
