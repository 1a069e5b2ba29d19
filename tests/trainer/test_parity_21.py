"""edit-2.1: training and validation condition Qwen-Image-2.1's transformer exactly as `QwenImage21Pipeline` does.

As `test_parity.py` does for edit-v1/v2/v3: one real true-CFG `pipeline(...)` call on the tiny
random-weight model is recorded by hooks on its transformer (they only copy arguments and
outputs), and the trainer's own code paths are held against the recording:

- `trainer.model.conditioning` / `conditioning_21` (the cache builders' code): prompt embeddings,
  mask and `image_pad_mask` (-> `img_mask`), the references' latent tokens (before the target's)
  and `img_shapes`;
- `trainer.training.loss.flow_matching_loss`, with the transformer loaded as training loads it,
  makes each denoising step's call and gets its prediction;
- `trainer.evaluation.validation` + `sampling.generate_latents_21` end at the pipeline's latents,
  KV cache and the checkpoint's `sample_sigmas` included.

Two references of different aspect ratios, the second RGBA with transparent pixels: the VAE reads
its alpha, the Qwen3-VL encoder sees it composited on white, as the pipeline does. The pipeline is
called with `output_resolution` = the output side, the area training gives references (the
target's). Float32 on the CPU; `EXACT` where the computation is the same, `REBUILT` where the
trainer rebuilds a noisy latent as (1 - σ)·x0 + σ·ε, or where the pipeline's later steps read the
references' keys and values from its KV cache (another attention layout, other rounding).
"""

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import QwenImage21Transformer2DModel
from PIL import Image

from trainer.config.parsing import parse_train_config
from trainer.config.schema import TrainConfig
from trainer.data.caches import CachedSample
from trainer.data.images import on_white
from trainer.demo.tiny_model import build_tiny_pipeline
from trainer.evaluation.validation import edit_latents, encode_conditioning
from trainer.model import conditioning_21
from trainer.model.conditioning import ReferenceInputs, embed_prompt, encode_image_latents, prepare_references
from trainer.model.loading import load_pipeline, load_transformer
from trainer.training.flow_matching import velocity_target
from trainer.training.loss import flow_matching_loss

