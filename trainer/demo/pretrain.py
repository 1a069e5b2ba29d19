"""A small *trained* Qwen-Image-Edit-2509 (edit-v2) pipeline for the demo: edits that can be seen.

    python -m trainer.demo.pretrain OUT_DIR --device cuda [--seed 0]

The random tiny model (`trainer.demo.tiny_model`) decodes anything to noise. This script builds
a pipeline folder of the same real classes and layout (loaded by `from_pretrained`, nothing
special-cased) whose weights are fitted here:

1. the VAE (`AutoencoderKLQwenImage`, small widths) is fitted to the demo's scenes, swatches and
   silhouettes until it reconstructs them; its `latents_mean`/`latents_std` are measured on them;
2. the text encoder stays the tiny random Qwen2.5-VL: different instructions still give
   different embeddings (the script prints how different);
3. the transformer (`QwenImageTransformer2DModel`, small) is pretrained with the trainer's own
   flow-matching loss, on conditioning computed by the trainer's own pipeline-exact code, on a
   family of generic edits (`trainer.demo.edits`: move, remove, resize, recolour the background,
   add a shape). Recolouring the *shape*, the demo dataset's edit, is held out: the demo's LoRA
   teaches it.

Its default budget built the pipeline shipped in `trainer/demo/trained_edit_v2` (seed 0, one
NVIDIA H200, 397 s; `qwen_edit_pretrained.json` there holds what it measured), which
`qwen-edit demo-setup` installs for the edit-v2 preset (`trainer.demo.trained_model`). On the
2-core CPU the same budget would take hours (a step of 32 pairs costs seconds), so the weights are
shipped, 17 MiB in half precision, rather than built by `make demo`. Budgets compared on a GPU:
`benchmarks/gpu_demo_pretrain.sh`, benchmarks/RESULTS.md "Issue 12".

The seed fixes every draw, but a GPU rebuild is not bit-identical: CUDA's non-deterministic
kernels (the VAE's convolutions among them) drift apart over thousands of steps. Rebuilt on the
same kind of H200, the VAE reconstructs the demo's images at 27.07 dB against the shipped 26.79,
and weights differ by up to 0.4; the text encoder, drawn on the CPU, is bit-identical.
"""

import argparse
import contextlib
import functools
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline, QwenImageTransformer2DModel
from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d
from PIL import Image

from trainer.demo.dataset import generate_demo_dataset
from trainer.demo.edits import EDIT_KINDS, edit_pairs, random_images
from trainer.demo.tiny_model import MIN_PIXELS, SCHEDULER_CONFIG, Z_DIM, _processor, _text_encoder
from trainer.demo.tiny_tokenizer import build_tiny_tokenizer
from trainer.demo.trained_model import MARKER_FILE  # beside model_index.json: the seed, the budget and what was measured
from trainer.evaluation.metrics import as_array, psnr
from trainer.io import atomic_folder
from trainer.model.conditioning import encode_image_latents, encode_prompt, pack, prepare_references, preprocess_target
from trainer.model.flavours import get_flavour
from trainer.training.flow_matching import add_noise, velocity_target

FLAVOUR = get_flavour("edit-v2")
SIZE = 64  # the demo dataset's and the demo preset's resolution
NEGATIVE_PROMPT = " "  # the presets' validation_negative_prompt: trained as "no instruction" for CFG
SHIFT = 1.73  # flow_schedule_shift, as the LoRA is trained


@dataclass(frozen=True)
class Budget:
    """How much work each stage does (`--set FIELD=VALUE` on the command line)."""

    vae_base_dim: int = 16  # 8 reconstructs the demo's images at about 22 dB, 16 at 27
    vae_steps: int = 2500
    vae_batch: int = 8
    vae_lr: float = 5e-4
    vae_latent_noise: float = 0.1  # relative to the latents' spread
    pairs: int = 3200
    kinds: str = ",".join(EDIT_KINDS)  # the pretraining edits, comma-separated (trainer.demo.edits)
    layers: int = 4
    heads: int = 3  # one head of 64 stalls (loss near 0.1); two or more reach about 0.01
    head_dim: int = 64  # RoPE axes (4, 30, 30), see build_transformer
    transformer_steps: int = 3000
    batch: int = 32
    lr: float = 1e-3
    uncond_probability: float = 0.1  # trained on the negative prompt, so true CFG at validation has a meaning

    def __post_init__(self):
        unknown = [kind for kind in self.edit_kinds if kind not in EDIT_KINDS]
        if unknown:  # before minutes of VAE fitting, not when the pairs are drawn
            raise ValueError(f"unknown edit kind {', '.join(map(repr, unknown))} in kinds={self.kinds!r}; valid: {', '.join(EDIT_KINDS)}")

    @property
    def edit_kinds(self) -> tuple[str, ...]:
        return tuple(self.kinds.split(","))


