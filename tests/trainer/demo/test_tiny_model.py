"""The tiny random-weight pipeline: real classes, the Hub layout, and the pipelines run on it.

Each flavour's folder is built once per session. Pipeline calls are slow-ish even at 64 px
output, because the pipelines VAE-encode every reference at about 1 megapixel.
"""

import json
import time
from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImageTransformer2DModel,
)
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions as edit_v1_dimensions
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import CONDITION_IMAGE_SIZE
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions as plus_dimensions
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen2VLProcessor

from trainer.demo.tiny_model import MARKER_FILE, build_tiny_pipeline
from trainer.demo.tiny_tokenizer import SPECIAL_TOKENS, build_tiny_tokenizer
from trainer.model.flavours import FLAVOURS

PROMPT = "turn the red square into a blue circle"
DROPPED = 64  # prompt_template_encode_start_idx of both edit pipelines


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {name: build_tiny_pipeline(root / name, name) for name in FLAVOURS}


@pytest.fixture(scope="session")
def pipes(tiny_dirs) -> dict:
    loaded = {}
    for name, folder in tiny_dirs.items():
        pipe = FLAVOURS[name].pipeline_cls().from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        loaded[name] = pipe
    return loaded


def reference(color: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (64, 64), color)


def template_prefix(pipeline_cls) -> str:
    """Everything before the user text: the system turn and the user header."""
    return pipeline_cls(None, None, None, None, None, None).prompt_template_encode.split("{}")[0]


# --- tokenizer ---------------------------------------------------------------------------


def test_tokenizer_is_a_small_qwen2_tokenizer_with_qwen_special_tokens():
    tokenizer = build_tiny_tokenizer()
    assert type(tokenizer) is Qwen2Tokenizer
    assert len(tokenizer) < 1000
    ids = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
    assert ids == list(range(ids[0], ids[0] + len(SPECIAL_TOKENS)))  # after the BPE vocab, in Qwen's order
    assert tokenizer.tokenize("<|vision_start|><|image_pad|><|vision_end|>") == [
        "<|vision_start|>",
        "<|image_pad|>",
        "<|vision_end|>",
    ]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"


def test_tokenizer_round_trips_any_text():
    tokenizer = build_tiny_tokenizer()
    text = "Make the café's sign say 'OPEN' ✓ 猫"  # unseen words fall back to bytes, never unk
    assert tokenizer.decode(tokenizer(text).input_ids) == text


def test_edit_plus_prefix_is_exactly_the_64_dropped_tokens():
    prefix = template_prefix(QwenImageEditPlusPipeline)
    assert prefix.endswith("<|im_start|>user\n")
    assert len(build_tiny_tokenizer()(prefix).input_ids) == DROPPED


def test_edit_v1_drops_the_system_turn_and_keeps_the_vision_tokens():
    tokenizer = build_tiny_tokenizer()
    prefix = template_prefix(QwenImageEditPipeline)
    assert prefix.endswith("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>")
    tokens = tokenizer.tokenize(prefix)
    assert tokens[DROPPED - 2 : DROPPED] == ["user", "Ċ"]
    assert tokens[DROPPED:] == ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]


def test_tokenizer_is_deterministic():
    a, b = build_tiny_tokenizer(), build_tiny_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    assert a(PROMPT).input_ids == b(PROMPT).input_ids


# --- the folder --------------------------------------------------------------------------


@pytest.mark.parametrize("name", [name for name, flavour in FLAVOURS.items() if not flavour.is_21])  # 2.1: test_tiny_model_21
def test_folder_loads_as_its_pipeline_class(pipes, tiny_dirs, name):
    pipe = pipes[name]
    assert type(pipe) is FLAVOURS[name].pipeline_cls()
    assert type(pipe.transformer) is QwenImageTransformer2DModel
    assert type(pipe.vae) is AutoencoderKLQwenImage
    assert type(pipe.text_encoder) is Qwen2_5_VLForConditionalGeneration
    assert type(pipe.tokenizer) is Qwen2Tokenizer
    assert type(pipe.processor) is Qwen2VLProcessor
    assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler
    assert pipe.vae_scale_factor == 8  # like the real model
    assert pipe.transformer.config.zero_cond_t is FLAVOURS[name].zero_cond_t
    assert json.loads((tiny_dirs[name] / MARKER_FILE).read_text())["flavour"] == name


def test_edit_v3_conditions_references_at_timestep_zero(tiny_dirs):
    config = QwenImageTransformer2DModel.load_config(tiny_dirs["edit-v3"], subfolder="transformer")
    assert config["zero_cond_t"] is True


