"""Training on a quantised base: the LoRA wraps optimum-quanto layers and exports for a full-precision pipeline."""

import pytest
import torch

from tests.conftest import prepare_small_project
from trainer.errors import ConfigError
from trainer.model.lora import LORA_WEIGHTS_NAME
from trainer.training.recipe import run_training

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("precision", ["int8-quanto", "fp8-quanto", "int4-quanto", "int2-quanto"])
def test_each_quanto_precision_trains_and_its_lora_loads_into_an_unquantised_pipeline(precision, demo_root, tmp_path):
    from diffusers import QwenImageEditPlusPipeline
    from optimum.quanto import QLinear

    from trainer.model.loading import load_transformer
    from trainer.model.quantization import quantize_transformer

    project = prepare_small_project(tmp_path, demo_root, base_model_precision=precision, quantize_via="cpu", max_train_steps=3)
    probe = load_transformer(project.config, torch.float32)
    quantize_transformer(probe, project.config, torch.device("cpu"))
    assert isinstance(probe.transformer_blocks[0].attn.to_q, QLinear)
    assert not isinstance(probe.proj_out, QLinear)  # the edges stay full precision

    result = run_training(project.config, project.dataset_config, project.manifest_path, project.root, tags={})
    assert result.steps == 3 and torch.isfinite(torch.tensor(result.loss_history)).all()

    pipe = QwenImageEditPlusPipeline.from_pretrained(project.config.model_path)
    pipe.set_progress_bar_config(disable=True)
    assert not any(isinstance(m, QLinear) for m in pipe.transformer.modules())
    image = __import__("trainer.data.images", fromlist=["load_rgb"]).load_rgb(tmp_path / "data" / "eval" / "reference" / "0000.png")

    def edit():
        return pipe(image=[image], prompt="make the circle red", height=32, width=32, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(0), output_type="latent").images

    before = edit()
    pipe.load_lora_weights(str(project.lora_dir), weight_name=LORA_WEIGHTS_NAME)
    assert not torch.allclose(before, edit(), atol=1e-5)


def test_nf4_needs_a_cuda_gpu(demo_root, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the refusal is for CPU-only machines")
    from trainer.model.loading import load_transformer

    project = prepare_small_project(tmp_path, demo_root, base_model_precision="nf4-bnb", max_train_steps=1)
    with pytest.raises(ConfigError, match="nf4-bnb' needs a CUDA GPU"):
        load_transformer(project.config, torch.float32)


def test_quantising_on_the_accelerator_block_by_block_gives_the_weights_of_a_whole_model_pass(demo_root):
    """quantize_via 'accelerator' moves one block at a time (a 24 GB card never holds the bf16 model);
    the result must be what quantising the whole model at once gives ('cpu' does that)."""
    from optimum.quanto import QLinear

    from trainer.config.parsing import parse_train_config
    from trainer.model.loading import load_transformer
    from trainer.model.quantization import quantize_transformer

    model = str(demo_root / "demo" / "models" / "tiny-edit-v2")
    models = {}
    for via in ("cpu", "accelerator"):
        config = parse_train_config({"model_flavour": "edit-v2", "pretrained_model_name_or_path": model,
                                     "base_model_precision": "int8-quanto", "quantize_via": via})
        models[via] = load_transformer(config, torch.float32)
        quantize_transformer(models[via], config, torch.device("cpu"))
    whole, blockwise = (dict(m.named_modules()) for m in (models["cpu"], models["accelerator"]))
    quantised = [name for name, module in whole.items() if isinstance(module, QLinear)]
    assert quantised == [name for name, module in blockwise.items() if isinstance(module, QLinear)]
    assert any(name.startswith("transformer_blocks.") for name in quantised)
    for name in quantised:
        assert torch.equal(whole[name].qweight.dequantize(), blockwise[name].qweight.dequantize()), name
