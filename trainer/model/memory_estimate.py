"""The GPU memory a training run will need, predicted from the config before any GPU time.

`qwen-edit check --gpu-memory 24` prints it. The parts, for one step of batch size 1:

- weights: each transformer block's linear weights at `base_model_precision` (int8: 1 byte a
  weight + a bf16 scale per row; nf4: half a byte + an fp32 absmax per 64), biases and norms in
  bf16, the model's edge layers in full precision; blocks named by `blocks_to_swap` live in CPU
  memory, and two block-sized slots on the card take their turns;
- LoRA: float32 weights and, during the backward and the optimizer step, their float32 gradients;
  AdamW's two moments (kept in CPU memory between steps with `offload_optimizer_state`);
- activations: with gradient checkpointing, every block's input (image + text tokens x width,
  bf16; in CPU memory with `offload_activations`) and one block's recomputation and backward;
  without it, every block's saved activations.

The per-token activation factors were fitted to the full-size model measured on an H100 and an
H200 (benchmarks/README.md, benchmarks/RESULTS.md): a prediction, not a promise; the reserved
figure adds what the allocator typically keeps beyond what is allocated.
"""

import math
from dataclasses import dataclass, field

from trainer.config.schema import TrainConfig

GiB = 2**30
# bf16 tensors one token is worth per block: what a checkpointed block's recompute + backward holds at
# its peak, and what an uncheckpointed block saves for the backward (fitted, see the module docstring)
WORKING_TENSORS_PER_TOKEN = 42
SAVED_TENSORS_PER_TOKEN = 20
# what the allocator keeps reserved beyond the allocated peak (expandable segments on): a share of the
# working set, and more with every swapped block (fitted to benchmarks/RESULTS.md, within ~0.4 GiB)
RESERVED_SLACK = 0.55
RESERVED_PER_SWAPPED_BLOCK_GIB = 0.035
OTHER_GIB = 0.35  # RoPE tables, cuBLAS workspace, small temporaries: measured, the same in every case
CUDA_CONTEXT_GIB = 0.5  # CUDA context, cuBLAS workspaces: on the card, outside PyTorch's allocator
CARD_VISIBLE = 0.983  # a "24 GB" card shows about 23.6 GiB (RTX 4090: 23.65; RTX 3060 12 GB: 11.76)

# bytes per linear weight by base_model_precision (scales and absmax counted apart, in linear_bytes)
WEIGHT_BYTES = {"int8-quanto": 1.0, "fp8-quanto": 1.0, "fp8-native": 1.0, "int4-quanto": 0.5, "int2-quanto": 0.25, "nf4-bnb": 0.5}
QUANTO_GROUP = 128  # int4/int2: a scale and a shift per group of 128 inputs
BNB_BLOCK = 64  # nf4: an fp32 absmax per 64 weights


def linear_bytes(in_features: int, out_features: int, precision: str, full_precision_bytes: int = 2, bias: bool = True) -> float:
    """One linear layer (weight, its scales, a full-precision bias unless `bias` is False) at `precision`."""
    weights = in_features * out_features
    bias = out_features * full_precision_bytes if bias else 0
    if precision == "no_change":
        return weights * full_precision_bytes + bias
    stored = weights * WEIGHT_BYTES[precision]
    if precision in ("int8-quanto", "fp8-quanto"):
        scales = out_features * full_precision_bytes  # one per output row
    elif precision == "fp8-native":
        scales = out_features * 4  # one float32 per output row (trainer/model/fp8_linear.py)
    elif precision == "nf4-bnb":
        scales = math.ceil(weights / BNB_BLOCK) * 4
    else:
        scales = out_features * math.ceil(in_features / QUANTO_GROUP) * 2 * full_precision_bytes
    return stored + scales + bias


