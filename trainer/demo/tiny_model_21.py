"""The tiny random-weight Qwen-Image-2.1 components (`tiny-model --flavour edit-2.1`).

The real classes of `Qwen/Qwen-Image-2.1`, only small: `QwenImage21Transformer2DModel`,
`AutoencoderKLQwenImage21` (RGBA in and out, 16x, 64 latent channels as in the real model),
`Qwen3VLForConditionalGeneration` and a `Qwen3VLProcessor`. What must equal what:

- transformer `in_channels == out_channels == vae.z_dim` (2.1 feeds latents unpatched);
  `context_in_dim` = text `hidden_size` = vision `out_hidden_size`; `sum(axes_dims_rope)` =
  `attention_head_dim`;
- the VAE needs five `dim_mult` entries (four 2x downsamples: 16x) and four `temperal_downsample`;
- one vision-language image slot stands for a 2x2 group of latent tokens, i.e. 32 x 32 pixels:
  the vision `patch_size` 16 and `spatial_merge_size` 2, as in Qwen3-VL, and the processor's;
- text `sum(mrope_section) == head_dim / 2`; `deepstack_visual_indexes` below the vision depth.
"""

from diffusers import AutoencoderKLQwenImage21, QwenImage21Transformer2DModel
from transformers import (
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

Z_DIM_21 = 64  # Qwen-Image-2.1's latent channels
JOINT_DIM_21 = 32  # transformer context_in_dim == text hidden_size == vision out_hidden_size
PATCH_21, MERGE_21, TEMPORAL_PATCH_21 = 16, 2, 2  # Qwen3-VL's vision patching
# Qwen3-VL's pixel bounds, except the minimum: 32 x 32 (one image slot) instead of 256 x 256, so the
# tests' 32-64 px references reach the encoder unresized (the real minimum would upscale them and the
# pipeline could not run at that size; `conditioning_21.prepare_references` says so in words).
MIN_PIXELS_21, MAX_PIXELS_21 = 32 * 32, 16777216

# A chat template that renders messages as Qwen3-VL's does (the pipeline only tokenizes its system
# turn with it, to learn how many leading tokens to drop).
CHAT_TEMPLATE_21 = (
    # newlines as string literals: a literal newline beside `{%-` would be stripped
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- else -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def transformer_21() -> QwenImage21Transformer2DModel:
    return QwenImage21Transformer2DModel(
        patch_size=1,
        in_channels=Z_DIM_21,
        out_channels=Z_DIM_21,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        context_in_dim=JOINT_DIM_21,
        mlp_ratio=3,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
        causal_condition=True,  # as released: text and reference tokens modulated from t = 0
    )


def vae_21() -> AutoencoderKLQwenImage21:
    # latents_mean/std: the class defaults, which are the released checkpoint's 64 values
    return AutoencoderKLQwenImage21(
        base_dim=8,
        decoder_base_dim=8,
        z_dim=Z_DIM_21,
        dim_mult=[1, 2, 4, 4, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True, True, True],
    )


def text_encoder_21(tokenizer: Qwen2Tokenizer) -> Qwen3VLForConditionalGeneration:
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=JOINT_DIM_21,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            rope_parameters=dict(rope_type="default", mrope_section=[2, 3, 3], mrope_interleaved=True, rope_theta=5000000.0),
            bos_token_id=ids("<|endoftext|>"),
            eos_token_id=ids("<|im_end|>"),
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=JOINT_DIM_21,
            patch_size=PATCH_21,
            spatial_merge_size=MERGE_21,
            temporal_patch_size=TEMPORAL_PATCH_21,
            num_position_embeddings=64,  # an 8 x 8 grid, interpolated to each image's
            deepstack_visual_indexes=[0, 1],
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    return Qwen3VLForConditionalGeneration(config)


def processor_21(tokenizer: Qwen2Tokenizer) -> Qwen3VLProcessor:
    patching = dict(patch_size=PATCH_21, merge_size=MERGE_21, temporal_patch_size=TEMPORAL_PATCH_21)
    return Qwen3VLProcessor(
        # Qwen3-VL normalises with mean = std = 0.5
        image_processor=Qwen2VLImageProcessor(
            **patching, min_pixels=MIN_PIXELS_21, max_pixels=MAX_PIXELS_21, image_mean=[0.5] * 3, image_std=[0.5] * 3
        ),
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(**patching),
        chat_template=CHAT_TEMPLATE_21,
    )
