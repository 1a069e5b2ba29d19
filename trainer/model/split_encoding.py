"""The pipelines' encoders split for throughput, for the cache stage (`trainer.data.cache_encoders`).

- A prompt is encoded by the pipeline's own `encode_prompt`, in two halves. `prompt_inputs` runs it up
  to its processor call (template, tokens, image patches: CPU work, safe on a worker thread with a
  processor copy of its own) and stops there with the processor's output. `encode_prompt_inputs` runs it
  again on the main thread with that output handed back in place of the processor's, so the text
  encoder gets exactly what the pipeline would give it, and the rest of `encode_prompt` is the
  pipeline's. Nothing of the pipeline's code is copied here (`tests/trainer/model/test_split_encoding.py`
  holds both halves against `pipe.encode_prompt`, bit for bit).
- `image_latents_batch` encodes same-sized images as one batch with the pipeline's `_encode_vae_image`.
  Batching changes which convolution kernels run: equal to one-at-a-time within float rounding, not bit
  for bit (`vae_batch_size: 1` is).
"""

import copy
import inspect
import threading
from dataclasses import dataclass
from typing import Any

import torch


class _Processed(Exception):
    """Raised by the capturing processor: `encode_prompt` has built its inputs, stop before the text encoder."""

    def __init__(self, features):
        super().__init__("processor output captured")
        self.features = features


class _PipelineWithProcessor:
    """`pipe` as its own methods see it (their `self`), with `processor` replaced.

    Methods looked up here are bound to this view, so what they call (`_get_qwen_prompt_embeds` from
    `encode_prompt`) sees the replaced processor too; every other attribute is the pipeline's.
    """

    def __init__(self, pipe, processor):
        self.__dict__.update(_pipe=pipe, processor=processor)

    def __getattr__(self, name: str):  # reached only for names this view does not hold itself
        pipe = self.__dict__["_pipe"]
        attribute = inspect.getattr_static(type(pipe), name, None)
        if inspect.isfunction(attribute):
            return attribute.__get__(self)
        return getattr(pipe, name)


@dataclass
class PromptInputs:
    """One prompt and its reference images as the pipeline's processor turned them into model inputs (CPU)."""

    prompt: str
    image: Any  # what was passed to `encode_prompt` as `image`
    features: Any  # the processor's BatchFeature: input_ids, attention_mask, pixel_values, image_grid_thw, ...

    def pin_memory(self) -> "PromptInputs":
        """Page-locked tensors: the pipeline's `.to(device)` then copies them at full bus speed."""
        for name, value in list(self.features.items()):
            if isinstance(value, torch.Tensor):
                self.features[name] = value.pin_memory()
        return self


_local = threading.local()


def thread_processor(pipe):
    """This thread's copy of the pipeline's processor: a fast tokenizer called from two threads at once
    fails ("Already borrowed", huggingface/tokenizers#537), a copy per thread does not."""
    copies = getattr(_local, "processors", None)
    if copies is None:
        copies = _local.processors = {}
    original = pipe.processor
    if id(original) not in copies:
        copies[id(original)] = (original, copy.deepcopy(original))  # the original kept alive: its id stays unique
    return copies[id(original)][1]


def prompt_inputs(pipe, prompt: str, image, processor=None) -> PromptInputs:
    """The first half of `pipe.encode_prompt(prompt, image)`: up to and including its processor call."""

    def capture(**kwargs):
        raise _Processed(real(**kwargs))

    real = processor or pipe.processor
    try:
        type(pipe).encode_prompt(_PipelineWithProcessor(pipe, capture), prompt=prompt, image=image, device=torch.device("cpu"))
    except _Processed as done:
        return PromptInputs(prompt, image, done.features)
    raise RuntimeError(f"{type(pipe).__name__}.encode_prompt returned without calling its processor")


@torch.no_grad()
def encode_prompt_inputs(pipe, inputs: PromptInputs) -> tuple:
    """The second half: what `pipe.encode_prompt(prompt, image)` returns, from the first half's processor output."""
    used = []

    def replay(**kwargs):
        if used:
            raise RuntimeError(f"{type(pipe).__name__}.encode_prompt called its processor twice: its two halves no longer split")
        used.append(True)
        return inputs.features

    view = _PipelineWithProcessor(pipe, replay)
    return type(pipe).encode_prompt(view, prompt=inputs.prompt, image=inputs.image, device=pipe.text_encoder.device)


@torch.no_grad()
def image_latents_batch(pipe, images: list[torch.Tensor]) -> torch.Tensor:
    """Normalised VAE latents [B, C, h, w] of same-sized preprocessed images (each [1, C, 1, H, W]), one batch."""
    vae = pipe.vae
    # each image is moved on its own (page-locked ones asynchronously), then joined on the device
    batch = torch.cat([image.to(vae.device, vae.dtype, non_blocking=True) for image in images])
    return pipe._encode_vae_image(batch, generator=None)[:, :, 0]