@dataclass(frozen=True)
class TransformerShape:
    """QwenImageTransformer2DModel's sizes (the defaults are the released 20B model's); with
    `single_stream`, QwenImage21Transformer2DModel's (edit-2.1: `QWEN_IMAGE_21`)."""

    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584  # 2.1: context_in_dim
    in_channels: int = 64
    out_channels: int = 16
    patch_size: int = 2
    single_stream: bool = False  # Qwen-Image-2.1: one stream, no biases, one shared modulation, SwiGLU MLP
    mlp_ratio: int = 4

    @classmethod
    def from_config(cls, config: dict) -> "TransformerShape":
        if "context_in_dim" in config:  # a QwenImage21Transformer2DModel config
            config = {**config, "joint_attention_dim": config["context_in_dim"], "single_stream": True}
        return cls(**{k: config[k] for k in cls.__dataclass_fields__ if config.get(k) is not None})

    @property
    def dim(self) -> int:
        return self.attention_head_dim * self.num_attention_heads

    def block_linears(self) -> list[tuple[int, int]]:
        """(in, out) of each linear layer of one block."""
        d = self.dim
        if self.single_stream:  # q, k, v, out; SwiGLU proj, gate and out
            hidden = self.mlp_ratio * d
            return [(d, d)] * 4 + [(d, hidden), (d, hidden), (hidden, d)]
        mods = [(d, 6 * d)] * 2  # img_mod, txt_mod
        attention = [(d, d)] * 8  # q, k, v and out of both streams
        mlps = [(d, 4 * d), (4 * d, d)] * 2
        return mods + attention + mlps

    def block_bytes(self, precision: str, full_precision_bytes: int = 2) -> float:
        bias = not self.single_stream
        linears = sum(linear_bytes(i, o, precision, full_precision_bytes, bias) for i, o in self.block_linears())
        streams = 1 if self.single_stream else 2
        norms = 2 * streams * self.attention_head_dim * full_precision_bytes  # q/k RMSNorm weights of each stream
        return linears + norms

    def edge_bytes(self, full_precision_bytes: int = 2) -> float:
        d = self.dim
        if self.single_stream:  # img_in, txt_in (2 layers + norm), time embedder, shared modulation, norm_out, proj_out
            linears = [(self.in_channels * self.patch_size**2, d), (self.joint_attention_dim, d), (d, d), (256, d), (d, d),
                       (d, 4 * d), (d, d), (d, self.patch_size**2 * self.out_channels)]
            return sum(i * o for i, o in linears) * full_precision_bytes + self.joint_attention_dim * full_precision_bytes
        linears = [(self.in_channels, d), (self.joint_attention_dim, d), (256, d), (d, d), (d, 2 * d),
                   (d, self.patch_size**2 * self.out_channels)]
        return sum((i + 1) * o for i, o in linears) * full_precision_bytes + self.joint_attention_dim * full_precision_bytes

    def lora_params(self, rank: int) -> int:
        # the LoRA targets (lora.TARGET_MODULES): the attention projections, of both streams where there are two
        attention = self.block_linears()[:4] if self.single_stream else self.block_linears()[2:10]
        return self.num_layers * sum((i + o) * rank for i, o in attention)


# QwenImage21Transformer2DModel's defaults: the released Qwen-Image-2.1 (7B, 32 single-stream blocks)
QWEN_IMAGE_21 = TransformerShape(32, 128, 32, 4096, 64, 64, 1, single_stream=True, mlp_ratio=3)


@dataclass(frozen=True)
class SequenceShape:
    """Tokens one sample feeds the transformer: the noisy target, each reference, the text."""

    target_tokens: int
    reference_tokens: tuple[int, ...]
    text_tokens: int

    @property
    def image_tokens(self) -> int:
        return self.target_tokens + sum(self.reference_tokens)

    @property
    def total(self) -> int:
        return self.image_tokens + self.text_tokens

    def describe(self) -> str:
        return f"{self.target_tokens} target + {'+'.join(map(str, self.reference_tokens))} reference + {self.text_tokens} text tokens"


