"""The exported LoRA: diffusers format with adapter metadata, and the same weights in ComfyUI's keys."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.conftest import prepare_small_project
from trainer.data.images import load_rgb
from trainer.errors import ConfigError
from trainer.model.lora import (
    COMFYUI_WEIGHTS_NAME,
    LORA_WEIGHTS_NAME,
    NOTE_KEY,
    USE_IN_KEY,
    add_lora,
    load_lora_state_dict,
    lora_state_dict,
)
from trainer.training.recipe import run_training

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(demo_root, tmp_path_factory):
    """rank 4 with alpha 8 (scale 2), so a loader that ignored alpha would give a different output."""
    root = tmp_path_factory.mktemp("lora")
    project = prepare_small_project(root, demo_root, lora_rank=4, lora_alpha=8, max_train_steps=3)
    run_training(project.config, project.dataset_config, project.manifest_path, project.root, tags={})
    return project


def _tiny_transformer_with_lora(rank: int, seed: int = 0):
    from trainer.demo.tiny_model import _transformer

    transformer = _transformer(zero_cond_t=False)
    add_lora(transformer, rank, float(rank), seed)
    return transformer


def test_a_fitting_lora_state_loads():
    source, target = _tiny_transformer_with_lora(4, seed=1), _tiny_transformer_with_lora(4, seed=2)
    load_lora_state_dict(target, lora_state_dict(source))
    for key, value in lora_state_dict(source).items():
        torch.testing.assert_close(lora_state_dict(target)[key], value)


def test_a_lora_of_another_rank_is_refused_naming_the_checkpoint_and_the_fix():
    target = _tiny_transformer_with_lora(4)
    with pytest.raises(ConfigError) as refused:
        load_lora_state_dict(target, lora_state_dict(_tiny_transformer_with_lora(2)), source="checkpoint out/checkpoint-5")
    message = str(refused.value)
    assert message.startswith("checkpoint out/checkpoint-5 does not fit")
    assert "(2, " in message and "(4, " in message and "another lora_rank" in message
    assert "resume_from_checkpoint" in message


def test_a_lora_with_foreign_or_missing_layers_is_refused():
    state = lora_state_dict(_tiny_transformer_with_lora(4))
    first = sorted(state)[0]
    foreign = {**state, "transformer_blocks.9.attn.to_q.lora_A.weight": state[first]}
    with pytest.raises(ConfigError, match="1 layer\\(s\\) the model has no LoRA for, e.g. transformer_blocks.9"):
        load_lora_state_dict(_tiny_transformer_with_lora(4), foreign)
    partial = {k: v for k, v in state.items() if k != first}
    with pytest.raises(ConfigError, match=f"1 of the model's LoRA layer\\(s\\) missing, e.g. {first}"):
        load_lora_state_dict(_tiny_transformer_with_lora(4), partial)


def test_diffusers_file_carries_rank_and_alpha(trained):
    import json

    with safe_open(str(trained.lora_dir / LORA_WEIGHTS_NAME), framework="pt") as handle:
        metadata = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert metadata["transformer.r"] == 4
    assert metadata["transformer.lora_alpha"] == 8


def test_each_file_says_in_its_metadata_where_to_use_it(trained):
    """ComfyUI reads no alpha from the diffusers file (scale 1.0, not 8/4 = 2): the file says to use the other one."""

    def metadata(name):
        with safe_open(str(trained.lora_dir / name), framework="pt") as handle:
            return handle.metadata()

    diffusers_file, comfyui_file = metadata(LORA_WEIGHTS_NAME), metadata(COMFYUI_WEIGHTS_NAME)
    assert diffusers_file[USE_IN_KEY].startswith("diffusers")
    assert f"for ComfyUI use {COMFYUI_WEIGHTS_NAME} (has .alpha)" in diffusers_file[NOTE_KEY]
    assert "8 / 4 = 2" in diffusers_file[NOTE_KEY]
    assert "lora_adapter_metadata" in diffusers_file  # diffusers' own metadata kept beside the note
    assert comfyui_file[USE_IN_KEY].startswith("ComfyUI")
    assert "alpha = 8" in comfyui_file[NOTE_KEY]


def test_comfyui_file_uses_diffusion_model_keys_with_alphas(trained):
    keys = load_file(trained.lora_dir / COMFYUI_WEIGHTS_NAME)
    assert all(k.startswith("diffusion_model.transformer_blocks.") for k in keys)
    alphas = {k: v for k, v in keys.items() if k.endswith(".alpha")}
    assert alphas and all(float(v) == 8.0 for v in alphas.values())
    assert len(alphas) * 2 == len(keys) - len(alphas)  # one alpha per A/B pair


def test_both_formats_load_into_diffusers_and_give_the_same_edit(trained):
    from diffusers import QwenImageEditPlusPipeline

    reference = load_rgb(trained.root / "data" / "eval" / "reference" / "0000.png")

    def edit(weight_name=None):
        pipe = QwenImageEditPlusPipeline.from_pretrained(trained.config.model_path)
        pipe.set_progress_bar_config(disable=True)
        if weight_name:
            pipe.load_lora_weights(str(trained.lora_dir), weight_name=weight_name)
        return pipe(image=[reference], prompt="make the square green", height=32, width=32, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(0), output_type="latent").images

    base, diffusers_format, comfyui_format = edit(), edit(LORA_WEIGHTS_NAME), edit(COMFYUI_WEIGHTS_NAME)
    assert not torch.allclose(base, diffusers_format, atol=1e-5)
    torch.testing.assert_close(comfyui_format, diffusers_format, rtol=1e-5, atol=1e-6)
