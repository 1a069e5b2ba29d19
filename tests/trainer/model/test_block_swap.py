"""Block swap (`blocks_to_swap`) moves bytes, never changes them: training with it gives the same LoRA.

On the CPU the "device" slots are a second set of CPU buffers, so the hooks, the slot hand-over and
the copy schedule run as on a GPU; tests/gpu/test_block_swap.py repeats the equality with CUDA
streams and bitsandbytes.
"""

import copy

import pytest
import torch
from diffusers import QwenImageTransformer2DModel

from trainer.data.caches import CachedSample
from trainer.demo.tiny_model import JOINT_DIM, Z_DIM
from trainer.errors import ConfigError
from trainer.model.block_swap import BlockSwap, frozen_leaf_tensors, swapped_block_indices
from trainer.model.lora import add_lora
from trainer.training.loss import flow_matching_loss

CPU = torch.device("cpu")
LAYERS = 6


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * Z_DIM, out_channels=Z_DIM, num_layers=LAYERS, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=JOINT_DIM, axes_dims_rope=(4, 6, 6),
    )


def prepared(base, precision: str):
    model = copy.deepcopy(base)
    if precision == "int8-quanto":
        import optimum.quanto as quanto

        from trainer.model.quantization import KEEP_FULL_PRECISION

        quanto.quantize(model, weights=quanto.qint8, exclude=KEEP_FULL_PRECISION)
        quanto.freeze(model)
    params = add_lora(model, 4, 4.0, seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        with torch.no_grad():
            for p in params:
                p.normal_(0, 0.05)  # a non-zero lora_B: every LoRA weight gets a gradient from the first step
    model.enable_gradient_checkpointing()
    model.train()
    return model, params


def a_sample() -> CachedSample:
    g = torch.Generator().manual_seed(0)
    return CachedSample("x", torch.randn(12, JOINT_DIM, generator=g), torch.ones(12, dtype=torch.long),
                        torch.randn(Z_DIM, 8, 8, generator=g), [torch.randn(Z_DIM, 8, 8, generator=g)])


def train(model, params, steps: int = 3, on_step=None) -> list[float]:
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    sample, losses = a_sample(), []
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        sigma, noise = torch.rand(1, generator=g), torch.randn(1, Z_DIM, 8, 8, generator=g)
        loss = flow_matching_loss(model, sample, sigma, noise, torch.float32)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if on_step:
            on_step(step)
    return losses


@pytest.mark.parametrize(("precision", "blocks"), [("no_change", 1), ("no_change", LAYERS), ("int8-quanto", 4)])
def test_training_with_swapped_blocks_gives_the_same_lora_bit_for_bit(base, precision, blocks):
    plain, plain_params = prepared(base, precision)
    plain_losses = train(plain, plain_params)
    swapped, swapped_params = prepared(base, precision)
    swap = BlockSwap(swapped, swapped_block_indices(LAYERS, blocks), CPU)
    assert swap.host_bytes > 0
    assert train(swapped, swapped_params) == plain_losses
    for a, b in zip(plain_params, swapped_params):
        assert torch.equal(a, b)


class _Probe(torch.autograd.Function):
    """Identity; its backward runs just before the probed layer's own backward."""

    @staticmethod
    def forward(ctx, x, check):
        ctx.check = check
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.check("backward")
        return grad, None


@pytest.mark.parametrize("precision", ["no_change", "int8-quanto"])
def test_every_use_of_a_swapped_weight_reads_its_device_copy(base, precision):
    """Forward, checkpoint recompute and backward of each swapped layer find its weights in a slot,
    never more blocks in the slots than there are slots, and between steps the rest in host memory."""
    model, params = prepared(base, precision)
    indices = swapped_block_indices(LAYERS, 4)
    swap = BlockSwap(model, indices, CPU)
    seen = {"forward": 0, "backward": 0}
    for index in indices:
        block = model.transformer_blocks[index]
        for name, layer in block.named_modules():
            if not isinstance(layer, torch.nn.Linear) or name.endswith(("lora_A.default", "lora_B.default")):
                continue
            leaves = frozen_leaf_tensors(layer, recurse=False)
            assert leaves, name

            def check(phase, leaves=leaves, where=f"block {index} {name}"):
                assert all(swap.on_device(t) for t in leaves), f"{where}: {phase} reads host memory"
                assert len(swap.loaded()) <= len(swap.slots)
                seen[phase] += 1

            layer.register_forward_pre_hook(lambda m, a, check=check: check("forward"))
            layer.register_forward_hook(lambda m, a, out, check=check: _Probe.apply(out, check))

    def between_steps(step):
        on_host = [i for i in indices if i not in swap.loaded()]
        assert len(on_host) >= len(indices) - len(swap.slots)
        for i in on_host:
            assert not any(swap.on_device(t) for t in frozen_leaf_tensors(model.transformer_blocks[i]))

    train(model, params, steps=2, on_step=between_steps)
    assert seen["forward"] and seen["backward"]


def test_each_step_copies_every_swapped_block_twice_less_what_the_slots_keep(base):
    """Forward and backward each load every swapped block, except the slots' worth that stay loaded
    where the pass turns round (forward -> backward, backward -> next forward)."""
    model, params = prepared(base, "no_change")
    swap = BlockSwap(model, swapped_block_indices(LAYERS, 5), CPU)
    counts = []
    train(model, params, steps=3, on_step=lambda step: counts.append(swap.copies))
    assert counts[2] - counts[1] == 2 * (5 - len(swap.slots))


def test_inference_through_swapped_blocks_equals_the_resident_model(base):
    """Validation's sampling (no gradients) through the same hooks."""
    plain, _ = prepared(base, "int8-quanto")
    swapped, _ = prepared(base, "int8-quanto")
    swap = BlockSwap(swapped, swapped_block_indices(LAYERS, 3), CPU)
    sample = a_sample()
    with torch.no_grad():
        outputs = [flow_matching_loss(m, sample, torch.tensor([0.5]), torch.ones(1, Z_DIM, 8, 8), torch.float32) for m in (plain, swapped)]
    assert torch.equal(*outputs)
    assert swap.loaded() == []  # nothing stays loaded after a forward without gradients


def test_a_forward_with_gradients_but_without_checkpointing_is_refused(base):
    model, _ = prepared(base, "no_change")
    model.disable_gradient_checkpointing()
    BlockSwap(model, [0], CPU)
    with pytest.raises(RuntimeError, match="needs gradient checkpointing"):
        flow_matching_loss(model, a_sample(), torch.tensor([0.5]), torch.ones(1, Z_DIM, 8, 8), torch.float32)


def test_close_puts_every_weight_back(base):
    model, _ = prepared(base, "int8-quanto")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    swap = BlockSwap(model, swapped_block_indices(LAYERS, 3), CPU)
    train(model, [p for p in model.parameters() if p.requires_grad], steps=1)
    swap.close()
    after = model.state_dict()
    frozen = [k for k in before if "lora" not in k]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not any(hook for block in model.transformer_blocks for hook in block._forward_pre_hooks.values())


def test_the_swapped_blocks_are_spread_and_bounded():
    assert swapped_block_indices(60, 0) == []
    assert swapped_block_indices(60, 20) == list(range(0, 60, 3))
    picked = swapped_block_indices(60, 40)
    assert len(picked) == 40 and max(b - a for a, b in zip(picked, picked[1:])) == 2
    assert swapped_block_indices(60, 60) == list(range(60))
    with pytest.raises(ConfigError, match="blocks_to_swap 61: the transformer has 60 blocks"):
        swapped_block_indices(60, 61)


@pytest.mark.slow
def test_the_recipe_trains_the_same_lora_with_blocks_to_swap(demo_root, tmp_path, monkeypatch):
    """Through the trainer's own setup (load, quantise block by block with the swapped blocks left in
    CPU memory, LoRA, checkpointing, BlockSwap, prepare) and train loop, in-process on the tiny model."""
    from safetensors.torch import load_file

    import trainer.training.recipe as recipe
    from tests.conftest import prepare_small_project
    from trainer.model.lora import LORA_WEIGHTS_NAME

    installed = []

    class RecordedBlockSwap(BlockSwap):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            installed.append(self)

    monkeypatch.setattr(recipe, "BlockSwap", RecordedBlockSwap)
    loras = {}
    for blocks in (0, 2):
        project = prepare_small_project(tmp_path / str(blocks), demo_root, gradient_checkpointing=True, blocks_to_swap=blocks,
                                        base_model_precision="int8-quanto", quantize_via="accelerator", max_train_steps=3)
        result = recipe.run_training(project.config, project.dataset_config, project.manifest_path, project.root, tags={})
        loras[blocks] = (result.loss_history, load_file(project.lora_dir / LORA_WEIGHTS_NAME))
    (swap,) = installed
    assert swap.order == [0, 1] and swap.copies > 0
    assert loras[0][0] == loras[2][0]
    assert loras[0][1].keys() == loras[2][1].keys()
    for key, value in loras[0][1].items():
        assert torch.equal(value, loras[2][1][key]), key
