"""fp8-native on a CUDA GPU: `torch._scaled_mm`'s row-wise fp8 kernels compute the numerics contract of
trainer/model/fp8_linear.py (the float32 product of the quantised operands, here rounded to bf16), and
a LoRA trained on the fp8 base loads into an unquantised pipeline.
"""

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="fp8 matmuls need an Ada/Hopper GPU"
)


@pytest.mark.parametrize("rows", [1, 77, 1300])
def test_scaled_mm_matches_the_float32_product_of_the_quantised_operands(rows):
    from trainer.model.fp8_linear import Fp8Linear, native_fp8

    cuda = torch.device("cuda")
    assert native_fp8(cuda)
    layer = Fp8Linear(torch.nn.Linear(512, 384).to(cuda, torch.bfloat16))
    results = {}
    for native in (True, False):
        layer.native = native
        x = torch.randn(rows, 512, device=cuda, generator=torch.Generator(cuda).manual_seed(0), requires_grad=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = layer(x)
        out.backward(torch.randn(out.shape, device=cuda, generator=torch.Generator(cuda).manual_seed(1)).to(out.dtype))
        results[native] = (out.float(), x.grad)
    (out, grad), (ref_out, ref_grad) = results[True], results[False]
    assert out.dtype == ref_out.dtype and grad.dtype == torch.float32
    for value, reference in ((out, ref_out), (grad, ref_grad)):
        assert float((value - reference).norm() / reference.norm()) < 4e-3  # bf16 output rounding, nothing more


def test_an_fp8_base_trains_a_lora_that_loads_into_an_unquantised_pipeline(tiny_model, tmp_path):
    from diffusers import QwenImageEditPlusPipeline
    from PIL import Image

    from tests.gpu.conftest import CUDA, a_sample, config_for
    from trainer.model.fp8_linear import Fp8Linear
    from trainer.model.loading import load_transformer
    from trainer.model.lora import adapter_metadata, add_lora, lora_state_dict, save_lora
    from trainer.model.quantization import quantize_transformer
    from trainer.training.distributed import make_optimizer
    from trainer.training.loss import flow_matching_loss

    config = config_for(tiny_model, base_model_precision="fp8-native", learning_rate=1e-2)
    transformer = load_transformer(config, torch.bfloat16)
    quantize_transformer(transformer, config, CUDA)
    transformer.to(CUDA)
    layers = [m for m in transformer.modules() if isinstance(m, Fp8Linear)]
    assert layers and all(m.native and m.weight.is_cuda for m in layers)
    params = add_lora(transformer, config.lora_rank, config.lora_scale_alpha, config.seed)
    optimizer = make_optimizer(config, params)
    sample, g = a_sample(), torch.Generator().manual_seed(1)
    sigma = torch.tensor([0.6], device=CUDA)
    noise = torch.randn((1, *sample.target.shape), generator=g).to(CUDA)
    losses = []
    for _ in range(30):  # one sample, one σ, one noise: the LoRA must fit it
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = flow_matching_loss(transformer, sample, sigma, noise, torch.bfloat16)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses

    lora_file = save_lora(QwenImageEditPlusPipeline, lora_state_dict(transformer), adapter_metadata(transformer), tmp_path / "lora")
    pipe = QwenImageEditPlusPipeline.from_pretrained(str(tiny_model), dtype=torch.bfloat16).to(CUDA)  # unquantised
    pipe.set_progress_bar_config(disable=True)
    assert not any(isinstance(m, Fp8Linear) for m in pipe.transformer.modules())
    reference = Image.new("RGB", (64, 64), (200, 30, 30))

    def edit():
        return pipe(image=[reference], prompt="make the square green", height=64, width=64, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(0), output_type="latent").images

    base = edit()
    pipe.load_lora_weights(str(lora_file.parent))
    assert not torch.allclose(base.float(), edit().float(), atol=1e-3)
    print(f"fp8-native: loss {losses[0]:.4f} -> {losses[-1]:.4f} in 30 steps")
