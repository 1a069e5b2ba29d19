"""LyCORIS configs read into peft's LoKr/LoHa, DoRA, and the ComfyUI tensors of each (tiny real transformer, no training)."""

import json

import pytest
import torch

from trainer.config.parsing import parse_train_config
from trainer.errors import ConfigError
from trainer.model.adapters import (
    AdapterPlan,
    adapter_kind,
    adapter_plan,
    add_adapter,
    comfyui_tensors,
    lycoris_plan,
)
from trainer.model.lora import lora_state_dict

LOKR = {"algo": "lokr", "multiplier": 1.0, "linear_dim": 2, "linear_alpha": 1, "factor": 4}


def _transformer():
    from trainer.demo.tiny_model import _transformer

    return _transformer(zero_cond_t=False)


def _adapted(plan: AdapterPlan, seed: int = 0):
    """The tiny transformer with the planned adapter, its weights randomised (a trained adapter is not zero)."""
    model = _transformer()
    add_adapter(model, plan, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    for p in model.parameters():
        if p.requires_grad:
            p.data = torch.randn(p.shape, generator=generator) * 0.2
    return model


def _effective_weight(layer) -> torch.Tensor:
    """What a peft layer computes, as one weight: its output for the identity, minus the bias."""
    base = layer.get_base_layer()
    eye = torch.eye(base.in_features)
    with torch.no_grad():
        out = layer(eye) - (base.bias if base.bias is not None else 0)
    return out.T


def _lokr_layers(model):
    return {n: m for n, m in model.named_modules() if hasattr(m, "lokr_w1") and "default" in (*m.lokr_w1, *m.lokr_w1_a)}


# -- reading a lycoris_config ------------------------------------------------------------------------------------


def test_a_simpletuner_lokr_config_becomes_peft_lokr_with_its_rank_alpha_and_factor():
    plan = lycoris_plan(LOKR, "lycoris_config test.json")
    model = _adapted(plan)
    config = model.peft_config["default"]
    assert type(config).__name__ == "LoKrConfig" and adapter_kind(model) == "lokr"
    assert (config.r, config.alpha, config.decompose_factor, config.init_weights) == (2, 1.0, 4, "lycoris")
    layer = model.transformer_blocks[0].attn.to_q  # 32 -> 32, factor 4: w1 4x4 full, w2 8x8 as 8x2 @ 2x8
    w1, w2_a, w2_b = layer.lokr_w1["default"], layer.lokr_w2_a["default"], layer.lokr_w2_b["default"]
    assert w1.shape == (4, 4) and w2_a.shape == (8, 2) and w2_b.shape == (2, 8)
    # LyCORIS' LoKr: ΔW = kron(w1, w2a @ w2b) * alpha / linear_dim
    torch.testing.assert_close(_effective_weight(layer) - layer.get_base_layer().weight, torch.kron(w1, w2_a @ w2_b) * 0.5)


def test_full_matrix_lokr_has_both_factors_full_and_scale_one_as_lycoris_has():
    """LyCORIS' rule: with both Kronecker factors full the alpha is ignored (scale 1); SimpleTuner's examples use
    linear_dim 10000, linear_alpha 1, full_matrix true. A plain alpha / rank would be 1e-4 there."""
    plan = lycoris_plan({**LOKR, "linear_dim": 10000, "full_matrix": True,
                         "apply_preset": {"target_module": ["Attention", "FeedForward"]}}, "test")
    model = _adapted(plan)
    layers = _lokr_layers(model)
    assert len(layers) == 2 * (8 + 4)  # every linear layer of both blocks' attention and both MLPs
    for name, layer in layers.items():
        assert "default" in layer.lokr_w2 and "default" in layer.lokr_w1, name  # both full
        delta = _effective_weight(layer) - layer.get_base_layer().weight
        torch.testing.assert_close(delta, torch.kron(layer.lokr_w1["default"], layer.lokr_w2["default"]))  # scale 1


def test_module_algo_map_sets_rank_and_alpha_per_class():
    plan = lycoris_plan({"algo": "loha", "multiplier": 1, "linear_dim": 4, "linear_alpha": 2,
                         "apply_preset": {"target_module": ["Attention", "FeedForward"],
                                          "module_algo_map": {"FeedForward": {"linear_dim": 2, "linear_alpha": 2}}}}, "test")
    model = _adapted(plan)
    block = model.transformer_blocks[0]
    assert type(model.peft_config["default"]).__name__ == "LoHaConfig"
    assert block.attn.to_q.hada_w1_a["default"].shape == (32, 4) and block.attn.to_q.scaling["default"] == 0.5
    assert block.img_mlp.net[2].hada_w1_a["default"].shape == (32, 2) and block.img_mlp.net[2].scaling["default"] == 1.0
    layer = block.attn.to_k  # LyCORIS' LoHa: ΔW = (w1a w1b) ⊙ (w2a w2b) * alpha / linear_dim
    h = {k: getattr(layer, k)["default"] for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
    expected = (h["hada_w1_a"] @ h["hada_w1_b"]) * (h["hada_w2_a"] @ h["hada_w2_b"]) * 0.5
    torch.testing.assert_close(_effective_weight(layer) - layer.get_base_layer().weight, expected)


def test_without_apply_preset_the_targets_are_the_loras_attention_projections():
    lora, lokr = _adapted(AdapterPlan("lora", 4, 4.0)), _adapted(lycoris_plan(LOKR, "test"))
    names = lambda m: sorted(k.rsplit(".", 1)[0].removesuffix(".lora_A").removesuffix(".lora_B")  # noqa: E731
                             for k in lora_state_dict(m))
    assert sorted(set(names(lora))) == sorted({k.rsplit(".", 1)[0] for k in lora_state_dict(lokr)})


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"algo": "locon", "linear_dim": 4, "linear_alpha": 1}, "algo 'locon' is not supported: LoCon is LoRA plus convolutions"),
        ({"algo": "full", "linear_dim": 4, "linear_alpha": 1}, "algo 'full' is not supported"),
        ({"algo": "glora", "linear_dim": 4, "linear_alpha": 1}, "algo 'glora' is not supported"),
        ({"algo": "lora", "linear_dim": 4, "linear_alpha": 1}, "lora_type 'standard' with lora_rank = linear_dim"),
        ({"linear_dim": 4, "linear_alpha": 1}, "algo is required"),
        ({**LOKR, "weight_decompose": True}, "weight_decompose=True is not supported: peft's LoKr/LoHa have no DoRA"),
        ({**LOKR, "use_scalar": True}, "use_scalar=True is not supported"),
        ({**LOKR, "rs_lora": True}, "rs_lora=True is not supported"),
        ({**LOKR, "multiplier": 0.5}, "multiplier=0.5 is not supported"),
        ({**LOKR, "dropout": 0.1}, "dropout=0.1 is not supported"),
        ({**LOKR, "preset": "attn-mlp"}, "'preset' is not supported"),
        ({"algo": "loha", "linear_dim": 4, "linear_alpha": 1, "full_matrix": True}, "'full_matrix' is a LoKr setting"),
        ({"algo": "lokr", "multiplier": 1.0, "linear_alpha": 1}, "linear_dim is required"),
        ({**LOKR, "apply_preset": {"target_module": ["Attention"], "module_algo_map": {"Attention": {"factor": 8}}}},
         "peft's LoKrConfig has one decompose_factor"),
        ({**LOKR, "apply_preset": {"name_algo_map": {}}}, "apply_preset.name_algo_map is not supported"),
        ({**LOKR, "factor": 0}, "use a positive factor, or -1"),
    ],
)
def test_what_peft_lacks_is_refused_by_name(raw, message):
    with pytest.raises(ConfigError) as refused:
        lycoris_plan(raw, "lycoris_config config/lycoris.json")
    assert str(refused.value).startswith("lycoris_config config/lycoris.json") and message in str(refused.value)