def budget_with(overrides: list[str], budget: Budget = Budget()) -> Budget:
    """`budget` with `FIELD=VALUE` items applied (each value read as the field's type)."""
    fields = Budget.__dataclass_fields__
    for item in overrides:
        key, _, value = item.partition("=")
        if key not in fields:
            raise ValueError(f"unknown budget field {key!r}; valid: {', '.join(fields)}")
        budget = replace(budget, **{key: type(getattr(budget, key))(value)})
    return budget


def log(message: str) -> None:
    print(message, flush=True)


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """[B, 3, 1, H, W] in [-1, 1], the VAE's input layout."""
    array = np.stack([np.asarray(i.convert("RGB"), dtype=np.float32) for i in images]) / 127.5 - 1
    return torch.from_numpy(array).permute(0, 3, 1, 2).unsqueeze(2)


def build_vae(budget: Budget) -> AutoencoderKLQwenImage:
    return AutoencoderKLQwenImage(
        base_dim=budget.vae_base_dim,
        z_dim=Z_DIM,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],  # scale factor 8, as the real VAE
        latents_mean=[0.0] * Z_DIM,  # measured after fitting
        latents_std=[1.0] * Z_DIM,
    )


def fit_vae(budget: Budget, seed: int, device: torch.device) -> AutoencoderKLQwenImage:
    """An autoencoder fit (L1 + MSE) on freshly drawn images every step. The latent is the
    posterior's mode (what the pipelines encode to) plus a little noise, so the decoder also
    decodes the slightly-off latents a denoiser produces; no KL term, whose pull towards the
    prior collapses a VAE this small to the mean image."""
    torch.manual_seed(seed)
    vae = build_vae(budget).to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=budget.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, budget.vae_lr, total_steps=budget.vae_steps, pct_start=0.1)
    rng = np.random.default_rng([seed, 10])
    generator = torch.Generator(device).manual_seed(seed)
    vae.train()
    start = time.time()
    with single_frame_convolutions(vae):
        for step in range(budget.vae_steps):
            x = to_tensor(random_images(rng, budget.vae_batch, SIZE)).to(device)
            z = vae.encode(x).latent_dist.mode()
            z = z + budget.vae_latent_noise * z.detach().std() * torch.randn(z.shape, generator=generator, device=device)
            recon = vae.decode(z).sample
            loss = F.l1_loss(recon, x) + F.mse_loss(recon, x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            if step % 100 == 0 or step == budget.vae_steps - 1:
                log(f"  vae step {step:4d}  loss {loss.item():.4f}  ({time.time() - start:.0f} s)")
    vae.eval()
    return vae


def _single_frame_forward(conv, x: torch.Tensor, cache_x=None) -> torch.Tensor:
    """A causal 3-D convolution of one frame is a 2-D convolution with the kernel's last time
    slice: the causal padding puts zeros before the frame, so every other slice multiplies zeros."""
    if cache_x is not None or x.shape[2] != 1 or conv._padding[4] != conv.kernel_size[0] - 1 or conv.stride[0] != 1:
        return type(conv).forward(conv, x, cache_x)
    left, right, top, bottom = conv._padding[:4]
    frame = F.pad(x[:, :, 0], (left, right, top, bottom))
    return F.conv2d(frame, conv.weight[:, :, -1], conv.bias, stride=conv.stride[1:]).unsqueeze(2)


@contextlib.contextmanager
def single_frame_convolutions(vae):
    """Within: the VAE's causal 3-D convolutions run as 2-D ones on single-frame input (same
    results and gradients, about twice as fast on a CPU; `tests/trainer/demo/test_pretrain.py`)."""
    convs = [m for m in vae.modules() if isinstance(m, QwenImageCausalConv3d)]
    for conv in convs:
        conv.forward = functools.partial(_single_frame_forward, conv)
    try:
        yield vae
    finally:
        for conv in convs:
            del conv.forward


@torch.no_grad()
def measure_latent_statistics(vae: AutoencoderKLQwenImage, seed: int, device: torch.device) -> None:
    """Per-channel mean/std of the fitted VAE's latents, written to its config as the real VAE's are."""
    images = random_images(np.random.default_rng([seed, 11]), 256, SIZE)
    latents = torch.cat([vae.encode(to_tensor(images[i : i + 64]).to(device)).latent_dist.mode() for i in range(0, 256, 64)])
    mean = latents.mean(dim=(0, 2, 3, 4))
    std = latents.std(dim=(0, 2, 3, 4)).clamp_min(1e-3)
    vae.register_to_config(latents_mean=[round(float(v), 6) for v in mean], latents_std=[round(float(v), 6) for v in std])


@torch.no_grad()
def encode_normalised(pipe, image: Image.Image) -> torch.Tensor:
    """The image's normalised latents [1, 16, 1, h, w], as the trainer's caches hold a target's."""
    return encode_image_latents(pipe, preprocess_target(pipe, image, image.size))[None, :, None]


@torch.no_grad()
def decode_normalised(pipe, latents: torch.Tensor) -> Image.Image:
    """Normalised latents [1, 16, 1, h, w] to a picture the pipelines' way: de-normalised, decoded, postprocessed."""
    vae = pipe.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents)
    decoded = vae.decode(latents * std + mean, return_dict=False)[0][:, :, 0]
    return pipe.image_processor.postprocess(decoded, output_type="pil")[0]


