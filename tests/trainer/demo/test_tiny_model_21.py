"""`tiny-model --flavour edit-2.1`: Qwen-Image-2.1's real classes, tiny, in the diffusers layout."""

import json
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLQwenImage21, FlowMatchEulerDiscreteScheduler, QwenImage21Pipeline, QwenImage21Transformer2DModel
from PIL import Image
from transformers import Qwen3VLForConditionalGeneration, Qwen3VLProcessor

from trainer.demo.tiny_model import MARKER_FILE


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Built by the command's own entry point, in this process (a subprocess costs ~40 s of imports here)."""
    from trainer.cli import main

    out = tmp_path_factory.mktemp("tiny21") / "tiny-edit-2.1"
    assert main(["tiny-model", str(out), "--flavour", "edit-2.1"]) == 0
    return out


def test_the_folder_loads_as_qwen_image_21_with_its_real_classes(folder):
    pipe = QwenImage21Pipeline.from_pretrained(folder)
    assert type(pipe.transformer) is QwenImage21Transformer2DModel
    assert type(pipe.vae) is AutoencoderKLQwenImage21
    assert type(pipe.text_encoder) is Qwen3VLForConditionalGeneration
    assert type(pipe.processor) is Qwen3VLProcessor
    assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler
    assert json.loads((folder / MARKER_FILE).read_text())["flavour"] == "edit-2.1"
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "QwenImage21Pipeline"
    # the sizes that must agree for the pipeline to run at all
    transformer, vae, text = pipe.transformer.config, pipe.vae.config, pipe.text_encoder.config
    assert transformer.in_channels == transformer.out_channels == vae.z_dim == 64 == len(vae.latents_mean)
    assert transformer.context_in_dim == text.text_config.hidden_size == text.vision_config.out_hidden_size
    assert sum(transformer.axes_dims_rope) == transformer.attention_head_dim and transformer.causal_condition
    assert pipe.processor.image_processor.patch_size * pipe.processor.image_processor.merge_size == 32
    assert pipe.vae_scale_factor == 16 and vae.in_channels == vae.out_channels == 4  # RGBA in and out
    # the system turn the pipeline drops, as its chat template renders it
    system = "<|im_start|>system\nComprehend and analyze the provided prompt.<|im_end|>\n"
    assert pipe._drop_idx == len(pipe.processor.tokenizer(system).input_ids)


def test_the_pipeline_edits_with_two_references_into_an_rgba_image(folder):
    pipe = QwenImage21Pipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    references = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)) for i in range(2)]
    image = pipe(prompt="make it blue", image=references, height=32, width=32, output_resolution=32,
                 num_inference_steps=1, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.mode == "RGBA" and image.size == (32, 32)