def test_components_load_one_by_one_like_hub_checkpoints(tiny_dirs):
    folder = tiny_dirs["edit-v2"]
    transformer = QwenImageTransformer2DModel.from_pretrained(folder, subfolder="transformer")
    vae = AutoencoderKLQwenImage.from_pretrained(folder, subfolder="vae")
    text_encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, subfolder="text_encoder")
    processor = Qwen2VLProcessor.from_pretrained(folder, subfolder="processor")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")

    # The shapes that must agree for the pipelines to run at all.
    assert transformer.config.in_channels == 4 * vae.config.z_dim
    assert transformer.config.joint_attention_dim == text_encoder.config.text_config.hidden_size
    assert text_encoder.config.vision_config.out_hidden_size == text_encoder.config.text_config.hidden_size
    assert processor.image_processor.patch_size == text_encoder.config.vision_config.patch_size
    assert processor.image_processor.merge_size == text_encoder.config.vision_config.spatial_merge_size
    assert processor.image_processor.size.longest_edge == 12845056  # Qwen2.5-VL's max_pixels
    assert scheduler.config.use_dynamic_shifting and scheduler.config.time_shift_type == "exponential"
    assert len(vae.config.latents_mean) == len(vae.config.latents_std) == 16


def test_build_is_deterministic_for_a_seed(tmp_path):
    def files(folder: Path) -> dict[str, bytes]:
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    a = files(build_tiny_pipeline(tmp_path / "a", "edit-v1", seed=1))
    b = files(build_tiny_pipeline(tmp_path / "b", "edit-v1", seed=1))
    c = files(build_tiny_pipeline(tmp_path / "c", "edit-v1", seed=2))
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert a == b
    assert a[weights] != c[weights]


def test_build_keeps_an_existing_folder_unless_told_to_overwrite(tmp_path):
    folder = build_tiny_pipeline(tmp_path / "pipe", "edit-v2")
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    first = weights.stat().st_mtime_ns

    assert build_tiny_pipeline(folder, "edit-v2") == folder
    assert weights.stat().st_mtime_ns == first

    with pytest.raises(FileExistsError):
        build_tiny_pipeline(folder, "edit-v3")  # a different pipeline is never silently replaced

    build_tiny_pipeline(folder, "edit-v3", overwrite=True)
    assert json.loads((folder / MARKER_FILE).read_text())["flavour"] == "edit-v3"
    assert [p.name for p in tmp_path.iterdir()] == ["pipe"]  # no temp siblings left behind


def test_build_leaves_the_callers_random_state_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_pipeline(tmp_path / "pipe", "edit-v1", seed=7)
    assert torch.equal(torch.rand(3), expected)


# --- the pipelines run on it -------------------------------------------------------------


def expected_embeds_length(pipe, user_text: str, images: list[Image.Image]) -> int:
    """Every token after the dropped system prefix is kept; each <|image_pad|> placeholder
    expands to one token per 2x2 group of 14 px patches."""
    text_tokens = len(pipe.tokenizer(pipe.prompt_template_encode.format(user_text)).input_ids)
    grid = pipe.processor.image_processor(images, return_tensors="pt")["image_grid_thw"]
    image_tokens = int(grid.prod(-1).sum()) // pipe.processor.image_processor.merge_size**2
    return text_tokens - len(images) + image_tokens - DROPPED


def test_edit_v1_encodes_the_prompt_with_its_one_megapixel_reference(pipes):
    pipe = pipes["edit-v1"]
    width, height, _ = edit_v1_dimensions(1024 * 1024, 1.0)  # what __call__ feeds the text encoder
    image = pipe.image_processor.resize(reference((200, 30, 30)), height, width)

    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(PROMPT, image=image)

    assert embeds.shape == (1, expected_embeds_length(pipe, PROMPT, [image]), 32)  # 32: joint_attention_dim
    assert mask is None  # a single prompt has no padding


def test_edit_v2_encodes_the_prompt_with_two_384px_references(pipes):
    pipe = pipes["edit-v2"]
    width, height = plus_dimensions(CONDITION_IMAGE_SIZE, 1.0)
    images = [pipe.image_processor.resize(reference(c), height, width) for c in [(200, 30, 30), (30, 30, 200)]]
    user_text = "".join(f"Picture {i}: <|vision_start|><|image_pad|><|vision_end|>" for i in (1, 2)) + PROMPT

    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(PROMPT, image=images)

    assert embeds.shape == (1, expected_embeds_length(pipe, user_text, images), 32)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, references",
    [("edit-v1", [(200, 30, 30)]), ("edit-v2", [(200, 30, 30), (30, 30, 200)])],
)
def test_pipeline_generates_a_small_image_with_true_cfg(pipes, name, references):
    pipe = pipes[name]
    images = [reference(c) for c in references]
    started = time.perf_counter()

    result = pipe(
        image=images[0] if name == "edit-v1" else images,
        prompt=PROMPT,
        negative_prompt=" ",
        true_cfg_scale=2.0,
        height=64,
        width=64,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
    )

    print(f"{name} pipeline call: {time.perf_counter() - started:.1f} s")  # dominated by 1 MP VAE encodes
    assert result.images[0].size == (64, 64)