def reconstruct(pipe, image: Image.Image) -> Image.Image:
    """Encode and decode the pipelines' way."""
    return decode_normalised(pipe, encode_normalised(pipe, image))


def reconstruction_psnr(pipe, images: list[Image.Image]) -> float:
    return float(np.mean([psnr(as_array(i), as_array(reconstruct(pipe, i))) for i in images]))


def demo_images(root: Path) -> list[Image.Image]:
    """Every image of the demo dataset (its default parameters), which the VAE never saw."""
    dataset = generate_demo_dataset(root)
    return [Image.open(p).convert("RGB") for split in ("train", "eval") for folder in ("edited", "reference") for p in sorted(dataset.folder(split, folder).glob("*.png"))]


def build_transformer(budget: Budget) -> QwenImageTransformer2DModel:
    # RoPE's theta is fixed (10000), so only an axis's first few frequencies turn noticeably
    # across a 4x4 token grid: give height and width all the dimensions the frame axis (at most
    # 4 images) can spare, or the model cannot tell token positions apart to copy a reference.
    frame = 4
    side = (budget.head_dim - frame) // 2
    if budget.head_dim % 4 or side < 2:
        raise ValueError(f"head_dim {budget.head_dim}: the RoPE axes (frame, height, width) must be even; use a multiple of 4, at least 8")
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * Z_DIM,
        out_channels=Z_DIM,
        num_layers=budget.layers,
        attention_head_dim=budget.head_dim,
        num_attention_heads=budget.heads,
        joint_attention_dim=32,  # the tiny text encoder's hidden size
        axes_dims_rope=(frame, side, side),  # sums to head_dim
    )


@dataclass
class EncodedPairs:
    """The pretraining pairs as the trainer's caches hold them: normalised latents and prompt embeddings."""

    targets: torch.Tensor  # [N, 16, h, w]
    references: torch.Tensor  # [N, R, 16, h, w]
    embeds: torch.Tensor  # [N, L, D], zero-padded
    masks: torch.Tensor  # [N, L]
    negative_embeds: torch.Tensor
    negative_masks: torch.Tensor
    kinds: list[str]

    TENSORS = ("targets", "references", "embeds", "masks", "negative_embeds", "negative_masks")  # every field but kinds


