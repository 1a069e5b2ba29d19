"""Training and validation condition the transformer exactly as the diffusers pipelines do.

For each flavour, a real `pipeline(...)` call on the tiny random-weight model is recorded by
hooks on its transformer (the hooks only copy the arguments and the output; nothing in
diffusers is mocked). The trainer's own code paths are then held against those recordings:

- `trainer.model.conditioning` (the cache builders' code): prompt embeddings and mask, packed
  reference latents and `img_shapes` equal what the pipeline passes to the transformer;
- `trainer.training.recipe.flow_matching_loss`, with the transformer loaded as training loads it, calls
  the transformer with the same inputs as each denoising step and gets the same prediction;
- `trainer.evaluation.validation` + `trainer.evaluation.sampling` (our copy of the denoising loop) end at the same
  latents as `pipeline(..., output_type="latent")` for the same seed, steps and true CFG.

edit-v2/v3 use two references of different aspect ratios, so ordering, per-reference sizes
and the `Picture i:` prompt all matter. Everything runs in float32 on the CPU.

Tolerances: identical computations (the same code on the same inputs) must agree exactly
(`EXACT`). The one place that cannot be exact is a noisy latent the trainer rebuilds as
(1 - σ)·x0 + σ·ε for σ < 1, which rounds differently from the scheduler's Euler step; there
inputs and outputs agree within `REBUILT` (absolute and relative 1e-5).
"""

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import QwenImageTransformer2DModel
from PIL import Image

from trainer.config.parsing import parse_train_config
from trainer.config.schema import TrainConfig
from trainer.data.caches import CachedSample
from trainer.demo.tiny_model import build_tiny_pipeline
from trainer.evaluation.validation import edit_latents, encode_conditioning
from trainer.model.conditioning import (
    encode_image_latents,
    encode_prompt,
    img_shapes,
    pack,
    prepare_references,
    unpack,
)
from trainer.model.flavours import FLAVOURS
from trainer.model.loading import load_pipeline, load_transformer
from trainer.training.flow_matching import velocity_target
from trainer.training.loss import flow_matching_loss

pytestmark = pytest.mark.slow

