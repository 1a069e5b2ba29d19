"""LoKr, LoHa and DoRA through the real recipe on the tiny model: two steps, a checkpoint, a resume, the export,
and a fresh unquantised pipeline loading each file the way diffusers 0.42.1 can (README "Adapters")."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import prepare_small_project
from tests.trainer.model.test_adapters import _effective_weight, comfyui_patched_weight
from trainer.config.schema import TrainConfig
from trainer.data.images import load_rgb
from trainer.model.adapters import ADAPTER_KEY, file_adapter_kind, load_adapter
from trainer.model.lora import COMFYUI_WEIGHTS_NAME, LORA_WEIGHTS_NAME
from trainer.training.recipe import run_training

pytestmark = pytest.mark.slow

ADAPTERS = {
    "lokr": {"lora_type": "lycoris", "lycoris": {"algo": "lokr", "multiplier": 1.0, "linear_dim": 2, "linear_alpha": 1, "factor": 4,
                                                 "apply_preset": {"target_module": ["Attention", "FeedForward"]}}},
    "loha": {"lora_type": "lycoris", "lycoris": {"algo": "loha", "multiplier": 1.0, "linear_dim": 2, "linear_alpha": 4}},
    "dora": {"use_dora": True, "lora_rank": 2, "lora_alpha": 4},
}


@pytest.fixture(scope="module")
def project(demo_root, tmp_path_factory):
    """One small edit-v2 project with its caches; each adapter trains into its own output_dir."""
    return prepare_small_project(tmp_path_factory.mktemp("adapters"), demo_root, max_train_steps=2, checkpointing_steps=1)


def _config(project, kind: str, out: str, **extra) -> TrainConfig:
    settings = {k: v for k, v in ADAPTERS[kind].items() if k != "lycoris"}
    if "lycoris" in ADAPTERS[kind]:
        path = project.root / f"{kind}.json"
        path.write_text(json.dumps(ADAPTERS[kind]["lycoris"]))
        settings["lycoris_config"] = str(path)
    raw = {**project.config.model_dump(), **settings, "output_dir": str(project.root / out), **extra}
    return TrainConfig.model_validate(raw)


@pytest.fixture(scope="module")
def trained(project):
    """kind -> (config, its output folder), each trained two steps with a checkpoint after the first."""
    runs = {}
    for kind in ADAPTERS:
        config = _config(project, kind, f"out-{kind}")
        run_training(config, project.dataset_config, project.manifest_path, project.root, tags={})
        runs[kind] = (config, project.root / f"out-{kind}")
    return runs


@pytest.fixture(scope="module")
def small_references():
    """The pipeline resizes references to ~1 MP for the VAE (seconds a call on the tiny model): 32² here, for
    the base and the adapted edit alike."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as module

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "VAE_IMAGE_SIZE", 32 * 32)
        patch.setattr(module, "CONDITION_IMAGE_SIZE", 64 * 64)
        yield


def _pipeline(project):
    from diffusers import QwenImageEditPlusPipeline

    pipe = QwenImageEditPlusPipeline.from_pretrained(project.config.model_path)  # unquantised, fresh
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _edit(project, pipe):
    reference = load_rgb(project.root / "data" / "eval" / "reference" / "0000.png")
    return pipe(image=[reference], prompt="make the square green", height=32, width=32, num_inference_steps=2,
                generator=torch.Generator().manual_seed(0), output_type="latent").images


@pytest.fixture(scope="module")
def base_edit(project, small_references):
    return _edit(project, _pipeline(project))


@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_each_adapter_trains_exports_and_changes_a_fresh_pipelines_edit(project, trained, base_edit, kind):
    config, out = trained[kind]
    folder = out / "lora"
    assert file_adapter_kind(folder / LORA_WEIGHTS_NAME) == kind
    saved = {k.removeprefix("transformer."): v for k, v in load_file(folder / LORA_WEIGHTS_NAME).items()}
    pipe = _pipeline(project)
    if kind == "dora":
        pipe.load_lora_weights(str(folder), use_safetensors=True)
    else:  # diffusers 0.42.1's Qwen pipelines refuse every key without "lora" in it: LoKr and LoHa load another way
        with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):
            pipe.load_lora_weights(str(folder), use_safetensors=True)
        load_adapter(pipe, folder)
    assert not torch.allclose(base_edit, _edit(project, pipe), atol=1e-5), f"the {kind} adapter changed nothing"
    from peft.utils import get_peft_model_state_dict

    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="default_0")
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    # the ComfyUI file: ComfyUI's arithmetic on it gives the weights the loaded adapter computes
    comfyui = load_file(folder / COMFYUI_WEIGHTS_NAME)
    layers = {n: m for n, m in pipe.transformer.named_modules() if hasattr(m, "get_base_layer") and hasattr(m, "scaling")}
    for name, layer in layers.items():
        weight = layer.get_base_layer().weight.detach().float()
        torch.testing.assert_close(comfyui_patched_weight(weight.clone(), comfyui, f"diffusion_model.{name}"),
                                   _effective_weight(layer).float(), rtol=1e-4, atol=1e-5, msg=name)
    if kind == "lokr":  # LyCORIS' own config travels with the weights, as SimpleTuner keeps it
        from safetensors import safe_open

        with safe_open(str(folder / LORA_WEIGHTS_NAME), framework="pt") as handle:
            assert json.loads(handle.metadata()["qwen_edit.lycoris_config"]) == ADAPTERS["lokr"]["lycoris"]
            assert handle.metadata()[ADAPTER_KEY] == "lokr"


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_the_validation_report_edits_with_the_lokr_and_loha_adapters(project, trained, small_references, kind):
    """Validation after training loads each file its own way (trainer.model.adapters.load_adapter)."""
    from trainer.data.pairing import read_manifest
    from trainer.evaluation.validation import run_validation

    config, out = trained[kind]
    report = run_validation(config, read_manifest(project.manifest_path), out / "lora", out / "validation")
    row = report.rows[0]
    assert row.lora_image and row.base_image and report.summary


@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_each_adapter_resumes_from_its_checkpoint_to_the_same_weights(project, trained, kind):
    _, out = trained[kind]
    checkpoint = out / "checkpoints" / "checkpoint-1"
    assert (checkpoint / "lora.safetensors").is_file()
    resumed = _config(project, kind, f"resumed-{kind}", resume_from_checkpoint=str(checkpoint))
    result = run_training(resumed, project.dataset_config, project.manifest_path, project.root, tags={})
    assert result.steps == 2  # the checkpoint's step-1 loss and this run's step 2
    assert not (project.root / f"resumed-{kind}" / "checkpoints" / "checkpoint-1").exists()  # step 1 was not trained again
    expected, actual = load_file(out / "lora" / LORA_WEIGHTS_NAME), load_file(project.root / f"resumed-{kind}" / "lora" / LORA_WEIGHTS_NAME)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert (expected[key] - actual[key]).abs().max() < 1e-6, key