def _pad(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(t.shape[0] for t in tensors)
    embeds = torch.stack([F.pad(t, (0, 0, 0, length - t.shape[0])) for t in tensors])
    masks = torch.stack([F.pad(torch.ones(t.shape[0], dtype=torch.long), (0, length - t.shape[0])) for t in tensors])
    return embeds, masks


@torch.no_grad()
def encode_pairs(pipe, pairs, vae_batch: int = 64) -> EncodedPairs:
    """Each pair conditioned as `qwen-edit cache` conditions a demo pair (match_target_res): the
    pipeline's reference preparation and prompt encoding, and its `_encode_vae_image` (in batches)."""
    embeds, negatives, vae_inputs = [], [], []
    for pair in pairs:
        refs = prepare_references(pipe, FLAVOUR, list(pair.references), (SIZE, SIZE))
        embeds.append(encode_prompt(pipe, FLAVOUR, pair.caption, refs)[0].cpu())
        negatives.append(encode_prompt(pipe, FLAVOUR, NEGATIVE_PROMPT, refs)[0].cpu())
        vae_inputs += [*refs.vae_images, preprocess_target(pipe, pair.target, (SIZE, SIZE))]
    images = torch.cat(vae_inputs)
    with single_frame_convolutions(pipe.vae):
        latents = torch.cat([
            pipe._encode_vae_image(images[i : i + vae_batch].to(pipe.vae.device), generator=None)[:, :, 0].cpu()
            for i in range(0, len(images), vae_batch)
        ])
    latents = latents.view(len(pairs), -1, *latents.shape[1:])  # per pair: the references, then the target
    embeds_t, masks_t = _pad(embeds)
    negatives_t, negative_masks_t = _pad(negatives)
    return EncodedPairs(latents[:, -1].contiguous(), latents[:, :-1].contiguous(), embeds_t, masks_t, negatives_t, negative_masks_t, [p.kind for p in pairs])


def batch_loss(transformer, data: EncodedPairs, index: torch.Tensor, generator: torch.Generator, budget: Budget, device) -> torch.Tensor:
    """The trainer's flow-matching loss (`trainer.training.loss`), for a batch: σ, noise and the
    instruction dropped to the negative prompt drawn per sample."""
    x0 = data.targets[index].to(device)
    batch = x0.shape[0]
    u = torch.sigmoid(torch.randn(batch, generator=generator))  # logit-normal, as `sample_sigma`
    sigma = (SHIFT * u / (1 + (SHIFT - 1) * u)).to(device)
    noise = torch.randn(x0.shape, generator=generator).to(device)
    x_t = add_noise(x0, noise, sigma)
    uncond = (torch.rand(batch, generator=generator) < budget.uncond_probability)[:, None, None]
    length = max(data.embeds.shape[1], data.negative_embeds.shape[1])
    embeds = torch.where(uncond, F.pad(data.negative_embeds[index], (0, 0, 0, length - data.negative_embeds.shape[1])),
                         F.pad(data.embeds[index], (0, 0, 0, length - data.embeds.shape[1])))
    masks = torch.where(uncond[:, :, 0], F.pad(data.negative_masks[index], (0, length - data.negative_masks.shape[1])),
                        F.pad(data.masks[index], (0, length - data.masks.shape[1])))
    references = data.references[index].to(device)
    tokens = [pack(x_t)] + [pack(references[:, r]) for r in range(references.shape[1])]
    shapes = [[(1, x0.shape[-2] // 2, x0.shape[-1] // 2)] * len(tokens)] * batch
    prediction = transformer(
        hidden_states=torch.cat(tokens, dim=1),
        timestep=sigma,
        encoder_hidden_states=embeds.to(device),
        encoder_hidden_states_mask=masks.to(device),
        img_shapes=shapes,
        return_dict=False,
    )[0][:, : tokens[0].shape[1]]
    return F.mse_loss(prediction, pack(velocity_target(x0, noise)))


def pretrain_transformer(data: EncodedPairs, budget: Budget, seed: int, device: torch.device) -> QwenImageTransformer2DModel:
    torch.manual_seed(seed)
    transformer = build_transformer(budget).to(device)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=budget.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, budget.lr, total_steps=budget.transformer_steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(seed)
    transformer.train()
    start = time.time()
    n = data.targets.shape[0]
    for step in range(budget.transformer_steps):
        index = torch.randint(0, n, (budget.batch,), generator=generator)
        loss = batch_loss(transformer, data, index, generator, budget, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == budget.transformer_steps - 1:
            log(f"  transformer step {step:4d}  loss {loss.item():.4f}  ({time.time() - start:.0f} s)")
    transformer.eval()
    return transformer


@torch.no_grad()
def instruction_distinctness(pipe, references) -> float:
    """The smallest relative difference ||E_a - E_b|| / ||E_a|| between the prompt embeddings of
    instructions of one token length (same references): how well the random text encoder still
    tells instructions apart."""
    instructions = [f"{verb} the {shape} {colour}" for verb in ("make", "paint") for shape in ("square", "circle") for colour in ("red", "blue", "green")]
    instructions += ["move the square left", "move the square right", "remove the square", "make the background blue"]
    refs = prepare_references(pipe, FLAVOUR, list(references), (SIZE, SIZE))
    embeds = [encode_prompt(pipe, FLAVOUR, text, refs)[0] for text in instructions]
    smallest = math.inf
    for i, a in enumerate(embeds):
        for b in embeds[i + 1 :]:
            if a.shape == b.shape:
                smallest = min(smallest, float((a - b).norm() / a.norm()))
    return smallest


@torch.no_grad()
def sample_edit(pipe, pair, guidance: float = 4.0, steps: int = 8, seed: int = 0, with_latents: bool = False):
    """The validation's generation (`trainer.evaluation.sampling`, the pipeline's loop) on one pair;
    with `with_latents`, also the output's normalised latents [1, 16, 1, h, w]."""
    from trainer.evaluation.sampling import EditConditioning, generate_latents

    refs = prepare_references(pipe, FLAVOUR, list(pair.references), (SIZE, SIZE))
    embeds, mask = encode_prompt(pipe, FLAVOUR, pair.caption, refs)
    negative, negative_mask = encode_prompt(pipe, FLAVOUR, NEGATIVE_PROMPT, refs)
    cond = EditConditioning(embeds[None], mask[None], negative[None], negative_mask[None],
                            [encode_image_latents(pipe, image) for image in refs.vae_images])
    tokens = generate_latents(pipe.transformer, pipe.scheduler, cond, SIZE, SIZE, steps, guidance,
                              torch.Generator("cpu").manual_seed(seed), pipe.vae_scale_factor)
    latents = pipe._unpack_latents(tokens, SIZE, SIZE, pipe.vae_scale_factor)
    image = decode_normalised(pipe, latents)
    return (image, latents) if with_latents else image


def recolour_pairs(root: Path, split: str = "eval", **dataset_args):
    """The demo dataset's pairs of one split (the held-out edit) as `EditPair`s; `dataset_args` go to
    `generate_demo_dataset` (e.g. more eval pairs for a steadier mean)."""
    from trainer.demo.edits import EditPair

    dataset = generate_demo_dataset(root, **dataset_args)
    pairs = []
    for target in sorted(dataset.folder(split, "edited").glob("*.png")):
        references = tuple(Image.open(dataset.folder(split, folder) / target.name).convert("RGB") for folder in ("reference", "reference_2", "reference_3"))
        caption = target.with_suffix(".txt").read_text().strip()
        pairs.append(EditPair("recolour", caption, references, Image.open(target).convert("RGB")))
    return pairs


def mean_edit_metrics(outputs: list[Image.Image], pairs) -> dict[str, float]:
    """The validation's edit metrics of each output against its pair, averaged over the pairs that have them."""
    from trainer.evaluation.metrics import edit_metrics

    scores = [edit_metrics(output, pair.target, pair.references[0]) for output, pair in zip(outputs, pairs)]
    return {k: float(np.mean([s[k] for s in scores if k in s])) for k in ("psnr", "edit_success", "preservation", "pixel_shift")}


def save_grid(rows: list[tuple[Image.Image, ...]], path: Path, scale: int = 1) -> None:
    """One row of SIZE x SIZE images per entry, enlarged `scale` times (nearest: pixels stay visible)."""
    columns = max(len(row) for row in rows)
    grid = Image.new("RGB", (columns * SIZE, len(rows) * SIZE), "white")
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            grid.paste(image, (x * SIZE, y * SIZE))
    grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST).save(path)


def evaluate_edits(pipe, seed: int, per_kind: int = 6, grid_path: Path | None = None, kinds: tuple[str, ...] = EDIT_KINDS,
                   guidance: float = 4.0) -> dict[str, dict[str, float]]:
    """Mean edit metrics of the base on new pairs of each pretraining kind and on the held-out recolouring."""
    with tempfile.TemporaryDirectory() as tmp:
        held_out = recolour_pairs(Path(tmp) / "data")
    fresh = edit_pairs(seed + 1000, per_kind * len(kinds), SIZE, kinds)
    results, rows = {}, []
    for kind in (*kinds, "recolour"):
        pairs = [p for p in fresh if p.kind == kind] if kind != "recolour" else held_out
        outputs = [sample_edit(pipe, pair, guidance) for pair in pairs]
        results[kind] = mean_edit_metrics(outputs, pairs)
        rows += [(pair.references[0], pair.references[1], output, pair.target) for pair, output in zip(pairs, outputs)]
    if grid_path is not None:
        save_grid(rows, grid_path)
    return results


def assemble(vae, transformer, seed: int) -> QwenImageEditPlusPipeline:
    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = _text_encoder(tokenizer)
    return QwenImageEditPlusPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        # the VL encoder sees each reference at the smallest size (4 tokens): the random encoder
        # learns nothing from more, and the prompt stays short enough to train fast on a CPU
        processor=_processor(tokenizer, max_pixels=MIN_PIXELS),
        transformer=transformer,
    )


def build_pretrained_pipeline(
    out_dir: str | os.PathLike, seed: int = 0, budget: Budget = Budget(), device: str = "cpu", evaluate: bool = True, grid_path: Path | None = None
) -> dict:
    """Fit, pretrain and save the pipeline folder at `out_dir` (replaced atomically); returns what was measured."""
    device = torch.device(device)
    out = Path(out_dir).resolve()
    clock = time.time()
    report: dict = {"seed": seed, "budget": asdict(budget), "flavour": FLAVOUR.name}
    with torch.random.fork_rng(devices=[]):
        log(f"1/4 fitting the VAE ({budget.vae_steps} steps of {budget.vae_batch} images)")
        vae = fit_vae(budget, seed, device)
        measure_latent_statistics(vae, seed, device)
        pipe = assemble(vae, None, seed).to(device)  # the transformer comes last
        with tempfile.TemporaryDirectory() as tmp:
            held_out = demo_images(Path(tmp) / "data")
        report["vae_psnr_demo_images"] = reconstruction_psnr(pipe, held_out)
        report["vae_psnr_random_images"] = reconstruction_psnr(pipe, random_images(np.random.default_rng([seed, 12]), 64, SIZE))
        log(f"  held-out reconstruction PSNR: {report['vae_psnr_demo_images']:.2f} dB on the demo dataset's "
            f"{len(held_out)} images, {report['vae_psnr_random_images']:.2f} dB on 64 new random ones")
        report["instruction_distinctness"] = instruction_distinctness(pipe, edit_pairs(seed + 1, 1, SIZE)[0].references)
        log(f"2/4 text encoder: instructions of one length differ by at least {report['instruction_distinctness']:.1%} in their embeddings")

        log(f"3/4 encoding {budget.pairs} pretraining pairs ({', '.join(budget.edit_kinds)}; shape recolouring held out)")
        start = time.time()
        data = encode_pairs(pipe, edit_pairs(seed, budget.pairs, SIZE, budget.edit_kinds))
        log(f"  encoded in {time.time() - start:.0f} s; prompt length {data.embeds.shape[1]} tokens")
        log(f"4/4 pretraining the transformer ({budget.transformer_steps} steps of {budget.batch} pairs)")
        pipe.register_modules(transformer=pretrain_transformer(data, budget, seed, device))
    report["seconds"] = round(time.time() - clock, 1)
    if evaluate:
        report["base_edits"] = evaluate_edits(pipe, seed, grid_path=grid_path, kinds=budget.edit_kinds)
        log("base model, mean over new pairs (PSNR dB; edit_success: inside the edited region):")
        for kind, values in report["base_edits"].items():
            log(f"  {kind:10s} " + "  ".join(f"{k} {v:6.2f}" for k, v in values.items()) + ("   <- held out" if kind == "recolour" else ""))
    _save(pipe.to("cpu"), out, report)
    log(f"pretrained edit-v2 pipeline in {out} ({report['seconds']:.0f} s)")
    return report


@contextlib.contextmanager
def _diffusers_quiet():
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def _save(pipe, out: Path, report: dict) -> None:
    with atomic_folder(out) as tmp:
        # half-precision files (the trainer loads at its own dtype): the shipped model stays small;
        # diffusers warns about casting with `to()`, which matters only for modules kept in fp32 (none here)
        with _diffusers_quiet():
            pipe.vae.to(torch.float16), pipe.transformer.to(torch.float16)
            pipe.save_pretrained(tmp)
        (tmp / MARKER_FILE).write_text(json.dumps(report, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.demo.pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda built the shipped model; cpu works, slowly")
    parser.add_argument("--no-eval", action="store_true", help="skip sampling the base on new pairs at the end")
    parser.add_argument("--grid", type=Path, help="also write the evaluation's edits as an image grid here")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help=f"change the budget, e.g. --set transformer_steps=200 (fields: {', '.join(Budget.__dataclass_fields__)})")
    args = parser.parse_args(argv)
    try:
        budget = budget_with(args.overrides)
    except ValueError as error:
        parser.error(str(error))
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    build_pretrained_pipeline(args.out_dir, args.seed, budget, args.device, evaluate=not args.no_eval, grid_path=args.grid)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