PROMPT = "turn the red square into a blue circle"
NEGATIVE = " "
SIZE = 64  # output width and height in pixels: 8x8 latents, 4x4 = 16 target tokens
STEPS = 2
TRUE_CFG = 4.0
SEED = 1234
TARGET_LATENT_SHAPE = (16, SIZE // 8, SIZE // 8)  # the VAE's 16 channels at 1/8 scale

EXACT = dict(rtol=0.0, atol=0.0)
REBUILT = dict(rtol=1e-5, atol=1e-5)

# Reference sizes (width, height) per flavour; the pipelines resize each to ~1 MP for the VAE.
REFERENCE_SIZES = {
    "edit-v1": [(64, 48)],
    "edit-v2": [(64, 64), (96, 64)],
    "edit-v3": [(64, 64), (96, 64)],
}


def noise_image(size: tuple[int, int], seed: int) -> Image.Image:
    """A textured reference (a flat colour would make every latent token alike)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _copy(value):
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


@contextmanager
def transformer_calls(transformer):
    """Records every call of the real `transformer`: its keyword arguments and its output."""
    calls: list[dict] = []

    def before(module, args, kwargs):
        assert not args, "the pipelines and the trainer call the transformer with keywords only"
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
    """One flavour: its pipeline, what `pipeline(...)` fed its transformer, and the trainer's encodings."""

    name: str
    config: TrainConfig
    pipe: object
    references: list[Image.Image]
    pipeline_calls: list[dict]  # per step: positive prompt, then negative prompt
    pipeline_latents: torch.Tensor  # pipeline(..., output_type="latent").images, [1, 16, 64]
    prompt_embeds: torch.Tensor  # [T, D], trainer.model.conditioning.encode_prompt
    prompt_embeds_mask: torch.Tensor  # [T]
    negative_embeds: torch.Tensor
    negative_mask: torch.Tensor
    reference_latents: list[torch.Tensor]  # each [16, h, w], trainer.model.conditioning.encode_image_latents

    @property
    def target_tokens(self) -> int:
        return (SIZE // 16) ** 2

    @property
    def positive_calls(self) -> list[dict]:
        return self.pipeline_calls[0::2]

    @property
    def negative_calls(self) -> list[dict]:
        return self.pipeline_calls[1::2]


@pytest.fixture(scope="module", params=[name for name, flavour in FLAVOURS.items() if not flavour.is_21])  # 2.1: test_parity_21
def case(request, tmp_path_factory) -> Case:
    """Builds the flavour's tiny pipeline, records one true-CFG pipeline call, encodes as the trainer does."""
    name = request.param
    folder = build_tiny_pipeline(tmp_path_factory.mktemp("parity") / name, name)
    config = parse_train_config(
        {
            "pretrained_model_name_or_path": str(folder),
            "model_flavour": name,
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
    references = [noise_image(size, seed) for seed, size in enumerate(REFERENCE_SIZES[name])]

    with transformer_calls(pipe.transformer) as calls, torch.no_grad():
        latents = pipe(
            image=references if config.flavour.is_plus else references[0],
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            true_cfg_scale=TRUE_CFG,
            height=SIZE,
            width=SIZE,
            num_inference_steps=STEPS,
            generator=torch.Generator("cpu").manual_seed(SEED),
            output_type="latent",
        ).images
    assert len(calls) == 2 * STEPS  # true CFG: a positive and a negative call per step

    refs = prepare_references(pipe, config.flavour, references)
    embeds, mask = encode_prompt(pipe, config.flavour, PROMPT, refs)
    negative, negative_mask = encode_prompt(pipe, config.flavour, NEGATIVE, refs)
    reference_latents = [encode_image_latents(pipe, image) for image in refs.vae_images]
    return Case(name, config, pipe, references, calls, latents, embeds, mask, negative, negative_mask, reference_latents)


def expected_mask(mask: torch.Tensor) -> torch.Tensor | None:
    """The pipelines pass `encoder_hidden_states_mask=None` when the mask is all ones."""
    return None if bool(mask.all()) else mask[None]


def assert_same_mask(actual: torch.Tensor | None, expected: torch.Tensor | None) -> None:
    if expected is None:
        assert actual is None
    else:
        torch.testing.assert_close(actual, expected, **EXACT)


# --- 1. prompt embeddings -----------------------------------------------------------------


def test_prompt_embeddings_are_what_the_pipeline_feeds_the_transformer(case):
    """`prepare_references` + `encode_prompt` (the text cache) give the pipeline's positive and
    negative embeddings bit for bit, references included; the cached all-ones mask is what the
    pipeline expresses as `encoder_hidden_states_mask=None`."""
    assert case.prompt_embeds.dim() == 2 and case.prompt_embeds_mask.shape == case.prompt_embeds.shape[:1]
    for call in case.positive_calls:
        torch.testing.assert_close(call["encoder_hidden_states"], case.prompt_embeds[None], **EXACT)
        assert_same_mask(call["encoder_hidden_states_mask"], expected_mask(case.prompt_embeds_mask))
    for call in case.negative_calls:
        torch.testing.assert_close(call["encoder_hidden_states"], case.negative_embeds[None], **EXACT)
        assert_same_mask(call["encoder_hidden_states_mask"], expected_mask(case.negative_mask))
    # a single prompt has no padding, so this run exercises the None branch
    assert case.pipeline_calls[0]["encoder_hidden_states_mask"] is None and bool(case.prompt_embeds_mask.all())


# --- 2. reference latents and img_shapes ----------------------------------------------------


def test_reference_latents_and_img_shapes_are_the_pipelines(case):
    """The VAE cache's reference latents, packed and concatenated in order, are exactly the
    tokens after the target's in the pipeline's `hidden_states`, and `img_shapes` (target, then
    each reference) is the pipeline's."""
    assert len(case.reference_latents) == len(REFERENCE_SIZES[case.name])
    if case.name != "edit-v1":  # two references of different aspect ratios, at ~1 MP each
        assert case.reference_latents[0].shape != case.reference_latents[1].shape
    references = torch.cat([pack(latent[None]) for latent in case.reference_latents], dim=1)
    shapes = img_shapes(torch.empty(TARGET_LATENT_SHAPE), case.reference_latents)
    for call in case.pipeline_calls:
        hidden = call["hidden_states"]
        assert hidden.shape[1] == case.target_tokens + references.shape[1]
        torch.testing.assert_close(hidden[:, case.target_tokens :], references, **EXACT)
        assert [list(s) for s in call["img_shapes"]] == [list(s) for s in shapes]


# --- 3. the training forward pass ----------------------------------------------------------


def test_training_forward_pass_is_each_denoising_step(case):
    """At σ = the pipeline's t/1000 and an x_t equal to its latents, `flow_matching_loss`, with
    the transformer loaded as training loads it, calls the transformer with the pipeline's
    inputs and gets the pipeline's (positive-prompt) noise prediction; the loss is the MSE of
    exactly that prediction, sliced to the target tokens, against ε - x0.

    Step 0 has σ = 1, so x_t is ε itself and the comparison is exact; at the later step x0 is
    solved from x_t and a random ε, and the rebuilt x_t rounds within `REBUILT`."""
    transformer = load_transformer(case.config, torch.float32)
    assert transformer.config.zero_cond_t is case.config.flavour.zero_cond_t
    height = width = SIZE // 8
    generator = torch.Generator().manual_seed(0)
    sigmas = []
    for step, pipeline_call in enumerate(case.positive_calls):
        sigma = pipeline_call["timestep"]  # what the pipeline passes: t / 1000
        sigmas.append(float(sigma))
        x_t = unpack(pipeline_call["hidden_states"][:, : case.target_tokens], height, width)
        if float(sigma) == 1.0:
            noise, x0 = x_t, torch.randn(x_t.shape, generator=generator)
            tolerance = EXACT
        else:
            noise = torch.randn(x_t.shape, generator=generator)
            x0 = (x_t - sigma * noise) / (1 - sigma)
            tolerance = REBUILT
        sample = CachedSample(
            name=f"step{step}",
            prompt_embeds=case.prompt_embeds,
            prompt_embeds_mask=case.prompt_embeds_mask,
            target=x0[0],
            references=case.reference_latents,
        )
        with transformer_calls(transformer) as calls:
            loss = flow_matching_loss(transformer, sample, sigma, noise, torch.float32)
        (train_call,) = calls

        torch.testing.assert_close(train_call["hidden_states"], pipeline_call["hidden_states"], **tolerance)
        torch.testing.assert_close(train_call["timestep"], pipeline_call["timestep"], **EXACT)
        torch.testing.assert_close(train_call["encoder_hidden_states"], pipeline_call["encoder_hidden_states"], **EXACT)
        assert_same_mask(train_call["encoder_hidden_states_mask"], pipeline_call["encoder_hidden_states_mask"])
        assert train_call["img_shapes"] == pipeline_call["img_shapes"]
        # the pipeline's other keywords are the defaults: no guidance embedding, no attention kwargs
        assert pipeline_call["guidance"] is None and not pipeline_call["attention_kwargs"]
        torch.testing.assert_close(train_call["output"], pipeline_call["output"], **tolerance)

        prediction = pipeline_call["output"][:, : case.target_tokens]
        expected_loss = F.mse_loss(prediction, pack(velocity_target(x0, noise)))
        torch.testing.assert_close(loss.detach(), expected_loss, **REBUILT)
    assert sigmas[0] == 1.0 and 0.0 < sigmas[1] < 1.0  # both regimes were checked


# --- 4. the validation sampler --------------------------------------------------------------


def test_validation_sampler_ends_at_the_pipelines_latents(case):
    """`encode_conditioning` + `edit_latents` (our denoising loop over cached conditioning, as
    validation runs it) reproduce `pipeline(..., output_type="latent")` exactly: same seed,
    steps, true CFG with the negative prompt encoded with the references, same transformer
    calls, same final latents."""
    cond = encode_conditioning(case.pipe, case.config, PROMPT, case.references)
    # the same encodings as the training caches (already proven equal to the pipeline's)
    torch.testing.assert_close(cond.prompt_embeds, case.prompt_embeds[None], **EXACT)
    torch.testing.assert_close(cond.negative_prompt_embeds, case.negative_embeds[None], **EXACT)
    for ours, cached in zip(cond.references, case.reference_latents, strict=True):
        torch.testing.assert_close(ours, cached, **EXACT)

    with transformer_calls(case.pipe.transformer) as calls:
        latents = edit_latents(case.pipe, case.config, cond)

    assert len(calls) == len(case.pipeline_calls)
    for ours, theirs in zip(calls, case.pipeline_calls):
        for key in ("hidden_states", "timestep", "encoder_hidden_states", "output"):
            torch.testing.assert_close(ours[key], theirs[key], **EXACT)
        assert_same_mask(ours["encoder_hidden_states_mask"], theirs["encoder_hidden_states_mask"])
        assert ours["img_shapes"] == theirs["img_shapes"]
    assert latents.shape == case.pipeline_latents.shape == (1, case.target_tokens, 64)
    torch.testing.assert_close(latents, case.pipeline_latents, **EXACT)


# --- 5. edit-v3 ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["edit-v3"], indirect=True)
def test_edit_v3_conditions_references_at_timestep_zero_and_still_matches(case):
    """edit-v3's transformer has `zero_cond_t` (reference tokens get timestep 0); the transformer
    derives which tokens are references from `img_shapes[0][0]`, which tests 2-4 show training
    and validation pass exactly as the pipeline. Here: the flag is set where both paths load the
    model, and it changes the prediction, so the parity above is not vacuous."""
    assert case.config.flavour.zero_cond_t
    assert case.pipe.transformer.config.zero_cond_t is True
    assert load_transformer(case.config, torch.float32).config.zero_cond_t is True

    call = case.pipeline_calls[-1]  # a step with σ < 1, where timestep 0 for references differs
    inputs = {k: v for k, v in call.items() if k != "output"}
    path = case.config.model_path
    without = QwenImageTransformer2DModel.from_pretrained(path, subfolder="transformer", zero_cond_t=False)
    with torch.no_grad():
        torch.testing.assert_close(case.pipe.transformer(**inputs)[0], call["output"], **EXACT)
        assert not torch.allclose(without(**inputs)[0], call["output"], atol=1e-4)
