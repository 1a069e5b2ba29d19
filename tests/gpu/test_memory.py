"""The GPU-memory savers (`trainer/memory.py`, config `offload_activations` and
`offload_optimizer_state`) move bits, never change them: training with them gives the same LoRA.
They act on CUDA tensors only, so these skip without a GPU; run them on the GPU machine
(benchmarks/README.md gives the command and the memory they save on the 20B model).
"""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the offloads move CUDA tensors")

STEPS = 6


def train(tiny_model, offload: bool) -> tuple[dict, list[float], int]:
    """STEPS optimizer steps with gradient checkpointing, as the recipe runs them: (LoRA, losses, bytes offloaded)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from tests.gpu.conftest import CUDA, a_sample, config_for
    from trainer.model.loading import load_transformer
    from trainer.model.lora import add_lora, lora_state_dict
    from trainer.model.memory import OffloadActivations, offload_optimizer_state
    from trainer.training.distributed import make_optimizer
    from trainer.training.loss import flow_matching_loss

    config = config_for(tiny_model, learning_rate=1e-2, offload_activations=offload, offload_optimizer_state=offload)
    transformer = load_transformer(config, torch.float32).to(CUDA)
    params = add_lora(transformer, config.lora_rank, config.lora_scale_alpha, config.seed)
    transformer.enable_gradient_checkpointing()
    optimizer = make_optimizer(config, params)
    saver = OffloadActivations(min_bytes=0)  # the tiny model's tensors are all small
    if offload:
        offload_optimizer_state(optimizer)
    sample, g = a_sample(), torch.Generator().manual_seed(1)
    losses = []
    with sdpa_kernel(SDPBackend.MATH):  # deterministic attention: bitwise comparable runs
        for _ in range(STEPS):
            sigma = torch.rand(1, generator=g).to(CUDA)
            noise = torch.randn((1, *sample.target.shape), generator=g).to(CUDA)
            if offload:
                with saver:
                    loss = flow_matching_loss(transformer, sample, sigma, noise, torch.float32)
            else:
                loss = flow_matching_loss(transformer, sample, sigma, noise, torch.float32)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    state = optimizer.state_dict()["state"]
    assert all(t.device.type == ("cpu" if offload else "cuda") for slot in state.values() for t in slot.values() if t.dim())
    return lora_state_dict(transformer), losses, saver.offloaded_bytes


def test_training_with_both_offloads_gives_the_same_lora_bit_for_bit(tiny_model):
    plain, plain_losses, _ = train(tiny_model, offload=False)
    saved, saved_losses, offloaded = train(tiny_model, offload=True)
    assert offloaded > 0, "nothing was offloaded"
    assert saved_losses == plain_losses
    assert plain.keys() == saved.keys()
    for key in plain:
        assert torch.equal(plain[key], saved[key]), key
