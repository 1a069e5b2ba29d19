"""A random-weight, real-architecture Qwen-Image Edit (or Qwen-Image-2.1) pipeline folder for tests and demos.

Every component is the real class (the same ones the Hub checkpoints load into), only tiny, and
the folder is written by `save_pretrained`, so code under test loads it with exactly the calls
it uses for `Qwen/Qwen-Image-Edit*`. The sizes are a known-working tiny set; the constraints
between them (what must equal what) are noted where each is set. edit-2.1's components are in
`trainer.demo.tiny_model_21`.
"""

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import torch
from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from trainer.demo.tiny_model_21 import processor_21, text_encoder_21, transformer_21, vae_21
from trainer.demo.tiny_tokenizer import build_tiny_tokenizer
from trainer.model.flavours import get_flavour

MARKER_FILE = "qwen_edit_tiny.json"

# Qwen-Image's VAE latent statistics (vae/config.json of the Hub checkpoints). Random weights
# make them meaningless numerically, but the pipelines' (un)normalisation code runs as for real.
QWEN_IMAGE_LATENTS_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]  # fmt: skip
QWEN_IMAGE_LATENTS_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]  # fmt: skip

Z_DIM = 16  # the real latent channel count; the transformer sees 2x2-packed latents
JOINT_DIM = 32  # transformer joint_attention_dim == text hidden_size == vision out_hidden_size

# Qwen2.5-VL's vision patching and preprocessor pixel bounds. The real max_pixels (12.8 MP, not
# transformers' 1.0 MP class default) keeps the pipelines' ~1 MP and 384x384 images from being
# shrunk; they are only snapped to multiples of 28 px.
PATCH, MERGE, TEMPORAL_PATCH = 14, 2, 2
MIN_PIXELS, MAX_PIXELS = 3136, 12845056

# Qwen-Image's scheduler_config.json.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=1.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=0.9,
    base_image_seq_len=256,
    max_image_seq_len=8192,
    shift_terminal=0.02,
    time_shift_type="exponential",
)


def _transformer(zero_cond_t: bool) -> QwenImageTransformer2DModel:
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * Z_DIM,  # 2x2 packed latent patches
        out_channels=Z_DIM,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=JOINT_DIM,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
        zero_cond_t=zero_cond_t,
    )


def _vae() -> AutoencoderKLQwenImage:
    return AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=Z_DIM,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],  # three entries: vae_scale_factor 8, as real
        latents_mean=QWEN_IMAGE_LATENTS_MEAN,
        latents_std=QWEN_IMAGE_LATENTS_STD,
    )


def _text_encoder(tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLForConditionalGeneration:
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=JOINT_DIM,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,  # grouped-query attention, like the 7B
            max_position_embeddings=128000,
            max_window_layers=2,
            rms_norm_eps=1e-6,
            # head dim 16: mrope sections must sum to head_dim / 2
            rope_parameters=dict(rope_type="default", mrope_section=[2, 3, 3], rope_theta=1000000.0),
            bos_token_id=ids("<|endoftext|>"),
            eos_token_id=ids("<|im_end|>"),
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=JOINT_DIM,
            patch_size=PATCH,
            spatial_merge_size=MERGE,
            temporal_patch_size=TEMPORAL_PATCH,
            window_size=112,
            fullatt_block_indexes=[1],  # windowed then full attention, as the real model alternates
            tokens_per_second=2,
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def _processor(tokenizer: Qwen2Tokenizer, max_pixels: int = MAX_PIXELS) -> Qwen2VLProcessor:
    sizes = dict(
        patch_size=PATCH,
        merge_size=MERGE,
        temporal_patch_size=TEMPORAL_PATCH,
        min_pixels=MIN_PIXELS,
        max_pixels=max_pixels,
    )
    # transformers 5 always gives Qwen2VLProcessor a video processor; pass one with the same
    # patching, or it builds a default one.
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**sizes),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**sizes),
    )


def _holds(folder: Path, wanted: dict) -> bool:
    """True when `folder` is a complete tiny pipeline built with the `wanted` flavour and seed."""
    if not (folder / "model_index.json").is_file() or not (folder / MARKER_FILE).is_file():
        return False
    marker = json.loads((folder / MARKER_FILE).read_text())
    return all(marker.get(k) == v for k, v in wanted.items())


def build_tiny_pipeline(
    out_dir: str | os.PathLike, flavour: str = "edit-v1", seed: int = 0, *, overwrite: bool = False
) -> Path:
    """Write a random-weight `flavour` pipeline folder at `out_dir` and return its path.

    Deterministic for a given seed. Idempotent: a complete folder of the same flavour and seed
    is kept as is unless `overwrite`. The folder appears atomically (built in a temp sibling,
    then renamed), so a crash or a concurrent builder never leaves a half-written one.
    """
    spec = get_flavour(flavour)
    out = Path(out_dir).resolve()
    wanted = {"flavour": spec.name, "seed": seed}

    if out.exists() and not overwrite:
        if _holds(out, wanted):
            return out
        if any(out.iterdir()):
            raise FileExistsError(
                f"{out} holds something other than a tiny {spec.name} pipeline of seed {seed}; "
                "pass overwrite=True to replace it"
            )

    out.parent.mkdir(parents=True, exist_ok=True)
    # A plain mkdir (not mkdtemp, which makes it 0700) so the folder gets the usual permissions.
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
            pipe = spec.pipeline_cls()(**_components(spec, seed))
        pipe.save_pretrained(tmp)
        marker = {**wanted, "pipeline_class": spec.pipeline_class}
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        _swap_into_place(tmp, out, overwrite, wanted)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _components(spec, seed: int) -> dict:
    """The pipeline's constructor arguments; every model seeded alike, in the same order."""
    tokenizer = build_tiny_tokenizer()
    builders = (
        (transformer_21, vae_21, lambda: text_encoder_21(tokenizer))
        if spec.is_21
        else (lambda: _transformer(spec.zero_cond_t), _vae, lambda: _text_encoder(tokenizer))
    )
    models = []
    for build in builders:
        torch.manual_seed(seed)
        models.append(build())
    transformer, vae, text_encoder = models
    components = dict(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=vae, text_encoder=text_encoder, transformer=transformer
    )
    if spec.is_21:  # Qwen3VLProcessor carries the tokenizer; QwenImage21Pipeline takes no separate one
        return {**components, "processor": processor_21(tokenizer)}
    return {**components, "tokenizer": tokenizer, "processor": _processor(tokenizer)}


def _swap_into_place(tmp: Path, out: Path, overwrite: bool, wanted: dict) -> None:
    """Rename `tmp` to `out`; an existing `out` is moved aside first only when overwriting."""
    old = None
    if overwrite and out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, old / "pipeline")
    try:
        os.replace(tmp, out)  # succeeds onto a missing or empty directory only
    except OSError:
        if not _holds(out, wanted):  # anything but a concurrent builder of the same pipeline
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