def test_settings_that_need_the_model_are_refused_when_the_adapter_is_built():
    with pytest.raises(ConfigError, match="'Flux2Attention' is no class of QwenImageTransformer2DModel .* did you mean 'Attention'"):
        _adapted(lycoris_plan({**LOKR, "apply_preset": {"target_module": ["Flux2Attention"]}}, "test"))
    # factor 16 on a 32-wide layer: LyCORIS factors 2 x 16, peft 16 x 2: other shapes, refused
    with pytest.raises(ConfigError, match="factor 16 on transformer_blocks.0.attn.to_q .* LyCORIS factors it 2x16"):
        _adapted(lycoris_plan({**LOKR, "factor": 16}, "test"))


def test_keys_without_effect_are_noted_and_the_file_is_read_relative_to_the_project(tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "lycoris.json").write_text(json.dumps({**LOKR, "bypass_mode": True, "conv_dim": 4}))
    config = parse_train_config({"lora_type": "lycoris", "lycoris_config": "config/lycoris.json"})
    plan = adapter_plan(config, lambda p: tmp_path / p)
    assert plan.kind == "lokr" and plan.lycoris["bypass_mode"] is True
    assert any("'bypass_mode' has no effect" in n for n in plan.notes) and any("'conv_dim' has no effect" in n for n in plan.notes)
    with pytest.raises(ConfigError, match="^lycoris_config 'missing.json': .*missing.json: file not found"):
        adapter_plan(config.model_copy(update={"lycoris_config": "missing.json"}), lambda p: tmp_path / p)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"lora_type": "lycoris"}, "lora_type 'lycoris' needs lycoris_config"),
        ({"lora_type": "lycoris", "lycoris_config": "x.json", "use_dora": True}, "peft's LoKr and LoHa have no DoRA"),
        ({"use_dora": True, "base_model_precision": "fp8-native"}, "use_dora reads the frozen weights"),
        ({"lora_type": "locon"}, "lora_type"),
    ],
)
def test_the_training_config_refuses_adapter_combinations_peft_cannot_train(settings, message):
    with pytest.raises(ConfigError, match=message):
        parse_train_config(settings)


