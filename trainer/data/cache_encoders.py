"""What each cache file holds and how it is encoded, in two halves (`trainer.data.caches` runs them).

`prepare(pipe, row)` is the host's half: decoding, strict crops, the pipeline's resizing and, for the
prompt, the VL processor (`trainer.model.split_encoding`). It runs on worker threads. `encode(pipe,
prepared)` is the device's half, on the main thread, for a chunk of rows (its tensors may stay on the
device, queued: the writer thread copies them over): the text encoder one prompt
at a time (padding a batch of prompts would change their values), the VAE in batches of same-sized
images (`vae_batch_size`). The tensors are those the one-sample-at-a-time code computed: the same
pipeline functions on the same inputs (batched VAE encodes: equal within float rounding).
"""

from dataclasses import dataclass, field

import torch

from trainer.config.schema import TrainConfig
from trainer.data.caches import (
    _embedding_tensors,
    _random_reference,
    load_references,
    reference_target_size,
    target_size,
)
from trainer.data.dataset_config import DatasetConfig
from trainer.data.images import load_image
from trainer.model.conditioning import PromptEmbedding, prepare_references, preprocess_target
from trainer.model.split_encoding import encode_prompt_inputs, image_latents_batch, prompt_inputs, thread_processor


def _prompt_image(flavour, refs):
    """What the flavour's pipeline takes as `encode_prompt`'s `image`: edit-v1 one image, the others a list."""
    return refs.prompt_images if flavour.is_plus or flavour.is_21 else refs.prompt_images[0]


def _embedding(result: tuple) -> PromptEmbedding:
    """`encode_prompt`'s return for one prompt as the cache keeps it (the all-ones mask the pipeline drops, explicit)."""
    embeds, mask, *image_pad_mask = result
    if mask is None:
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    return PromptEmbedding(embeds[0], mask[0], image_pad_mask[0][0] if image_pad_mask else None)


@dataclass
class TextEmbeddingsEncoder:
    """Prompt embeddings with the reference images, as the pipeline's `encode_prompt` makes them."""

    dataset_config: DatasetConfig
    config: TrainConfig
    pin_memory: bool = False  # page-locked inputs, for a CUDA device
    description: str = "text embeddings"
    components: dict = field(default_factory=lambda: {"transformer": False, "vae": False})

    @property
    def rows_per_chunk(self) -> int:
        return 1

    def order(self, row) -> tuple:
        return ()  # the manifest's

    def prepare(self, pipe, row) -> list[tuple[str, str, object]]:
        """(name prefix, name suffix, processor output) of each prompt the row's file holds."""
        config, flavour = self.config, self.config.flavour
        size = reference_target_size(self.dataset_config, config, row)
        images = load_references(self.dataset_config, config, row)
        refs = prepare_references(pipe, flavour, images, size)
        processor = thread_processor(pipe)

        def inputs(prompt, refs):
            prepared = prompt_inputs(pipe, prompt, _prompt_image(flavour, refs), processor)
            return prepared.pin_memory() if self.pin_memory else prepared

        prompts = [("", "", inputs(row["caption"], refs))]
        if config.caption_dropout_probability > 0:  # the instruction dropped, the references kept
            prompts.append(("dropout_", "", inputs("", refs)))
        if _random_reference(self.dataset_config, config, row):
            for index, image in enumerate(images):
                prompts.append(("", f"_ref{index}", inputs(row["caption"], prepare_references(pipe, flavour, [image], size))))
        return prompts

    def encode(self, pipe, chunk: list) -> list[dict[str, torch.Tensor]]:
        files = []
        for prompts in chunk:
            tensors = {}
            for prefix, suffix, inputs in prompts:
                embedding = _embedding(encode_prompt_inputs(pipe, inputs))
                tensors.update(_embedding_tensors(embedding, prefix=prefix, suffix=suffix))
            files.append(tensors)  # on the device: the writer thread copies them over (trainer.data.caches._save)
        return files


@dataclass
class VaeLatentsEncoder:
    """Normalised VAE latents of the target (at its bucket size) and of each reference."""

    dataset_config: DatasetConfig
    config: TrainConfig
    pin_memory: bool = False
    description: str = "VAE latents"
    components: dict = field(default_factory=lambda: {"transformer": False, "text_encoder": False})
    halved: bool = False  # a batch ran out of memory once (said once)

    @property
    def rows_per_chunk(self) -> int:
        return self.config.vae_batch_size

    def order(self, row) -> tuple:
        return target_size(self.dataset_config, row)  # rows of one bucket side by side: their targets batch together

    def prepare(self, pipe, row) -> dict[str, torch.Tensor]:
        """The row's preprocessed images [1, C, 1, H, W] by cache name, in the VAE's dtype."""
        config = self.config
        size = target_size(self.dataset_config, row)
        refs = prepare_references(
            pipe, config.flavour, load_references(self.dataset_config, config, row),
            reference_target_size(self.dataset_config, config, row),
        )
        target = load_image(row["target_path"], config.flavour.keeps_alpha)
        images = {"target": preprocess_target(pipe, target, size)}
        for index, image in enumerate(refs.vae_images):
            images[f"reference_{index}"] = image
        # the cast the encode would make on the device (round to nearest either way), done here on a worker
        images = {name: image.to(pipe.vae.dtype) for name, image in images.items()}
        return {name: image.pin_memory() for name, image in images.items()} if self.pin_memory else images

    def encode(self, pipe, chunk: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """Every image of the chunk, grouped by shape, in batches of at most vae_batch_size."""
        groups: dict[tuple, list[tuple[int, str, torch.Tensor]]] = {}
        for index, images in enumerate(chunk):
            for name, image in images.items():
                groups.setdefault(tuple(image.shape), []).append((index, name, image))
        batch = self.config.vae_batch_size
        files: list[dict[str, torch.Tensor]] = [{} for _ in chunk]
        for members in groups.values():
            for start in range(0, len(members), batch):
                part = members[start : start + batch]
                latents = self._encode_batch(pipe, [image for _, _, image in part])
                for (index, name, _), latent in zip(part, latents):
                    files[index][name] = latent
        # still on the device and not waited for: the writer thread copies each file over while the next
        # chunk's encodes are queued behind it (trainer.data.caches._save)
        return [{name: tensors[name] for name in images} for tensors, images in zip(files, chunk)]  # the row's own order

    def _encode_batch(self, pipe, images: list[torch.Tensor]) -> torch.Tensor:
        try:
            return image_latents_batch(pipe, images)
        except torch.cuda.OutOfMemoryError:
            if len(images) == 1:
                raise
        # outside the except block: its traceback no longer holds the failed batch's tensors
        torch.cuda.empty_cache()
        if not self.halved:
            self.halved = True
            print(f"note: a VAE batch of {len(images)} images ran out of GPU memory; encoding it in halves "
                  "(a lower vae_batch_size avoids the retry)", flush=True)
        half = len(images) // 2
        return torch.cat([self._encode_batch(pipe, images[:half]), self._encode_batch(pipe, images[half:])])
