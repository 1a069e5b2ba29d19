"""The CUDA-only speed levers keep the plain step's loss and LoRA gradients (within bf16 rounding):
cuDNN / FlashAttention kernels (`attention_backend`), and keeping the cuDNN attention output through
checkpointing (`gradient_checkpointing_keep_attention`). The CPU suite checks the others
(tests/trainer/model/test_speed.py); the 20B figures are benchmarks/gpu_step_speed.py's.
"""

from contextlib import nullcontext

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="cuDNN and FlashAttention kernels need CUDA")


def model_and_grads(tiny_model, watch=None, **settings):
    """The tiny transformer as the recipe sets it up (bf16, LoRA, speed settings), one step's loss and LoRA
    gradients; `watch`: a context (e.g. a dispatch mode) around the step alone."""
    from tests.gpu.conftest import CUDA, a_sample, config_for
    from trainer.model.loading import load_transformer
    from trainer.model.lora import add_lora
    from trainer.model.speed import apply_speed_settings
    from trainer.training.loss import flow_matching_loss

    config = config_for(tiny_model, gradient_checkpointing=True, **settings)
    transformer = load_transformer(config, torch.bfloat16).to(CUDA)
    add_lora(transformer, config.lora_rank, config.lora_scale_alpha, config.seed)
    with torch.no_grad():  # a non-zero lora_B, so that every LoRA weight gets a gradient
        for name, p in sorted(transformer.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    apply_speed_settings(transformer, config, CUDA)
    sample = a_sample()
    sigma = torch.tensor([0.6], device=CUDA)
    noise = torch.randn((1, *sample.target.shape), generator=torch.Generator().manual_seed(1)).to(CUDA)
    with watch or nullcontext():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = flow_matching_loss(transformer, sample, sigma, noise, torch.bfloat16)
        loss.backward()
    return transformer, float(loss), {k: p.grad.float() for k, p in transformer.named_parameters() if p.grad is not None}


def rel(a: dict, b: dict) -> float:
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in a)
    return (num / sum(float(v.pow(2).sum()) for v in a.values())) ** 0.5


@pytest.mark.parametrize("backend", ["cudnn", "flash"])
def test_the_attention_kernels_give_the_native_loss_and_lora_gradients(tiny_model, backend):
    _, loss, grads = model_and_grads(tiny_model)
    _, other_loss, other_grads = model_and_grads(tiny_model, attention_backend=backend)
    assert grads.keys() == other_grads.keys()
    assert abs(other_loss - loss) / loss < 1e-2
    assert rel(grads, other_grads) < 2e-2, rel(grads, other_grads)
    print(f"{backend}: loss {other_loss:.5f} vs {loss:.5f}, LoRA gradients rel diff {rel(grads, other_grads):.1e}")


def test_keeping_the_cudnn_attention_output_skips_its_recomputation_with_the_same_gradients(tiny_model):
    from tests.trainer.model.test_speed import CountAttention

    _, loss, grads = model_and_grads(tiny_model, attention_backend="cudnn")
    attention = CountAttention()
    transformer, kept_loss, kept_grads = model_and_grads(
        tiny_model, watch=attention, attention_backend="cudnn", gradient_checkpointing_keep_attention=True
    )
    assert attention.runs == len(transformer.transformer_blocks)  # once per block: none recomputed
    assert kept_loss == loss
    assert rel(grads, kept_grads) < 1e-2  # cuDNN's backward may reduce in another order; the kept output is the same
