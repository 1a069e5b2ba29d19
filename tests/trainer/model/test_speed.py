"""The step's speed levers (trainer/model/speed.py) keep the loss and the LoRA gradients of the plain step.

Selective checkpointing and the attention-keeping policy run on the CPU and must be exact (the
recomputation is deterministic here); compiled blocks must agree to float32 rounding and compile
once for every block and every bucket size. cuDNN/flash attention and the fp8 kernels need CUDA:
tests/gpu/test_speed_levers.py.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.trainer.model.test_fp8_linear import tiny_transformer
from trainer.config.parsing import parse_train_config
from trainer.errors import ConfigError
from trainer.model.checkpointing import ATTENTION_OPS, BlockRunner
from trainer.model.lora import add_lora
from trainer.model.speed import apply_speed_settings

BLOCKS = 4


def lora_model(layers: int = BLOCKS):
    model = tiny_transformer(layers)
    add_lora(model, 4, 4.0, seed=0)
    with torch.no_grad():  # a non-zero lora_B, so that every LoRA weight gets a gradient
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    return model


def step(model, side: int = 5, text: int = 9) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward and backward; (loss, LoRA gradients)."""
    model.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(side * 100 + text)
    hidden, prompt = torch.randn(1, 2 * side * side, 64, generator=g), torch.randn(1, text, 32, generator=g)
    out = model(hidden_states=hidden, encoder_hidden_states=prompt, timestep=torch.tensor([0.4]),
                img_shapes=[[(1, side, side), (1, side, side)]], return_dict=False)[0]
    loss = out.pow(2).mean()
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


class CountAttention(TorchDispatchMode):
    """How often the fused attention kernel actually runs (an outer mode sees what checkpointing recomputes)."""

    def __init__(self):
        super().__init__()
        self.runs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.runs += func in ATTENTION_OPS
        return func(*args, **(kwargs or {}))


def block_calls(model) -> list[int]:
    calls = [0] * len(model.transformer_blocks)
    for index, block in enumerate(model.transformer_blocks):
        block.register_forward_pre_hook(lambda *_, i=index: calls.__setitem__(i, calls[i] + 1))
    return calls


def test_the_defaults_are_diffusers_own_checkpointing():
    model = tiny_transformer()
    apply_speed_settings(model, parse_train_config({"gradient_checkpointing": True}), torch.device("cpu"))
    assert model.gradient_checkpointing and not isinstance(model._gradient_checkpointing_func, BlockRunner)
    plain = tiny_transformer()
    apply_speed_settings(plain, parse_train_config({}), torch.device("cpu"))
    assert not plain.gradient_checkpointing


@pytest.mark.parametrize(("interval", "keep"), [(1, False), (2, False), (3, False), (1, True), (2, True)])
def test_selective_checkpointing_gives_the_plain_steps_loss_and_gradients_exactly(interval, keep):
    reference = step(lora_model())
    model = lora_model()
    settings = {"gradient_checkpointing": True, "gradient_checkpointing_interval": interval, "gradient_checkpointing_keep_attention": keep}
    apply_speed_settings(model, parse_train_config(settings), torch.device("cpu"))
    calls = block_calls(model)
    with CountAttention() as attention:
        loss, grads = step(model)
    assert torch.equal(loss, reference[0])
    assert grads.keys() == reference[1].keys() and all(torch.equal(grads[k], reference[1][k]) for k in grads)
    checkpointed = [i % interval == 0 for i in range(BLOCKS)]
    assert calls == [2 if c else 1 for c in checkpointed]  # a checkpointed block runs again in the backward
    recomputed_attention = 0 if keep else sum(checkpointed)
    assert attention.runs == BLOCKS + recomputed_attention


def test_interval_and_keep_attention_need_gradient_checkpointing():
    for key, value in (("gradient_checkpointing_interval", 2), ("gradient_checkpointing_keep_attention", True)):
        with pytest.raises(ConfigError, match=f"{key} chooses what gradient checkpointing keeps"):
            parse_train_config({key: value})


def test_compiling_is_refused_beside_block_swap_and_activation_offload():
    with pytest.raises(ConfigError, match="cannot be combined with blocks_to_swap"):
        parse_train_config({"compile_transformer_blocks": True, "gradient_checkpointing": True, "blocks_to_swap": 2})
    with pytest.raises(ConfigError, match="cannot be combined with offload_activations"):
        parse_train_config({"compile_transformer_blocks": True, "offload_activations": True})


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
@pytest.mark.parametrize("backend", ["cudnn", "flash"])
def test_the_cuda_attention_kernels_are_refused_without_cuda(backend):
    with pytest.raises(ConfigError, match=f"attention_backend '{backend}' needs a CUDA GPU"):
        apply_speed_settings(tiny_transformer(), parse_train_config({"attention_backend": backend}), torch.device("cpu"))


@pytest.mark.slow
def test_compiled_blocks_match_the_eager_step_and_compile_once_for_all_blocks_and_sizes():
    """One graph for blocks 1..3 (block 0, whose input needs no gradient, runs eagerly), with the checkpoint
    and the attention-keeping policy inside it; a second bucket size and caption length reuse it."""
    from trainer.model.compile import compile_counts

    torch._dynamo.reset()
    reference = [step(lora_model(), side, text) for side, text in ((5, 9), (7, 4))]
    model = lora_model()
    settings = {"gradient_checkpointing": True, "gradient_checkpointing_keep_attention": True, "compile_transformer_blocks": True}
    apply_speed_settings(model, parse_train_config(settings), torch.device("cpu"))
    before = compile_counts()["graphs"]
    for (side, text), (ref_loss, ref_grads) in zip(((5, 9), (7, 4)), reference):
        loss, grads = step(model, side, text)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        for key, grad in ref_grads.items():
            torch.testing.assert_close(grads[key], grad, rtol=1e-4, atol=1e-6)
        # the compiled backward gives the last block's unused text-stream LoRA a zero gradient, not none
        assert all(float(grads[k].abs().max()) == 0 for k in grads.keys() - ref_grads.keys())
    counts = compile_counts()
    assert counts["graphs"] - before == 1 and counts["graph_breaks"] == 0


def test_check_warns_that_fp8_native_needs_compiled_blocks():
    from trainer.model.speed import speed_notes

    eager = parse_train_config({"base_model_precision": "fp8-native"})
    compiled = parse_train_config({"base_model_precision": "fp8-native", "compile_transformer_blocks": True})
    assert any("compile_transformer_blocks" in note for note in speed_notes(eager))
    assert speed_notes(compiled) == []
