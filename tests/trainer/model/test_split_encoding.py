"""The prompt encoded in two halves (processor on a worker thread, text encoder on the main one) is the
pipeline's own `encode_prompt`, bit for bit; batched VAE encodes equal one-at-a-time ones to float rounding."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.config.parsing import parse_train_config
from trainer.model.conditioning import encode_image_latents, prepare_references
from trainer.model.loading import load_pipeline
from trainer.model.split_encoding import encode_prompt_inputs, image_latents_batch, prompt_inputs, thread_processor

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")


def pipeline(demo_root, flavour: str, **components):
    config = parse_train_config({"model_flavour": flavour, "pretrained_model_name_or_path": str(demo_root / "demo" / "models" / f"tiny-{flavour}")})
    return config, load_pipeline(config, CPU, torch.float32, transformer=False, **components)


def images(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 56, 3), dtype=np.uint8)) for i in range(count)]


@pytest.mark.parametrize("flavour, n_refs", [("edit-v1", 1), ("edit-v2", 3)])
def test_the_two_halves_return_what_encode_prompt_returns_bit_for_bit(demo_root, flavour, n_refs):
    config, pipe = pipeline(demo_root, flavour, vae=False)
    refs = prepare_references(pipe, config.flavour, images(n_refs), (64, 64) if config.flavour.is_plus else None)
    image = refs.prompt_images if config.flavour.is_plus else refs.prompt_images[0]
    for prompt in ("make the square a deep blue", ""):
        expected_embeds, expected_mask = pipe.encode_prompt(prompt=prompt, image=image, device=CPU)
        inputs = prompt_inputs(pipe, prompt, image, thread_processor(pipe))
        assert int(inputs.features["input_ids"].shape[1]) > 64  # the processor ran: template, tokens, image slots
        embeds, mask = encode_prompt_inputs(pipe, inputs)
        assert torch.equal(embeds, expected_embeds) and mask is None and expected_mask is None


def test_prompt_inputs_from_many_threads_at_once_equal_serial_ones(demo_root):
    """Each thread has its own processor copy: one shared fast tokenizer fails when called concurrently."""
    config, pipe = pipeline(demo_root, "edit-v2", vae=False)
    prompts = [f"turn shape {i} into a circle" for i in range(16)]
    refs = prepare_references(pipe, config.flavour, images(2), (64, 64))

    def ids(prompt):
        return prompt_inputs(pipe, prompt, refs.prompt_images, thread_processor(pipe)).features["input_ids"]

    serial = [ids(p) for p in prompts]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(ids, prompts))
    assert all(torch.equal(a, b) for a, b in zip(serial, threaded, strict=True))
    assert thread_processor(pipe) is thread_processor(pipe) and thread_processor(pipe) is not pipe.processor


def test_a_batch_of_same_sized_images_encodes_to_the_single_encodes_within_float_rounding(demo_root):
    config, pipe = pipeline(demo_root, "edit-v2", text_encoder=False)
    batch = [pipe.image_processor.preprocess(image, 64, 64).unsqueeze(2) for image in images(4, seed=1)]
    single = torch.stack([encode_image_latents(pipe, image) for image in batch])
    together = image_latents_batch(pipe, batch)
    assert together.shape == single.shape == (4, 16, 8, 8)
    # not bit for bit: oneDNN (and cuDNN) pick other convolution kernels for another batch size
    torch.testing.assert_close(together, single, rtol=1e-5, atol=1e-5)
    assert torch.equal(image_latents_batch(pipe, batch[:1])[0], single[0])  # a batch of one is the single encode