@pytest.mark.parametrize("settings", [{"use_dora": True}, {"lora_type": "lycoris", "lycoris_config": "x.json"}])
def test_dora_and_lycoris_adapters_are_refused_under_fsdp_before_any_model_loads(settings):
    from trainer.training.distributed import check_fsdp_config

    with pytest.raises(ConfigError, match="not supported with FSDP here .*ddp.yaml"):
        check_fsdp_config(parse_train_config(settings))


def test_dora_is_peft_lora_with_use_dora():
    model = _adapted(adapter_plan(parse_train_config({"use_dora": True, "lora_rank": 4})))
    assert adapter_kind(model) == "dora" and model.peft_config["default"].use_dora
    assert any(k.endswith("lora_magnitude_vector") for k in lora_state_dict(model))


# -- the ComfyUI file: ComfyUI's arithmetic on it gives the weights peft computes ---------------------------------


def comfyui_patched_weight(weight: torch.Tensor, tensors: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """ComfyUI's patch of one weight at strength 1, transcribed from comfy/lora.py `load_lora` and
    comfy/weight_adapter/{lora,lokr,loha}.py `calculate_weight` with base.py `weight_decompose`
    (ComfyUI's code read on GitHub, 2026; ComfyUI itself is not installed here)."""
    get = lambda name: tensors.get(f"{prefix}.{name}")  # noqa: E731
    alpha, dora = get("alpha"), get("dora_scale")
    alpha = None if alpha is None else float(alpha)
    if get("lora_B.weight") is not None:  # ComfyUI reads lora_B as "up", lora_A as "down"
        up, down = get("lora_B.weight"), get("lora_A.weight")
        scale, diff = (alpha / down.shape[0] if alpha is not None else 1.0), up @ down
    elif get("hada_w1_a") is not None:
        scale = alpha / get("hada_w1_b").shape[0] if alpha is not None else 1.0
        diff = (get("hada_w1_a") @ get("hada_w1_b")) * (get("hada_w2_a") @ get("hada_w2_b"))
    else:
        dim = None
        w1 = get("lokr_w1")
        if w1 is None:
            dim, w1 = get("lokr_w1_b").shape[0], get("lokr_w1_a") @ get("lokr_w1_b")
        w2 = get("lokr_w2")
        if w2 is None:
            dim, w2 = get("lokr_w2_b").shape[0], get("lokr_w2_a") @ get("lokr_w2_b")
        scale = alpha / dim if alpha is not None and dim is not None else 1.0
        diff = torch.kron(w1, w2).reshape(weight.shape)
    if dora is None:
        return weight + scale * diff
    calc = weight + scale * diff
    if dora.shape[0] == calc.shape[0]:  # the output axis: ComfyUI divides by the base weight's row norms
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True)
    else:
        norm = calc.norm(dim=0, keepdim=True)
    return calc * (dora / (norm + torch.finfo(weight.dtype).eps))