def tokens_of(width: int, height: int) -> int:
    """Packed latent tokens of an image: 8x VAE downscale, then 2x2 patches."""
    return (width // 16) * (height // 16)


def sample_shape(flavour, target_size: tuple[int, int], n_references: int, match_target_res: bool = False, caption_tokens: int = 100) -> SequenceShape:
    """A sample's tokens as the pipelines build them (square references assumed).

    edit-v1: the reference at ~1 MP feeds the VAE and the VL encoder (28-px vision patches after
    merging); edit-v2/v3: the VL encoder sees each reference at ~384^2, the VAE at ~1 MP or, with
    match_target_res, at the target's size; edit-2.1: each reference at the target's area, its VL
    image slots taken by its latent tokens (16x VAE, unpatched: the same count as 8x + 2x2).
    """
    width, height = target_size
    if flavour.is_21:
        side = max(32, int(math.sqrt(width * height)) // 32 * 32)
        return SequenceShape(tokens_of(width, height), tuple(tokens_of(side, side) for _ in range(n_references)), caption_tokens)
    vae_area = width * height if (flavour.is_plus and match_target_res) else 1024 * 1024
    side = int(math.sqrt(vae_area)) // 32 * 32
    vision_area = 384 * 384 if flavour.is_plus else 1024 * 1024
    vision_tokens = vision_area // (28 * 28)
    return SequenceShape(
        tokens_of(width, height), tuple(tokens_of(side, side) for _ in range(n_references)),
        n_references * vision_tokens + caption_tokens,
    )


@dataclass
class MemoryEstimate:
    parts: dict[str, float]  # GiB resident at the step's peak
    allocated: float
    reserved: float
    shape: SequenceShape
    blocks_to_swap: int
    host: dict[str, float] = field(default_factory=dict)  # GiB in CPU memory

    def lines(self) -> list[str]:
        out = [f"predicted GPU memory per training step ({self.shape.describe()}):"]
        out += [f"  {name:<34} {gib:6.2f} GiB" for name, gib in self.parts.items() if gib > 0.005]
        out.append(f"  {'peak allocated':<34} {self.allocated:6.2f} GiB")
        out.append(f"  {'peak reserved (allocator cache)':<34} {self.reserved:6.2f} GiB")
        if self.host:
            out.append("  in CPU memory: " + ", ".join(f"{name} {gib:.1f} GiB" for name, gib in self.host.items()))
        return out


def estimate_training_memory(config: TrainConfig, shape: SequenceShape, model: TransformerShape = TransformerShape()) -> MemoryEstimate:
    full_bytes = 4 if config.mixed_precision == "no" else 2
    block = model.block_bytes(config.base_model_precision, full_bytes)
    swapped = min(config.blocks_to_swap, model.num_layers)
    lora = model.lora_params(config.lora_rank) * 4
    moments = model.lora_params(config.lora_rank) * (2 if config.optimizer == "adamw8bit" else 8)
    token_bytes = shape.total * model.dim * 2
    if config.gradient_checkpointing:
        # gradient_checkpointing_interval N: blocks 0, N, 2N, ... are checkpointed, the others keep everything;
        # gradient_checkpointing_keep_attention: each checkpointed block also keeps its attention output
        checkpointed = math.ceil(model.num_layers / config.gradient_checkpointing_interval)
        block_inputs = checkpointed * token_bytes
        kept_attention = block_inputs if config.gradient_checkpointing_keep_attention else 0.0
        working = (WORKING_TENSORS_PER_TOKEN + (model.num_layers - checkpointed) * SAVED_TENSORS_PER_TOKEN) * token_bytes
    else:
        block_inputs = kept_attention = 0.0
        working = model.num_layers * SAVED_TENSORS_PER_TOKEN * token_bytes
    slots = min(2, swapped) * block
    parts = {
        f"weights ({config.base_model_precision}, {model.num_layers - swapped} blocks)": (model.num_layers - swapped) * block / GiB,
        "edge layers (full precision)": model.edge_bytes(full_bytes) / GiB,
        "block swap slots": slots / GiB,
        "LoRA weights + gradients (fp32)": 2 * lora / GiB,
        "optimizer state": 0.0 if config.offload_optimizer_state else moments / GiB,
        "checkpointed block inputs": 0.0 if config.offload_activations else block_inputs / GiB,
        "kept attention outputs": kept_attention / GiB,  # selective checkpointing keeps them on the card
        "one block's recompute + backward" if config.gradient_checkpointing else "saved activations": working / GiB,
        "other (RoPE tables, workspaces)": OTHER_GIB,
    }
    allocated = sum(parts.values())
    if config.offload_optimizer_state:  # the moments come back for optimizer.step(), when activations are gone
        allocated = max(allocated, allocated - parts["checkpointed block inputs"] - working / GiB + moments / GiB)
    host = {}
    if swapped:
        host["swapped blocks (pinned)"] = swapped * block / GiB
    if config.offload_activations and config.gradient_checkpointing:
        host["block inputs"] = block_inputs / GiB
    if config.offload_optimizer_state:
        host["optimizer state"] = moments / GiB
    reserved = allocated + RESERVED_SLACK * working / GiB + RESERVED_PER_SWAPPED_BLOCK_GIB * swapped
    return MemoryEstimate(parts, allocated, reserved, shape, swapped, host)


def usable_gib(card_gb: float) -> float:
    """What PyTorch can use on a card sold as `card_gb` GB."""
    return card_gb * CARD_VISIBLE - CUDA_CONTEXT_GIB


def fewest_blocks_to_swap(config: TrainConfig, shape: SequenceShape, card_gb: float, model: TransformerShape = TransformerShape()) -> int | None:
    """The smallest blocks_to_swap whose predicted reserved peak fits the card, or None if none does."""
    if not config.gradient_checkpointing:
        return None
    for blocks in range(model.num_layers + 1):
        trial = config.model_copy(update={"blocks_to_swap": blocks})
        if estimate_training_memory(trial, shape, model).reserved <= usable_gib(card_gb):
            return blocks
    return None


def transformer_shape(config: TrainConfig) -> TransformerShape:
    """The transformer's sizes from its config.json when the model is on disk, else the released model's
    (the 20B MMDiT, or Qwen-Image-2.1's for edit-2.1)."""
    import json
    from pathlib import Path

    local = Path(config.model_path) / "transformer" / "config.json"
    if local.is_file():
        return TransformerShape.from_config(json.loads(local.read_text()))
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(config.model_path, "transformer/config.json", local_files_only=True)
        return TransformerShape.from_config(json.loads(Path(path).read_text()))
    except Exception:  # not in the local cache: the released Edit models all share the 20B shape
        return QWEN_IMAGE_21 if config.flavour.is_21 else TransformerShape()


def largest_training_shape(manifest, dataset_config, config: TrainConfig) -> SequenceShape:
    """The sample with the most tokens among the manifest's training targets, at their training sizes."""
    best = None
    train = manifest[manifest["split"] == "train"]
    for dataset_id, width, height, refs in zip(train["dataset_id"], train["target_width"], train["target_height"], train["n_references"]):
        if not width or not height:
            continue
        bucket = dataset_config.by_id(dataset_id).bucket(int(width), int(height))
        shape = sample_shape(config.flavour, bucket, int(refs), config.model_kwargs.match_target_res)
        if best is None or shape.total > best.total:
            best = shape
    return best or sample_shape(config.flavour, (1024, 1024), config.flavour.max_references, config.model_kwargs.match_target_res)


def check_report(config: TrainConfig, shape: SequenceShape, card_gb: float | None, model: TransformerShape | None = None) -> list[str]:
    """What `qwen-edit check` prints: the estimate, and against a card, whether it fits and what would."""
    model = model or transformer_shape(config)
    estimate = estimate_training_memory(config, shape, model)
    lines = estimate.lines()
    if model.single_stream:
        lines.append("  (Qwen-Image-2.1: its weights are counted exactly, but the per-token activation factors were "
                     "fitted on the 20B MMDiT, not measured on this model)")
    if card_gb is None:
        lines.append("  (give --gpu-memory GB to compare with a card)")
        return lines
    usable = usable_gib(card_gb)
    verdict = "fits" if estimate.reserved <= usable else "does NOT fit"
    lines.append(f"  a {card_gb:g} GB card leaves about {usable:.1f} GiB to PyTorch: {verdict}")
    if estimate.reserved > usable:
        blocks = fewest_blocks_to_swap(config, shape, card_gb, model)
        if blocks is not None and blocks > config.blocks_to_swap:
            lines.append(f"  predicted to fit with blocks_to_swap {blocks}")
        elif not config.gradient_checkpointing:
            lines.append("  set gradient_checkpointing true (and then blocks_to_swap if needed)")
        else:
            lines.append("  no blocks_to_swap fits: quantise further (base_model_precision) or train at a lower resolution")
        if not (config.offload_activations and config.offload_optimizer_state):
            lines.append("  offload_activations and offload_optimizer_state save more at a few % of step time")
    return lines
