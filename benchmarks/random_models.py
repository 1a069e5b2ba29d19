"""Random-weight models of the real Qwen-Image Edit architectures, built on the device without a download.

Each is built on the meta device, laid out empty on the device (`to_empty`), filled with small random
values (std 0.02) and given back what construction computes and `to_empty` leaves undefined: the
Qwen2.5-VL RoPE inverse frequencies (buffers, copied from a one-layer model of the same widths built
normally) and the transformer's RoPE tables (`pos_embed`, rebuilt). Layer counts can be cut (the
end-to-end benchmark's shallow pipeline); every width is the real one. `TINY` configs are the test
model's (trainer.demo.tiny_model), for CPU smoke runs of the benchmarks only.

Qwen2.5-VL-7B (Qwen-Image's text encoder): text hidden 3584, 28 layers, 28 heads (4 key/value), MLP
18944, vocabulary 152064, RMSNorm eps 1e-6, RoPE theta 1e6 with mrope sections (16, 24, 24); vision
tower 32 blocks of width 1280 (16 heads, MLP 3420), patch 14, 2x2 merge to 3584, windows of 112 px,
full attention in blocks 7, 15, 23, 31. The token ids of the special tokens are the tokenizer's: the
benchmarks use the tiny byte-level tokenizer (trainer.demo.tiny_tokenizer), whose ids all fall inside
the real vocabulary. The VAE and the transformer are diffusers' default configurations (the real ones).
"""

import torch
from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from trainer.demo import tiny_model


def qwen25_vl_7b_config(tokenizer, text_layers: int = 28, vision_depth: int = 32) -> Qwen2_5_VLConfig:
    ids = tokenizer.convert_tokens_to_ids
    full_attention = [i for i in (7, 15, 23, 31) if i < vision_depth] or [vision_depth - 1]
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=text_layers,
            num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000, max_window_layers=28,
            rms_norm_eps=1e-6, hidden_act="silu",
            rope_parameters=dict(rope_type="default", mrope_section=[16, 24, 24], rope_theta=1000000.0),
            bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), tie_word_embeddings=False,
        ),
        vision_config=dict(
            depth=vision_depth, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
            fullatt_block_indexes=full_attention, tokens_per_second=2, hidden_act="silu",
        ),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )


def _fill(model: torch.nn.Module, dtype: torch.dtype, device) -> torch.nn.Module:
    model = model.to(dtype).to_empty(device=device)  # cast while still on meta: no float32 copy on the card
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def random_text_encoder(config: Qwen2_5_VLConfig, device, dtype) -> Qwen2_5_VLForConditionalGeneration:
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    model = _fill(model, dtype, device).eval()
    # RoPE inverse frequencies are buffers computed at construction: from a one-layer model of the same widths
    small = config.to_dict()
    small["text_config"].update(num_hidden_layers=1, intermediate_size=8, vocab_size=4096)  # the special tokens stay inside it
    small["text_config"].pop("layer_types", None)  # per layer: derived again for the one layer
    small["vision_config"].update(depth=1, intermediate_size=8, fullatt_block_indexes=[0])
    with torch.device(device):
        reference = dict(Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**small)).named_buffers())
    for prefix, module in model.named_modules():
        for name in list(module._buffers):
            # in float32, as from_pretrained leaves them (`_fill` cast them to `dtype`);
            # a KeyError here: a buffer this benchmark does not know how to rebuild
            module._buffers[name] = reference[f"{prefix}.{name}" if prefix else name].clone()
    return model


def random_vae(device, dtype, tiny: bool = False) -> AutoencoderKLQwenImage:
    with torch.device("meta"):
        vae = AutoencoderKLQwenImage.from_config(tiny_model._vae().config) if tiny else AutoencoderKLQwenImage()
    assert not list(vae.buffers()), "the VAE gained buffers: rebuild them as the text encoder's are"
    return _fill(vae, dtype, device).eval()


def random_transformer(device, dtype, num_layers: int | None = None, tiny: bool = False) -> QwenImageTransformer2DModel:
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

    config = dict(tiny_model._transformer(False).config) if tiny else {}
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    if num_layers is not None:
        config["num_layers"] = num_layers
    with torch.device("meta"):
        model = QwenImageTransformer2DModel(**config)
    model = _fill(model, dtype, device)
    # the RoPE tables are plain attributes computed at construction: rebuilt off the meta device
    model.pos_embed = QwenEmbedRope(theta=10000, axes_dim=list(model.config.axes_dims_rope), scale_rope=True)
    return model


def tiny_text_encoder_config(tokenizer) -> Qwen2_5_VLConfig:
    return tiny_model._text_encoder(tokenizer).config