@pytest.mark.parametrize("plan", [
    AdapterPlan("dora", 4, 8.0),
    lycoris_plan(LOKR, "test"),
    lycoris_plan({**LOKR, "linear_dim": 10000, "full_matrix": True}, "test"),
    lycoris_plan({**LOKR, "decompose_both": True, "linear_dim": 1}, "test"),
    lycoris_plan({"algo": "loha", "multiplier": 1.0, "linear_dim": 3, "linear_alpha": 6}, "test"),
], ids=["dora", "lokr", "lokr-full", "lokr-both-decomposed", "loha"])
def test_comfyuis_arithmetic_on_the_comfyui_tensors_gives_peft_weights(plan):
    model = _adapted(plan)
    tensors = comfyui_tensors(model, lora_state_dict(model))
    assert tensors and all(k.startswith("diffusion_model.transformer_blocks.") for k in tensors)
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "get_base_layer") and hasattr(m, "scaling")}
    assert layers
    for name, layer in layers.items():
        base = layer.get_base_layer().weight.detach()
        patched = comfyui_patched_weight(base.clone(), tensors, f"diffusion_model.{name}")
        torch.testing.assert_close(patched, _effective_weight(layer), rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("plan", [
    AdapterPlan("dora", 4, 8.0),
    lycoris_plan(LOKR, "test"),
    lycoris_plan({"algo": "loha", "multiplier": 1.0, "linear_dim": 3, "linear_alpha": 6}, "test"),
], ids=["dora", "lokr", "loha"])
def test_each_adapter_trains_over_an_int8_quanto_base_and_exports_for_comfyui(plan):
    """peft wraps quanto's QLinear (an nn.Linear); DoRA reads its dequantised weights, and so does its ComfyUI scale."""
    from trainer.model.quantization import quantize_transformer

    model = _transformer()
    quantize_transformer(model, parse_train_config({"base_model_precision": "int8-quanto", "mixed_precision": "no"}),
                         torch.device("cpu"), stay_on_cpu=[])
    params = add_adapter(model, plan, seed=0)
    generator = torch.Generator().manual_seed(0)
    out = model(hidden_states=torch.randn(1, 16, 64, generator=generator), encoder_hidden_states=torch.randn(1, 5, 32, generator=generator),
                timestep=torch.tensor([0.5]), img_shapes=[[(1, 4, 4)]], return_dict=False)[0]
    out.pow(2).mean().backward()
    assert sum(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params) > 0
    for p in params:  # as after some training
        p.data = torch.randn(p.shape, generator=generator) * 0.2
    tensors = comfyui_tensors(model, lora_state_dict(model))
    name, layer = next((n, m) for n, m in model.named_modules() if hasattr(m, "get_base_layer") and hasattr(m, "scaling"))
    base = layer.get_base_layer().weight.dequantize().float()
    torch.testing.assert_close(comfyui_patched_weight(base.clone(), tensors, f"diffusion_model.{name}"),
                               _effective_weight(layer).float(), rtol=1e-3, atol=1e-4)
