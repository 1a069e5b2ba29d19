"""The memory estimate `qwen-edit check` prints: its byte counts match real models, its parts respond to
the config as the savers do, and it stays near what the full-size model measured on the GPU."""

import pytest
import torch

from trainer.config.parsing import parse_train_config
from trainer.model.memory_estimate import (
    GiB,
    SequenceShape,
    TransformerShape,
    check_report,
    estimate_training_memory,
    fewest_blocks_to_swap,
    usable_gib,
)

EDIT_V1 = SequenceShape(4096, (4096,), 1300)  # 1024x1024 target + one 1 MP reference + 1300 text tokens
EDIT_V2 = SequenceShape(4096, (4096,) * 3, 300)
SAVERS = {"offload_activations": True, "offload_optimizer_state": True}


def config(**settings):
    return parse_train_config({"base_model_precision": "int8-quanto", "gradient_checkpointing": True, "lora_rank": 32, **settings})


@pytest.fixture(scope="module")
def tiny():
    from trainer.demo.tiny_model import _transformer

    torch.manual_seed(0)
    return _transformer(zero_cond_t=False)


@pytest.mark.parametrize("precision", ["no_change", "int8-quanto", "int4-quanto"])
def test_a_blocks_bytes_are_those_of_the_real_layers(tiny, precision):
    import copy

    from trainer.model.block_swap import frozen_leaf_tensors

    model = copy.deepcopy(tiny)
    if precision != "no_change":
        import optimum.quanto as quanto

        from trainer.model.quantization import KEEP_FULL_PRECISION

        quanto.quantize(model, weights={"int8-quanto": quanto.qint8, "int4-quanto": quanto.qint4}[precision], exclude=KEEP_FULL_PRECISION)
        quanto.freeze(model)
    model.requires_grad_(False)  # as add_lora freezes the base
    block = model.transformer_blocks[0]
    real = sum(t.numel() * t.element_size() for t in frozen_leaf_tensors(block))
    shape = TransformerShape.from_config(dict(model.config))
    predicted = shape.block_bytes(precision, full_precision_bytes=4)  # the tiny model is float32
    assert predicted == pytest.approx(real, rel=0.01)


def test_the_lora_size_is_what_add_lora_adds(tiny):
    import copy

    from trainer.model.lora import add_lora

    params = add_lora(copy.deepcopy(tiny), 4, 4.0, seed=0)
    assert TransformerShape.from_config(dict(tiny.config)).lora_params(4) == sum(p.numel() for p in params)


def test_each_saver_removes_its_part_and_block_swap_trades_blocks_for_two_slots():
    plain = estimate_training_memory(config(), EDIT_V1)
    saved = estimate_training_memory(config(**SAVERS), EDIT_V1)
    assert saved.parts["checkpointed block inputs"] == 0 < plain.parts["checkpointed block inputs"]
    assert saved.parts["optimizer state"] == 0 < plain.parts["optimizer state"]
    block = TransformerShape().block_bytes("int8-quanto") / GiB
    swapped = estimate_training_memory(config(**SAVERS, blocks_to_swap=20), EDIT_V1)
    assert saved.allocated - swapped.allocated == pytest.approx(20 * block - 2 * block)
    assert swapped.host["swapped blocks (pinned)"] == pytest.approx(20 * block)
    assert estimate_training_memory(config(base_model_precision="nf4-bnb"), EDIT_V1).allocated < plain.allocated
    assert estimate_training_memory(config(base_model_precision="no_change"), EDIT_V1).allocated > plain.allocated
    assert estimate_training_memory(config(), EDIT_V2).allocated > plain.allocated  # more tokens


def test_the_estimate_stays_near_the_full_size_models_measured_peaks():
    """Allocated peaks measured on one H100/H200 with the 20B model (benchmarks/README.md: int8 with both
    savers 22.1 GiB at 1x1300 and 23.7 at 3x300, int8 without savers 25.6; bf16 baseline 44.3)."""
    assert estimate_training_memory(config(**SAVERS), EDIT_V1).allocated == pytest.approx(22.1, rel=0.04)
    assert estimate_training_memory(config(**SAVERS), EDIT_V2).allocated == pytest.approx(23.7, rel=0.04)
    assert estimate_training_memory(config(), EDIT_V1).allocated == pytest.approx(25.6, rel=0.04)
    assert estimate_training_memory(config(base_model_precision="no_change"), EDIT_V1).allocated == pytest.approx(44.3, rel=0.04)


