"""Block swap on a CUDA GPU (side-stream copies, events, pinned memory, bitsandbytes' nf4 layers):
training with `blocks_to_swap` gives the LoRA that training without it gives, through the trainer's
own setup and loop, and the swapped weights really leave the card. Skipped without CUDA; the CPU
suite checks the same mechanics between two CPU buffers (tests/trainer/model/test_block_swap.py)."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="block swap's streams and pinned memory need CUDA")


@pytest.mark.parametrize("precision", ["no_change", "int8-quanto", "nf4-bnb"])
def test_the_recipe_trains_the_same_lora_with_blocks_to_swap_on_the_gpu(precision, demo_root, tmp_path):
    from safetensors.torch import load_file
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from tests.conftest import prepare_small_project
    from trainer.model.lora import LORA_WEIGHTS_NAME
    from trainer.training.recipe import run_training

    if precision == "nf4-bnb":
        pytest.importorskip("bitsandbytes")
    loras = {}
    for blocks in (0, 2):
        project = prepare_small_project(
            tmp_path / str(blocks), demo_root, gradient_checkpointing=True, blocks_to_swap=blocks, base_model_precision=precision,
            offload_activations=True, offload_optimizer_state=True, max_train_steps=4, mixed_precision="bf16",
        )
        with sdpa_kernel(SDPBackend.MATH):  # deterministic attention backward: bitwise comparable runs
            result = run_training(project.config, project.dataset_config, project.manifest_path, project.root, tags={})
        loras[blocks] = (result.loss_history, load_file(project.lora_dir / LORA_WEIGHTS_NAME))
    assert loras[0][0] == loras[2][0]
    assert loras[0][1].keys() == loras[2][1].keys()
    for key, value in loras[0][1].items():
        assert torch.equal(value, loras[2][1][key]), key


def test_swapped_weights_leave_the_card_and_come_back_in_two_slots():
    """A 6-block int8 model: the card holds the resident blocks and two slots, not the swapped blocks
    (those sit in pinned memory), and CUDA-stream training gives the resident model's LoRA."""
    import copy

    from diffusers import QwenImageTransformer2DModel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from tests.trainer.model.test_block_swap import LAYERS, a_sample, prepared
    from trainer.demo.tiny_model import JOINT_DIM, Z_DIM
    from trainer.model.block_swap import BlockSwap, frozen_leaf_tensors, swapped_block_indices

    cuda = torch.device("cuda")
    torch.manual_seed(0)
    base = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * Z_DIM, out_channels=Z_DIM, num_layers=LAYERS, attention_head_dim=64,
        num_attention_heads=4, joint_attention_dim=JOINT_DIM, axes_dims_rope=(16, 24, 24),
    )
    plain, plain_params = prepared(copy.deepcopy(base), "int8-quanto")
    swapped, swapped_params = prepared(copy.deepcopy(base), "int8-quanto")
    plain.to(cuda), swapped.to(cuda)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    indices = swapped_block_indices(LAYERS, 4)
    block_bytes = sum(t.numel() * t.element_size() for t in frozen_leaf_tensors(swapped.transformer_blocks[0]))
    swap = BlockSwap(swapped, indices, cuda)
    assert before - torch.cuda.memory_allocated() >= (len(indices) - len(swap.slots)) * block_bytes * 0.95
    assert all(t.device.type == "cpu" and t.is_pinned() for t in frozen_leaf_tensors(swapped.transformer_blocks[indices[-1]]))

    sample = a_sample()
    sample = type(sample)(sample.name, sample.prompt_embeds.to(cuda), sample.prompt_embeds_mask.to(cuda),
                          sample.target.to(cuda), [r.to(cuda) for r in sample.references])
    with sdpa_kernel(SDPBackend.MATH):  # deterministic attention backward
        assert train_on_gpu(swapped, swapped_params, sample) == train_on_gpu(plain, plain_params, sample)
    for a, b in zip(plain_params, swapped_params):
        assert torch.equal(a, b)
    assert swap.copies >= 2 * (len(indices) - len(swap.slots))


def train_on_gpu(model, params, sample, steps: int = 3) -> list[float]:
    from trainer.training.loss import flow_matching_loss

    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        sigma = torch.rand(1, generator=g).cuda()
        noise = torch.randn(1, *sample.target.shape, generator=g).cuda()
        loss = flow_matching_loss(model, sample, sigma, noise, torch.float32)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses
