"""Adapters beyond a plain LoRA, all through peft: DoRA (`use_dora`) and LyCORIS' LoKr and LoHa.

SimpleTuner trains LoKr/LoHa with the LyCORIS library from a `lycoris_config` JSON file
(`{"algo": "lokr", "linear_dim": ..., "linear_alpha": ..., "factor": ..., "apply_preset": {...}}`). Here
that file is read into peft's `LoKrConfig` / `LoHaConfig`, which implement the same products
(ΔW = kron(w1, w2), ΔW = (w1a w1b) ⊙ (w2a w2b)) with the same shapes and scales; a setting peft has no
counterpart for is refused by name, so nothing is silently trained otherwise than the file asks.

What loads where (diffusers 0.42.1, README "Adapters"): LoRA and DoRA load with the pipelines'
`load_lora_weights`; LoKr only with the transformer's `load_lora_adapter` (the Qwen pipelines' loader
refuses keys without "lora" in them); LoHa with nothing in diffusers, so `load_adapter` here adds it
with peft. The ComfyUI file of each is written by `comfyui_tensors`.
"""

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from trainer.errors import ConfigError, suggest

AdapterKind = Literal["lora", "dora", "lokr", "loha"]
ADAPTER_KEY = "qwen_edit.adapter"  # safetensors metadata of the exported file: which kind of adapter it holds
LYCORIS_KEY = "qwen_edit.lycoris_config"  # the user's lycoris_config, kept with the weights as SimpleTuner keeps it

from trainer.model.lora import LORA_WEIGHTS_NAME, TARGET_MODULES

SUPPORTED_ALGOS = ("lokr", "loha")
# LyCORIS algorithms peft 0.21 has no LyCORIS-compatible counterpart of, with what to do instead
OTHER_ALGOS = {
    "lora": "a LyCORIS LoRA of linear layers is a standard LoRA: set lora_type 'standard' with lora_rank = linear_dim "
            "and lora_alpha = linear_alpha",
    "locon": "LoCon is LoRA plus convolutions, and the transformer has only linear layers: set lora_type 'standard' with "
             "lora_rank = linear_dim and lora_alpha = linear_alpha",
    "full": "full fine-tuning of the targeted weights is not an adapter peft trains here",
    "glora": "peft 0.21's GLoRA is not LyCORIS' GLoRA, and neither diffusers nor this exporter reads it",
    "ia3": "peft's IA3 is not LyCORIS' (IA)^3 and diffusers does not load it",
    "dylora": "peft has no DyLoRA",
    "diag-oft": "peft's OFT/BOFT are not LyCORIS' diag-OFT and diffusers does not load them",
    "oft": "peft's OFT is not LyCORIS' and diffusers does not load it",
    "boft": "peft's BOFT is not LyCORIS' and diffusers does not load it",
    "tlora": "peft has no T-LoRA (timestep-dependent rank masking)",
}
# keys of the file that mean nothing for the transformer's linear layers, or nothing peft would do otherwise
NO_EFFECT_KEYS = {
    "bypass_mode": "peft always adds ΔW·x beside the frozen layer, which is what LyCORIS' bypass mode does",
    "conv_dim": "the transformer has no convolutions",
    "conv_alpha": "the transformer has no convolutions",
    "use_tucker": "Tucker decomposition applies to convolutions only",
    "use_cp": "CP decomposition applies to convolutions only",
    "wd_on_out": "it only orients weight_decompose (DoRA), which peft's LoKr/LoHa lack",
}
# settings peft's LoKr/LoHa lack: accepted only at the value that means "off"
OFF_ONLY = {
    "dropout": (0, "LyCORIS' LoKr/LoHa do not implement plain dropout either; use rank_dropout or module_dropout"),
    "use_scalar": (False, "peft's LoKr/LoHa have no trained scalar"),
    "weight_decompose": (False, "peft's LoKr/LoHa have no DoRA (use_dora applies to lora_type 'standard')"),
    "rs_lora": (False, "peft's LoKr/LoHa scale by alpha / rank only"),
    "unbalanced_factorization": (False, "peft's LoKr always factors the smaller part first"),
    "train_norm": (False, "only linear layers are adapted"),
}
LOKR_KEYS = {"factor", "full_matrix", "decompose_both"}
COMMON_KEYS = {"algo", "multiplier", "linear_dim", "linear_alpha", "rank_dropout", "module_dropout", "rank_dropout_scale",
               "apply_preset"}
PRESET_KEYS = {"target_module", "target_name", "module_algo_map", "use_fnmatch"}
PER_MODULE_KEYS = {"linear_dim", "linear_alpha", "factor", "algo"}


@dataclass(frozen=True)
class AdapterPlan:
    """What adapter a run trains, decided from the config (and its lycoris_config file) before any model loads."""

    kind: AdapterKind
    rank: int
    alpha: float
    source: str = "config"
    factor: int = -1  # LoKr
    full_matrix: bool = False  # LoKr: both Kronecker factors full, scale 1 (LyCORIS' rule)
    decompose_both: bool = False  # LoKr
    dropouts: dict = field(default_factory=dict)  # rank_dropout, module_dropout, rank_dropout_scale
    target_classes: tuple[str, ...] = ()  # apply_preset.target_module
    target_names: tuple[str, ...] = ()  # apply_preset.target_name (fnmatch patterns)
    per_class: dict = field(default_factory=dict)  # module_algo_map: class -> {linear_dim, linear_alpha}
    lycoris: dict | None = None  # the file as the user wrote it
    notes: tuple[str, ...] = ()

    def peft_config(self, transformer):
        """The peft config that builds this adapter on `transformer` (its layers decide LoKr's shapes and scales)."""
        from peft import LoHaConfig, LoKrConfig, LoraConfig

        if self.kind in ("lora", "dora"):
            return LoraConfig(r=self.rank, lora_alpha=self.alpha, init_lora_weights="gaussian",
                              target_modules=list(TARGET_MODULES), use_dora=self.kind == "dora")
        layers = self.target_layers(transformer)
        ranks, alphas = self._ranks_and_alphas(layers, self._owning_classes(transformer, layers))
        rank, alpha = _most_common(ranks), _most_common(alphas)
        common = dict(
            r=rank, alpha=alpha, target_modules=sorted(layers),
            rank_pattern={re.escape(n): r for n, r in ranks.items() if r != rank},
            alpha_pattern={re.escape(n): a for n, a in alphas.items() if a != alpha},
            rank_dropout=self.dropouts.get("rank_dropout", 0.0), module_dropout=self.dropouts.get("module_dropout", 0.0),
        )
        if self.kind == "loha":
            return LoHaConfig(**common)
        return LoKrConfig(**common, decompose_factor=self.factor, decompose_both=self.decompose_both,
                          rank_dropout_scale=self.dropouts.get("rank_dropout_scale", False), init_weights="lycoris")

    def target_layers(self, transformer) -> dict[str, torch.nn.Linear]:
        """The linear layers to adapt by full name: LyCORIS' preset (every linear layer inside a module of a
        `target_module` class, plus the `target_name` matches), else the attention projections a LoRA targets."""
        from fnmatch import fnmatch

        linears = {n: m for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
        if not self.target_classes and not self.target_names:
            return {n: m for n, m in linears.items() if any(n == t or n.endswith("." + t) for t in TARGET_MODULES)}
        chosen = {}
        class_of = {n: type(m).__name__ for n, m in transformer.named_modules()}
        with_linears = sorted({class_of[a] for name in linears for a in _ancestors(name)})
        for cls in self.target_classes:
            if cls not in with_linears:
                raise ConfigError(
                    f"{self.source}: apply_preset.target_module {cls!r} is no class of {type(transformer).__name__} that "
                    f"holds linear layers; {suggest(cls, with_linears)}"
                )
        for name, module in transformer.named_modules():
            if type(module).__name__ in self.target_classes:
                chosen.update({f"{name}.{child}" if name else child: sub for child, sub in module.named_modules()
                               if isinstance(sub, torch.nn.Linear) and child})
        for pattern in self.target_names:
            matched = {n: m for n, m in linears.items() if fnmatch(n, pattern)}
            if not matched:
                raise ConfigError(f"{self.source}: apply_preset.target_name {pattern!r} matches no linear layer, e.g. "
                                  f"{next(iter(linears))}")
            chosen.update(matched)
        return chosen

    def _ranks_and_alphas(self, layers: dict[str, torch.nn.Linear], owners: dict[str, str]) -> tuple[dict[str, int], dict[str, float]]:
        """Per layer: the rank and alpha peft needs to build what LyCORIS builds from the same settings
        (`owners`: the module_algo_map class each layer sits in)."""
        from peft.tuners.lokr.layer import factorization

        ranks, alphas = {}, {}
        for name, layer in layers.items():
            override = self.per_class.get(owners.get(name), {})
            rank, alpha = int(override.get("linear_dim", self.rank)), float(override.get("linear_alpha", self.alpha))
            if self.kind == "loha":
                ranks[name], alphas[name] = rank, alpha
                continue
            (out_l, out_k), (in_m, in_n) = (_lycoris_factorization(d, self.factor) for d in (layer.out_features, layer.in_features))
            if factorization(layer.out_features, self.factor) != (out_l, out_k) or factorization(layer.in_features, self.factor) != (in_m, in_n):
                raise ConfigError(
                    f"{self.source}: factor {self.factor} on {name} ({layer.in_features} -> {layer.out_features}): LyCORIS "
                    f"factors it {in_m}x{in_n} -> {out_l}x{out_k}, peft's LoKr the other way round (peft keeps the "
                    f"factor first even where it is the larger part); use a factor no larger than the square root of "
                    "the layer's sizes, or -1"
                )
            # LyCORIS: w2 full when full_matrix or rank >= half its sides; w1 full unless decompose_both with a small
            # rank; both full means scale 1 (alpha = rank). peft decides the same from the rank alone, so a full
            # matrix asks peft for a rank at least its sides (the rank then only sets alpha / rank = 1).
            full_w2 = self.full_matrix or rank >= max(out_k, in_n) / 2
            full_w1 = self.full_matrix or not (self.decompose_both and rank < max(out_l, in_m) / 2)
            if self.full_matrix:
                rank = max(out_k, in_n, out_l, in_m)
            ranks[name] = rank
            alphas[name] = float(rank) if full_w1 and full_w2 else alpha
        return ranks, alphas

    def _owning_classes(self, transformer, layers) -> dict[str, str]:
        """module_algo_map is by class: the innermost module_algo_map class each layer sits in."""
        if not self.per_class:
            return {}
        class_of = {n: type(m).__name__ for n, m in transformer.named_modules()}
        owners = {}
        for name in layers:
            owner = next((class_of[a] for a in _ancestors(name) if class_of[a] in self.per_class), None)
            if owner is not None:
                owners[name] = owner
        return owners


def _ancestors(name: str) -> list[str]:
    """The modules a module sits in, innermost first ("" is the model itself)."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, -1, -1)]


def _most_common(values: dict) -> Any:
    return Counter(values.values()).most_common(1)[0][0]


def _lycoris_factorization(dimension: int, factor: int) -> tuple[int, int]:
    """LyCORIS' factorization: (m, n) with m * n = dimension, m <= n, m the factor when it divides (else the
    divisor closest to it from below, or to the square root for -1)."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    limit = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > limit:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


# -- reading the config ------------------------------------------------------------------------------------------


def adapter_plan(config, resolve: Callable[[str], Path] = Path) -> AdapterPlan:
    """The adapter a TrainConfig asks for; `resolve` turns lycoris_config into a path (relative to the project)."""
    if config.lora_type == "standard":
        return AdapterPlan("dora" if config.use_dora else "lora", config.lora_rank, config.lora_scale_alpha)
    path = resolve(config.lycoris_config)
    from trainer.config.parsing import read_json_with_comments

    try:
        raw = read_json_with_comments(Path(path))
    except ConfigError as exc:  # missing, a folder, not JSON...: named as the key the user set
        raise ConfigError(f"lycoris_config {config.lycoris_config!r}: {exc}") from None
    return lycoris_plan(raw, f"lycoris_config {path}")


def lycoris_plan(raw: Any, source: str) -> AdapterPlan:
    """A LyCORIS config (SimpleTuner's lycoris_config.json) as a peft LoKr/LoHa plan; every problem at once."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object such as {{\"algo\": \"lokr\", ...}}, got {type(raw).__name__}")
    problems, notes = [], []
    algo = raw.get("algo")
    if algo not in SUPPORTED_ALGOS:
        why = OTHER_ALGOS.get(algo) if isinstance(algo, str) else None
        if why:
            problems.append(f"algo {algo!r} is not supported: {why}")
        elif algo is None:
            problems.append("algo is required: 'lokr' or 'loha'")
        else:
            problems.append(f"algo {algo!r} is not supported; peft trains 'lokr' and 'loha' here ({suggest(str(algo), SUPPORTED_ALGOS)})")
    known = COMMON_KEYS | LOKR_KEYS | set(NO_EFFECT_KEYS) | set(OFF_ONLY)
    for key, value in raw.items():
        if key not in known:
            problems.append(f"{key!r} is not supported (peft's {algo or 'LoKr/LoHa'} has no such setting); "
                            f"{suggest(key, sorted(known))}")
        elif key in NO_EFFECT_KEYS:
            notes.append(f"{source}: {key!r} has no effect: {NO_EFFECT_KEYS[key]}")
        elif key in OFF_ONLY and value not in (OFF_ONLY[key][0], None, False, 0):
            problems.append(f"{key}={value!r} is not supported: {OFF_ONLY[key][1]}. Remove it or set it off")
        elif key in LOKR_KEYS and algo == "loha" and key != "factor":
            problems.append(f"{key!r} is a LoKr setting; LoHa has no Kronecker factors. Remove it, or use algo 'lokr'")
    if algo == "loha" and "factor" in raw:
        notes.append(f"{source}: 'factor' has no effect with algo 'loha' (LoHa has no Kronecker factor)")
    multiplier = raw.get("multiplier", 1.0)
    if multiplier != 1 or isinstance(multiplier, bool):
        problems.append(f"multiplier={multiplier!r} is not supported: peft trains the adapter at strength 1.0; set "
                        "multiplier 1.0 and scale the adapter at inference (set_adapters weights, ComfyUI's strength)")
    full_matrix = bool(raw.get("full_matrix", False)) and algo == "lokr"
    rank = _number(raw, "linear_dim", int, problems, required=not full_matrix, low=1)
    alpha = _number(raw, "linear_alpha", float, problems, required=True, low=0)
    factor = _number(raw, "factor", int, problems, required=False, default=-1) if algo == "lokr" else -1
    if factor is not None and factor != -1 and factor < 1:
        problems.append(f"factor={factor!r}: use a positive factor, or -1 (factors near the square root)")
    dropouts = {}
    for key in ("rank_dropout", "module_dropout"):
        value = _number(raw, key, float, problems, required=False, default=0.0, low=0)
        if value is not None and value >= 1:
            problems.append(f"{key}={value!r} must be below 1")
        dropouts[key] = value or 0.0
    dropouts["rank_dropout_scale"] = bool(raw.get("rank_dropout_scale", False))
    preset = _preset(raw.get("apply_preset"), algo, factor, problems)
    if problems:
        from trainer.config.parsing import problems_message

        raise ConfigError(problems_message(source, problems))
    rank = rank if rank is not None else 1  # full_matrix without linear_dim: the rank never splits a factor
    alpha = float(rank) if alpha == 0 else alpha  # LyCORIS: alpha 0 means alpha = rank (scale 1)
    return AdapterPlan(
        algo, rank, alpha, source, factor, full_matrix, bool(raw.get("decompose_both", False)) and algo == "lokr",
        dropouts, *preset, lycoris=raw, notes=tuple(notes),
    )


def _number(raw: dict, key: str, kind, problems: list[str], required: bool, default=None, low=None):
    if key not in raw:
        if required:
            problems.append(f"{key} is required (SimpleTuner requires it too), e.g. \"{key}\": "
                            f"{16 if key == 'linear_dim' else 1}")
        return default
    value = raw[key]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and kind is int and value != int(value):
        ok = False
    if not ok or (low is not None and value < low):
        problems.append(f"{key}={value!r}: expected {'a whole number' if kind is int else 'a number'}"
                        + (f" >= {low}" if low is not None else ""))
        return default
    return kind(value)


def _preset(preset: Any, algo: str | None, factor: int | None, problems: list[str]) -> tuple[tuple, tuple, dict]:
    if preset is None:
        return (), (), {}
    if not isinstance(preset, dict):
        problems.append(f"apply_preset must be an object ({{\"target_module\": [\"Attention\"]}}), got {type(preset).__name__}")
        return (), (), {}
    for key in preset:
        if key not in PRESET_KEYS:
            problems.append(f"apply_preset.{key} is not supported; {suggest(key, sorted(PRESET_KEYS))}")
    classes = _names(preset.get("target_module", []), "apply_preset.target_module", problems)
    names = _names(preset.get("target_name", []), "apply_preset.target_name", problems)
    per_class = {}
    algo_map = preset.get("module_algo_map", {})
    if not isinstance(algo_map, dict):
        problems.append("apply_preset.module_algo_map must map class names to settings")
        algo_map = {}
    for cls, settings in algo_map.items():
        if not isinstance(settings, dict):
            problems.append(f"apply_preset.module_algo_map.{cls} must be an object")
            continue
        for key, value in settings.items():
            where = f"apply_preset.module_algo_map.{cls}.{key}"
            if key not in PER_MODULE_KEYS:
                problems.append(f"{where} is not supported per module class (peft sets rank and alpha per layer only)")
            elif key == "algo" and value != algo:
                problems.append(f"{where}={value!r}: one run trains one algo ({algo!r}); remove the per-class algo")
            elif key == "factor" and algo == "lokr" and value != factor:
                problems.append(
                    f"{where}={value!r} differs from factor {factor!r}: peft's LoKrConfig has one decompose_factor for "
                    "every layer (a rank and an alpha per layer, no factor per layer); use one factor"
                )
        per_class[cls] = {k: v for k, v in settings.items() if k in ("linear_dim", "linear_alpha")}
    return tuple(classes), tuple(names), per_class


def _names(value: Any, where: str, problems: list[str]) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        problems.append(f"{where} must be a list of names")
        return []
    return value


def check_adapter_config(config, resolve: Callable[[str], Path]) -> None:
    """`qwen-edit check`: read lycoris_config now (one error for a bad file), its notes join the config's."""
    if config.lora_type == "lycoris":
        plan = adapter_plan(config, resolve)
        config._notes = tuple(config.notes) + plan.notes