@pytest.mark.parametrize("card", [24, 16, 12])
def test_the_fewest_blocks_to_swap_is_the_first_count_predicted_to_fit(card):
    blocks = fewest_blocks_to_swap(config(**SAVERS), EDIT_V1, card)
    assert blocks is not None
    fits = lambda n: estimate_training_memory(config(**SAVERS, blocks_to_swap=n), EDIT_V1).reserved <= usable_gib(card)  # noqa: E731
    assert fits(blocks) and (blocks == 0 or not fits(blocks - 1))


def test_check_says_whether_it_fits_and_what_would():
    lines = "\n".join(check_report(config(**SAVERS), EDIT_V2, 24, TransformerShape()))
    assert "does NOT fit" in lines and f"blocks_to_swap {fewest_blocks_to_swap(config(**SAVERS), EDIT_V2, 24)}" in lines
    fitting = fewest_blocks_to_swap(config(**SAVERS), EDIT_V2, 24)
    assert ": fits" in "\n".join(check_report(config(**SAVERS, blocks_to_swap=fitting), EDIT_V2, 24, TransformerShape()))
    assert "--gpu-memory" in "\n".join(check_report(config(), EDIT_V1, None, TransformerShape()))


def test_qwen_edit_check_prints_the_prediction_for_the_card(demo_root, tmp_path, capsys):
    from tests.conftest import write_small_project
    from trainer.cli import main

    config_path, data_path = write_small_project(tmp_path, demo_root / "demo" / "models", gradient_checkpointing=True)
    assert main(["check", "--config", str(config_path), "--data", str(data_path), "--root", str(tmp_path), "--gpu-memory", "12"]) == 0
    out = capsys.readouterr().out
    assert "predicted GPU memory per training step" in out and "a 12 GB card leaves about 11.3 GiB" in out


def test_the_training_process_starts_with_expandable_segments_unless_the_user_chose(demo_root, tmp_path, monkeypatch):
    """Set in the launched process's environment, before anything can start CUDA (the reserved peak
    stays near the allocated one); a user's own PYTORCH_CUDA_ALLOC_CONF wins."""
    from tests.conftest import write_small_project
    from trainer.workflow import load_project, training_env

    project = load_project(*write_small_project(tmp_path, demo_root / "demo" / "models"), tmp_path)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert training_env(project)["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    assert training_env(project)["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"


@pytest.fixture(scope="module")
def tiny_21():
    from trainer.demo.tiny_model_21 import transformer_21

    torch.manual_seed(0)
    return transformer_21()


@pytest.mark.parametrize("precision", ["no_change", "int8-quanto"])
def test_edit_2_1_block_bytes_and_lora_size_are_those_of_qwen_image_21s_layers(tiny_21, precision):
    """The single-stream block (no biases, SwiGLU, no per-block modulation) and its attention-only LoRA."""
    import copy

    from trainer.model.block_swap import frozen_leaf_tensors
    from trainer.model.lora import add_lora

    model = copy.deepcopy(tiny_21)
    if precision != "no_change":
        import optimum.quanto as quanto

        from trainer.model.quantization import KEEP_FULL_PRECISION

        quanto.quantize(model, weights=quanto.qint8, exclude=KEEP_FULL_PRECISION)
        quanto.freeze(model)
    model.requires_grad_(False)
    shape = TransformerShape.from_config(dict(model.config))
    assert shape.single_stream and shape.mlp_ratio == 3 and shape.joint_attention_dim == 32
    real = sum(t.numel() * t.element_size() for t in frozen_leaf_tensors(model.transformer_blocks[0]))
    assert shape.block_bytes(precision, full_precision_bytes=4) == pytest.approx(real, rel=0.01)
    params = add_lora(copy.deepcopy(tiny_21), 4, 4.0, seed=0)
    assert shape.lora_params(4) == sum(p.numel() for p in params)


def test_edit_2_1_samples_count_every_reference_at_the_targets_area():
    from trainer.model.flavours import FLAVOURS
    from trainer.model.memory_estimate import QWEN_IMAGE_21, sample_shape

    shape = sample_shape(FLAVOURS["edit-2.1"], (1024, 768), 10)
    assert shape.target_tokens == 64 * 48 and shape.reference_tokens == (54 * 54,) * 10 and shape.text_tokens == 100
    assert QWEN_IMAGE_21.lora_params(1) == 32 * 4 * 2 * 4096  # q, k, v, out of 32 blocks, rank 1
    assert "not measured on this model" in "\n".join(check_report(config(model_flavour="edit-2.1"), shape, None, QWEN_IMAGE_21))
