"""fp8-native: frozen linear layers in float8 e4m3 with per-channel scales, computed with fp8 matmuls.

On the CPU `torch._scaled_mm` runs too (PyTorch >= 2.6); the same tests against the CUDA kernels are
in tests/gpu/test_fp8_linear.py.
"""

import pytest
import torch
from diffusers import QwenImageTransformer2DModel
from torch import nn

from trainer.config.parsing import parse_train_config
from trainer.model.fp8_linear import E4M3, Fp8Linear, native_fp8, quantize_rows
from trainer.model.quantization import KEEP_FULL_PRECISION, quantize_transformer


def tiny_transformer(layers: int = 2) -> QwenImageTransformer2DModel:
    torch.manual_seed(0)
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=layers, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
    )


def dequantised(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return values.float() * scale


def test_quantize_rows_scales_each_row_to_the_e4m3_range():
    x = torch.randn(5, 32) * torch.tensor([1e-3, 1.0, 30.0, 1e4, 0.0])[:, None]
    q, scale = quantize_rows(x)
    assert q.dtype == E4M3 and scale.shape == (5, 1)
    assert torch.equal(q.float().abs().amax(dim=1)[:4], torch.full((4,), 448.0))  # each row's largest value hits the top
    assert torch.equal(q[4].float(), torch.zeros(32))  # an all-zero row stays zero (no division by zero)
    err = (dequantised(q, scale) - x).abs() / x.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
    assert float(err[:4].max()) <= 2**-4  # e4m3 keeps 3 mantissa bits: at most half a step of 2^-3 of the row's top


@pytest.mark.parametrize("native", [True, False])
def test_forward_and_input_gradient_are_the_products_of_the_quantised_operands(native):
    linear = nn.Linear(64, 48)
    layer = Fp8Linear(linear)
    if native and not native_fp8(torch.device("cpu")):
        pytest.skip("torch._scaled_mm does not run on this CPU build")
    layer.native = native
    x = torch.randn(3, 7, 64, requires_grad=True)
    grad_out = torch.randn(3, 7, 48)
    out = layer(x)
    out.backward(grad_out)

    wq, w_scale = quantize_rows(linear.weight.detach())
    xq, x_scale = quantize_rows(x.detach().reshape(-1, 64))
    expected = dequantised(xq, x_scale) @ dequantised(wq, w_scale).t() + linear.bias.detach()
    torch.testing.assert_close(out.detach().reshape(-1, 48), expected, rtol=1e-5, atol=1e-5)
    # dL/dx = dL/dy W with W = q(W) s_W: the weight's per-output-channel scales fold into the gradient's columns
    gq, g_scale = quantize_rows(grad_out.reshape(-1, 48), w_scale.t())
    torch.testing.assert_close(x.grad.reshape(-1, 64), dequantised(gq, g_scale) @ wq.float(), rtol=1e-5, atol=1e-5)
    # and it is close to, but not, the full-precision layer
    full = linear(x.detach())
    rel = float((out.detach() - full.detach()).norm() / full.detach().norm())
    assert 1e-3 < rel < 0.06


def test_the_weight_is_stored_once_in_fp8_and_never_cast():
    layer = Fp8Linear(nn.Linear(64, 48, bias=False))
    assert layer.weight.dtype == E4M3 and not layer.weight.requires_grad and layer.bias is None
    assert layer.weight_scale.shape == (48,) and layer.weight_scale.dtype == torch.float32
    torch.testing.assert_close(layer.dequantized_weight(), dequantised(*quantize_rows(layer.dequantized_weight())))
    with pytest.raises(TypeError, match="never cast it"):
        layer.to(torch.bfloat16)


def test_conversion_keeps_the_edges_in_full_precision_and_quarters_the_block_weights():
    model = tiny_transformer()
    full_bytes = sum(m.weight.numel() * m.weight.element_size() for m in model.transformer_blocks.modules() if isinstance(m, nn.Linear))
    config = parse_train_config({"base_model_precision": "fp8-native", "quantize_via": "cpu"})
    quantize_transformer(model, config, torch.device("cpu"))
    block_linears = [m for m in model.transformer_blocks.modules() if isinstance(m, nn.Linear)]
    assert block_linears and all(type(m) is Fp8Linear for m in block_linears)  # attention, MLPs and modulation
    for name in ("img_in", "txt_in", "proj_out", "norm_out.linear", "time_text_embed.timestep_embedder.linear_1"):
        assert type(model.get_submodule(name)) is nn.Linear, name
    assert set(KEEP_FULL_PRECISION) >= {"img_in", "txt_in", "proj_out"}
    fp8_bytes = sum(m.weight.numel() for m in block_linears)  # one byte each (float32 before)
    assert fp8_bytes * 4 == full_bytes


def test_the_lora_wraps_fp8_layers_with_the_keys_and_init_of_the_unquantised_model():
    from peft.utils import get_peft_model_state_dict

    from trainer.model.lora import add_lora

    plain, quantised = tiny_transformer(), tiny_transformer()
    quantize_transformer(quantised, parse_train_config({"base_model_precision": "fp8-native", "quantize_via": "cpu"}), torch.device("cpu"))
    add_lora(plain, 4, 4.0, seed=3)
    params = add_lora(quantised, 4, 4.0, seed=3)
    assert all(p.dtype == torch.float32 for p in params)
    a, b = get_peft_model_state_dict(plain), get_peft_model_state_dict(quantised)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert isinstance(quantised.transformer_blocks[0].attn.to_q.base_layer, Fp8Linear)


def test_the_loss_and_lora_gradients_stay_near_the_full_precision_ones():
    from trainer.model.lora import add_lora

    models = {"full": tiny_transformer(), "fp8": tiny_transformer()}
    quantize_transformer(models["fp8"], parse_train_config({"base_model_precision": "fp8-native", "quantize_via": "cpu"}), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    hidden, text = torch.randn(1, 2 * 25, 64, generator=g), torch.randn(1, 9, 32, generator=g)
    results = {}
    for name, model in models.items():
        add_lora(model, 4, 4.0, seed=0)
        with torch.no_grad():
            for key, p in sorted(model.named_parameters()):
                if "lora_B" in key:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(key))) * 0.1)
        out = model(hidden_states=hidden, encoder_hidden_states=text, timestep=torch.tensor([0.5]),
                    img_shapes=[[(1, 5, 5), (1, 5, 5)]], return_dict=False)[0]
        loss = out.pow(2).mean()
        loss.backward()
        results[name] = (float(loss), {k: p.grad for k, p in model.named_parameters() if p.grad is not None})
    (loss_full, grads_full), (loss_fp8, grads_fp8) = results["full"], results["fp8"]
    assert abs(loss_fp8 - loss_full) / loss_full < 0.02
    num = sum(float((grads_fp8[k] - grads_full[k]).pow(2).sum()) for k in grads_full)
    den = sum(float(grads_full[k].pow(2).sum()) for k in grads_full)
    assert 0 < (num / den) ** 0.5 < 0.1