# -- building, saving, loading -----------------------------------------------------------------------------------


def add_adapter(transformer, plan: AdapterPlan, seed: int) -> list[torch.nn.Parameter]:
    """Freeze the base, add the planned adapter; return its parameters (kept in float32)."""
    transformer.requires_grad_(False)
    config = plan.peft_config(transformer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the adapter's initial weights depend on the seed alone
        transformer.add_adapter(config)
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def metadata_kind(metadata: dict) -> AdapterKind:
    """The kind of adapter a peft config (`peft_config[name].to_dict()`, the adapter metadata) describes."""
    peft_type = str(getattr(metadata.get("peft_type"), "value", metadata.get("peft_type"))).upper()
    if peft_type == "LORA":
        return "dora" if metadata.get("use_dora") else "lora"
    return {"LOKR": "lokr", "LOHA": "loha"}[peft_type]


def adapter_kind(transformer, adapter_name: str = "default") -> AdapterKind:
    return metadata_kind(transformer.peft_config[adapter_name].to_dict())


_DIFFUSERS_USE = {
    "dora": "diffusers (pipeline.load_lora_weights)",
    "lokr": "diffusers (pipeline.transformer.load_lora_adapter(file, prefix='transformer')); the Qwen pipelines' "
            "load_lora_weights refuses LoKr keys in diffusers 0.42.1",
    "loha": "peft (trainer.model.adapters.load_adapter: LoHaConfig from this file's lora_adapter_metadata, then "
            "set_peft_model_state_dict); diffusers 0.42.1 has no LoHa loader",
}


def adapter_file_notes(kind: AdapterKind, comfyui: bool = False) -> dict[str, str]:
    """Where each exported file of a DoRA/LoKr/LoHa adapter is meant to be used (safetensors metadata)."""
    from trainer.model.lora import COMFYUI_WEIGHTS_NAME, NOTE_KEY, USE_IN_KEY

    if comfyui:
        return {USE_IN_KEY: "ComfyUI (LoraLoaderModelOnly)",
                NOTE_KEY: f"ComfyUI {kind} keys (diffusion_model.*), scales baked in as ComfyUI applies them; for diffusers "
                          "use pytorch_lora_weights.safetensors"}
    return {USE_IN_KEY: _DIFFUSERS_USE[kind], NOTE_KEY: f"for ComfyUI use {COMFYUI_WEIGHTS_NAME}"}


def comfyui_tensors(transformer, layers: dict[str, torch.Tensor], adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter in ComfyUI's keys (`diffusion_model.<module>.<weight>`), so that ComfyUI's arithmetic
    (comfy/weight_adapter: lora, loha, lokr, and DoRA's weight_decompose) gives peft's weights.

    - LoRA: A/B with `.alpha` (ComfyUI scales by alpha / rank, as peft does).
    - LoKr/LoHa: peft's scale (alpha / rank) baked into the first factor, no `.alpha` (ComfyUI then scales by 1.0;
      it would skip alpha for LoKr's full factors, which peft does not).
    - DoRA: A/B and `.alpha` plus `.dora_scale` [out, 1]. ComfyUI divides by the norm of the *base* weight's rows
      where peft divides by that of W + ΔW, so the magnitude is exported as m · ‖W‖ / ‖W + ΔW‖ (of the base the
      adapter was trained on: the dequantised weights with a quantised base).
    """
    kind = adapter_kind(transformer, adapter_name)
    modules = dict(transformer.named_modules())
    out = {}
    for key, value in layers.items():
        module_name, weight_name = _ADAPTER_WEIGHT.fullmatch(key).groups()
        layer = modules[module_name]
        prefix = "diffusion_model." + module_name
        if kind in ("lokr", "loha"):
            first = {"lokr": ("lokr_w1", "lokr_w1_a"), "loha": ("hada_w1_a",)}[kind]
            out[f"{prefix}.{weight_name}"] = value * layer.scaling[adapter_name] if weight_name in first else value
            continue
        if weight_name == "lora_magnitude_vector":
            out[f"{prefix}.dora_scale"] = _comfyui_dora_scale(layer, value, adapter_name)
            continue
        out[f"{prefix}.{weight_name}"] = value
        if weight_name == "lora_A.weight":
            out[f"{prefix}.alpha"] = torch.tensor(float(transformer.peft_config[adapter_name].lora_alpha))
    return out


_ADAPTER_WEIGHT = re.compile(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector|lokr_\w+|hada_\w+)")


def _comfyui_dora_scale(layer, magnitude: torch.Tensor, adapter_name: str) -> torch.Tensor:
    """m · ‖W‖ / ‖W + ΔW‖ per output row, [out, 1] (ComfyUI broadcasts it over the row)."""
    weight = layer.get_base_layer().weight
    weight = (weight.dequantize() if hasattr(weight, "dequantize") else weight).detach().float().cpu()  # quanto: dequantised
    delta = layer.lora_B[adapter_name].weight.detach().float().cpu() @ layer.lora_A[adapter_name].weight.detach().float().cpu()
    adapted_norm = torch.linalg.norm(weight + layer.scaling[adapter_name] * delta, dim=1)
    return (magnitude.float().cpu() * torch.linalg.norm(weight, dim=1) / adapted_norm).reshape(-1, 1).contiguous()


def file_adapter_kind(path: Path) -> AdapterKind:
    """The kind an exported file says it holds; files from before adapters other than LoRA say nothing."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return (handle.metadata() or {}).get(ADAPTER_KEY, "lora")


def load_adapter(pipe, lora_dir: Path, weight_name: str | None = None) -> None:
    """Load an exported adapter into a pipeline by the route its kind needs in diffusers 0.42.1:
    `load_lora_weights` (LoRA, DoRA), the transformer's `load_lora_adapter` (LoKr), peft itself (LoHa)."""
    path = Path(lora_dir) / (weight_name or LORA_WEIGHTS_NAME)
    kind = file_adapter_kind(path)
    if kind in ("lora", "dora"):
        pipe.load_lora_weights(str(lora_dir), weight_name=path.name, use_safetensors=True)  # never a pickled .bin
    elif kind == "lokr":
        pipe.transformer.load_lora_adapter(str(path), prefix="transformer", use_safetensors=True)
    else:
        load_loha_with_peft(pipe.transformer, path)


def load_loha_with_peft(transformer, path: Path, adapter_name: str = "default_0") -> None:
    """diffusers 0.42.1 has no LoHa loader (its load_lora_adapter builds a LoraConfig from hada_* keys and fails):
    the file's own peft config, then its weights, straight through peft."""
    from peft import LoHaConfig
    from peft.utils import set_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = json.loads((handle.metadata() or {})["lora_adapter_metadata"])
    settings = {k.removeprefix("transformer."): v for k, v in metadata.items() if k.startswith("transformer.")}
    transformer.add_adapter(LoHaConfig(**settings), adapter_name=adapter_name)
    state = {k.removeprefix("transformer."): v for k, v in load_file(str(path)).items()}
    result = set_peft_model_state_dict(transformer, state, adapter_name=adapter_name)
    if getattr(result, "unexpected_keys", None):
        raise ConfigError(f"{path}: {len(result.unexpected_keys)} LoHa weight(s) fit no layer, e.g. {result.unexpected_keys[0]}")