PROMPT = "turn the red square into a blue circle"
NEGATIVE = " "
SIZE = 64  # output side: 4 x 4 latents (16x VAE), 16 target tokens, 4 image slots
STEPS = 2
TRUE_CFG = 4.0
SEED = 1234
REFERENCE_SIZES = [(64, 64), (128, 64)]  # at the output's area: 64 x 64 and 96 x 32
TARGET_TOKENS = (SIZE // 16) ** 2

EXACT = dict(rtol=0.0, atol=0.0)
REBUILT = dict(rtol=1e-5, atol=1e-5)


def noise_image(size: tuple[int, int], seed: int, transparent: bool = False) -> Image.Image:
    """A textured reference; `transparent`: RGBA with its left half see-through (alpha 0) and a ramp."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    if not transparent:
        return Image.fromarray(pixels)
    alpha = np.tile(np.linspace(0, 255, size[0]).astype(np.uint8), (size[1], 1))
    alpha[:, : size[0] // 2] = 0
    return Image.fromarray(np.dstack([pixels, alpha]), "RGBA")


def _copy(value):
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


@contextmanager
def transformer_calls(transformer):
    """Records every call of the real `transformer`: its keyword arguments and its output."""
    calls: list[dict] = []

    def before(module, args, kwargs):
        assert not args, "the pipeline and the trainer call the transformer with keywords only"
        calls.append({key: _copy(value) for key, value in kwargs.items()})

    def after(module, args, kwargs, output):
        calls[-1]["output"] = _copy(output[0])

    handles = [
        transformer.register_forward_pre_hook(before, with_kwargs=True),
        transformer.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class Case:
    config: TrainConfig
    pipe: object
    references: list[Image.Image]
    pipeline_calls: list[dict]  # per step: positive prompt, then negative prompt
    pipeline_latents: torch.Tensor  # pipeline(..., output_type="latent").images, [1, 16, 64]
    positive: object  # trainer.model.conditioning.PromptEmbedding
    negative: object
    reference_latents: list[torch.Tensor]  # each [64, h, w]

    @property
    def positive_calls(self) -> list[dict]:
        return self.pipeline_calls[0::2]

    @property
    def negative_calls(self) -> list[dict]:
        return self.pipeline_calls[1::2]


def run_pipeline(pipe, references):
    with torch.no_grad():
        return pipe(
            image=references,
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            true_cfg_scale=TRUE_CFG,
            height=SIZE,
            width=SIZE,
            output_resolution=SIZE,
            num_inference_steps=STEPS,
            generator=torch.Generator("cpu").manual_seed(SEED),
            output_type="latent",
        ).images


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> Case:
    folder = build_tiny_pipeline(tmp_path_factory.mktemp("parity21") / "edit-2.1", "edit-2.1")
    config = parse_train_config(
        {
            "pretrained_model_name_or_path": str(folder),
            "model_flavour": "edit-2.1",
            "mixed_precision": "no",
            "report_to": "none",
            "validation_resolution": f"{SIZE}x{SIZE}",
            "validation_num_inference_steps": STEPS,
            "validation_guidance": TRUE_CFG,
            "validation_negative_prompt": NEGATIVE,
            "validation_seed": SEED,
        }
    )
    pipe = load_pipeline(config, torch.device("cpu"), torch.float32)
    references = [noise_image(REFERENCE_SIZES[0], 0), noise_image(REFERENCE_SIZES[1], 1, transparent=True)]
    with transformer_calls(pipe.transformer) as calls:
        latents = run_pipeline(pipe, references)
    assert len(calls) == 2 * STEPS  # true CFG: a positive and a negative call per step

    refs = prepare_references(pipe, config.flavour, references, (SIZE, SIZE))
    positive = embed_prompt(pipe, config.flavour, PROMPT, refs)
    negative = embed_prompt(pipe, config.flavour, NEGATIVE, refs)
    reference_latents = [encode_image_latents(pipe, image) for image in refs.vae_images]
    return Case(config, pipe, references, calls, latents, positive, negative, reference_latents)


def assert_same_mask(actual, expected) -> None:
    if expected is None:
        assert actual is None
    else:
        torch.testing.assert_close(actual, expected, **EXACT)


def expected_mask(mask: torch.Tensor):
    return None if bool(mask.all()) else mask[None]


# --- 1. prompt embeddings, mask and image slots ------------------------------------------------


def test_prompt_embeddings_and_image_slots_are_what_the_pipeline_feeds_the_transformer(case):
    """`embed_prompt` (the text cache) gives the pipeline's positive and negative embeddings bit for
    bit, both references in the Qwen3-VL encoder; its `image_pad_mask` plus the target's slots is the
    pipeline's `img_mask`: one slot per 2x2 latent tokens of each reference, then of the target."""
    slots = sum(latent.shape[-2] * latent.shape[-1] for latent in case.reference_latents) // 4
    for embedding, calls in ((case.positive, case.positive_calls), (case.negative, case.negative_calls)):
        assert int(embedding.image_pad_mask.sum()) == slots
        for call in calls:
            torch.testing.assert_close(call["encoder_hidden_states"], embedding.embeds[None], **EXACT)
            assert_same_mask(call["encoder_hidden_states_mask"], expected_mask(embedding.mask))
            torch.testing.assert_close(call["img_mask"], conditioning_21.img_mask(embedding.image_pad_mask, TARGET_TOKENS), **EXACT)
    assert case.pipeline_calls[0]["encoder_hidden_states_mask"] is None  # one prompt, no padding


# --- 2. reference latents and img_shapes -------------------------------------------------------


def test_reference_latents_come_first_and_img_shapes_are_the_pipelines(case):
    """The VAE cache's reference latents (64 channels, 16x), flattened and concatenated in order, are
    the tokens *before* the target's in the pipeline's `hidden_states`; `img_shapes` lists each
    reference, then the target."""
    assert [tuple(latent.shape) for latent in case.reference_latents] == [(64, 4, 4), (64, 2, 6)]
    references = torch.cat([conditioning_21.pack(latent[None]) for latent in case.reference_latents], dim=1)
    shapes = conditioning_21.img_shapes(torch.empty(64, SIZE // 16, SIZE // 16), case.reference_latents)
    for call in case.pipeline_calls:
        assert call["hidden_states"].shape[1] == references.shape[1] + TARGET_TOKENS
        torch.testing.assert_close(call["hidden_states"][:, : references.shape[1]], references, **EXACT)
        assert call["img_shapes"] == shapes


def test_the_vae_reads_the_alpha_channel_and_the_vl_encoder_sees_white(case):
    """What the parity above rests on for RGBA references: the VAE's input has 4 channels with the
    alpha as given (so the transparent reference's latents differ from its on-white copy's), and the
    Qwen3-VL encoder reads the resized reference composited on white."""
    refs = prepare_references(case.pipe, case.config.flavour, case.references, (SIZE, SIZE))
    assert [tuple(image.shape[:2]) for image in refs.vae_images] == [(1, 4), (1, 4)]
    alpha = refs.vae_images[1][0, 3, 0]
    assert float(alpha[:, : alpha.shape[1] // 3].max()) == -1.0  # alpha 0 -> -1 in [-1, 1] (away from the resized edge)
    flattened = [case.references[0], on_white(case.references[1])]
    flat = prepare_references(case.pipe, case.config.flavour, flattened, (SIZE, SIZE))
    assert not torch.allclose(encode_image_latents(case.pipe, flat.vae_images[1]), case.reference_latents[1])
    # the encoder's copy: the resized RGBA image, composited on white (by the pipeline's encode_prompt)
    on_white_copies = ReferenceInputs([on_white(image) for image in refs.prompt_images], refs.vae_images)
    assert refs.prompt_images[1].mode == "RGBA" and on_white_copies.prompt_images[1].mode == "RGB"
    torch.testing.assert_close(embed_prompt(case.pipe, case.config.flavour, PROMPT, on_white_copies).embeds, case.positive.embeds, **EXACT)


# --- 3. the training forward pass --------------------------------------------------------------


def test_training_forward_pass_is_each_denoising_step(case):
    """At σ = the pipeline's t/1000 and an x_t equal to its latents, `flow_matching_loss` (the
    transformer loaded as training loads it) calls the transformer with the pipeline's inputs and
    gets its (positive-prompt) prediction; the loss is the MSE of that prediction's target tokens
    against ε - x0.

    Step 0 (σ = 1, the pipeline prefilling its KV cache: the whole sequence, as training) is exact;
    at step 1 x0 is solved from x_t and a random ε, and the pipeline computes only the target's
    queries against cached keys and values: within `REBUILT`."""
    transformer = load_transformer(case.config, torch.float32)
    assert type(transformer) is QwenImage21Transformer2DModel and transformer.config.causal_condition
    generator = torch.Generator().manual_seed(0)
    sigmas = []
    for step, pipeline_call in enumerate(case.positive_calls):
        sigma = pipeline_call["timestep"]
        sigmas.append(float(sigma))
        x_t = conditioning_21.unpack(pipeline_call["hidden_states"][:, -TARGET_TOKENS:], SIZE // 16, SIZE // 16)
        if float(sigma) == 1.0:
            noise, x0 = x_t, torch.randn(x_t.shape, generator=generator)
            tolerance = EXACT
        else:
            noise = torch.randn(x_t.shape, generator=generator)
            x0 = (x_t - sigma * noise) / (1 - sigma)
            tolerance = REBUILT
        sample = CachedSample(
            f"step{step}", case.positive.embeds, case.positive.mask, x0[0], case.reference_latents,
            image_pad_mask=case.positive.image_pad_mask,
        )
        with transformer_calls(transformer) as calls:
            loss = flow_matching_loss(transformer, sample, sigma, noise, torch.float32)
        (train_call,) = calls

        torch.testing.assert_close(train_call["hidden_states"], pipeline_call["hidden_states"], **tolerance)
        for key in ("timestep", "encoder_hidden_states", "img_mask"):
            torch.testing.assert_close(train_call[key], pipeline_call[key], **EXACT)
        assert_same_mask(train_call["encoder_hidden_states_mask"], pipeline_call["encoder_hidden_states_mask"])
        assert train_call["img_shapes"] == pipeline_call["img_shapes"]
        assert not pipeline_call["attention_kwargs"] and pipeline_call["kv_cache_mode"] == ("extract", "cached")[step]
        prediction = pipeline_call["output"][:, -TARGET_TOKENS:]
        torch.testing.assert_close(train_call["output"][:, -TARGET_TOKENS:], prediction, **tolerance)

        expected_loss = F.mse_loss(prediction, conditioning_21.pack(velocity_target(x0, noise)))
        torch.testing.assert_close(loss.detach(), expected_loss, **REBUILT)
    assert sigmas[0] == 1.0 and 0.0 < sigmas[1] < 1.0  # both regimes were checked


# --- 4. the validation sampler -----------------------------------------------------------------


def test_validation_sampler_ends_at_the_pipelines_latents(case):
    """`encode_conditioning` + `edit_latents` (the 2.1 loop over cached conditioning, as validation
    runs it) reproduce `pipeline(..., output_type="latent")` exactly: same calls (KV cache modes
    included), same final latents."""
    cond = encode_conditioning(case.pipe, case.config, PROMPT, case.references)
    torch.testing.assert_close(cond.prompt_embeds, case.positive.embeds[None], **EXACT)
    torch.testing.assert_close(cond.negative_image_pad_mask, case.negative.image_pad_mask[None], **EXACT)
    with transformer_calls(case.pipe.transformer) as calls:
        latents = edit_latents(case.pipe, case.config, cond)
    assert len(calls) == len(case.pipeline_calls)
    for ours, theirs in zip(calls, case.pipeline_calls):
        for key in ("hidden_states", "timestep", "encoder_hidden_states", "img_mask", "output"):
            torch.testing.assert_close(ours[key], theirs[key], **EXACT)
        assert ours["img_shapes"] == theirs["img_shapes"] and ours["kv_cache_mode"] == theirs["kv_cache_mode"]
    assert latents.shape == case.pipeline_latents.shape == (1, TARGET_TOKENS, 64)
    torch.testing.assert_close(latents, case.pipeline_latents, **EXACT)


def test_the_checkpoints_sample_sigmas_set_the_schedule_as_in_the_pipeline(case):
    """A checkpoint whose model_index.json sets `sample_sigmas`: the pipeline samples on them (their
    number sets the steps, whatever validation_num_inference_steps says), and so does validation."""
    pipe = case.pipe
    pipe.register_to_config(sample_sigmas=[1.0, 0.75, 0.4])
    try:
        theirs = run_pipeline(pipe, case.references)
        cond = encode_conditioning(pipe, case.config, PROMPT, case.references)
        with transformer_calls(pipe.transformer) as calls:
            ours = edit_latents(pipe, case.config, cond)
    finally:
        pipe.register_to_config(sample_sigmas=None)
    assert len(calls) == 2 * 3
    torch.testing.assert_close(ours, theirs, **EXACT)
    assert not torch.equal(ours, case.pipeline_latents)


# --- 5. causal_condition -----------------------------------------------------------------------


def test_causal_condition_is_on_where_both_paths_load_the_model_and_it_matters(case):
    """Qwen-Image-2.1 modulates text and reference tokens from t = 0 (`causal_condition`), which the
    transformer derives from `img_shapes`/`img_mask` (tests 1-4: passed exactly as the pipeline). The
    flag is set where training and validation load the model, and it changes the prediction, so the
    parity above is not vacuous."""
    assert case.pipe.transformer.config.causal_condition is True
    call = case.positive_calls[-1]  # σ < 1: t = 0 for the references differs from the real t
    inputs = {k: v for k, v in call.items() if k not in ("output", "kv_cache", "kv_cache_mode")}
    without = QwenImage21Transformer2DModel.from_pretrained(case.config.model_path, subfolder="transformer", causal_condition=False)
    with torch.no_grad():
        with_flag = case.pipe.transformer(**inputs)[0][:, -TARGET_TOKENS:]
        torch.testing.assert_close(with_flag, call["output"][:, -TARGET_TOKENS:], **REBUILT)
        assert not torch.allclose(without(**inputs)[0][:, -TARGET_TOKENS:], with_flag, atol=1e-4)
