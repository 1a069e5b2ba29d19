"""Validation: edit every eval pair with the diffusers pipeline, without and with the trained LoRA.

Generation is the pipeline's denoising loop (`trainer.evaluation.sampling`, proven equal to the pipeline's
`__call__`): true CFG with `validation_guidance`, the negative prompt encoded with the same
references, so a preview shows what users will get. Each row
is scored against its target in latent space (meaningful even for random-weight test models)
and in pixels (`trainer.evaluation.metrics`: PSNR, SSIM, edit success, preservation, pixel
shift; meaningful for a model whose VAE reconstructs images, real or the trained demo model).
"""

import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from html import escape
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from trainer.config.schema import TrainConfig
from trainer.data.images import load_image, load_rgb, on_white
from trainer.data.pairing import reference_paths
from trainer.evaluation.embedded_images import image_data_uri
from trainer.evaluation.metrics import HIGHER_IS_BETTER, edit_metrics
from trainer.evaluation.residency import TakingTurns
from trainer.evaluation.sampling import EditConditioning, generate_latents, generate_latents_21
from trainer.io import atomic_write_json, atomic_write_text
from trainer.model.adapters import load_adapter
from trainer.model.conditioning import (
    embed_prompt,
    encode_image_latents,
    pipeline_tokens,
    prepare_references,
    preprocess_target,
    references_take_target_area,
)
from trainer.model.loading import compute_dtype, default_device, load_pipeline, load_transformer
from trainer.model.peak_memory import peak_gib, reset_peak
from trainer.tracking.mlflow_run import outage_tolerant

MAX_TRAIN_ROWS_WITHOUT_EVAL = 4
PROMPT_ROW = "validation_prompt"  # the row that edits with the config's validation_prompt


@dataclass
class ValidationRow:
    name: str
    caption: str
    references: list[str]
    target: str
    base_image: str = ""
    lora_image: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class ValidationReport:
    rows: list[ValidationRow]
    html_path: Path
    grid_path: Path
    summary: dict[str, float]
    source_split: str
    timing: dict[str, float] = field(default_factory=dict)  # seconds per phase, edits made, s per edit
    peak_memory_gib: dict[str, float] = field(default_factory=dict)  # after training: {allocated, reserved}; {} off CUDA

    def to_json(self) -> dict:
        return {
            "rows": [asdict(r) for r in self.rows],
            "html_path": str(self.html_path),
            "grid_path": str(self.grid_path),
            "summary": self.summary,
            "source_split": self.source_split,
            "timing": self.timing,
            "peak_memory_gib": self.peak_memory_gib,
        }


def validation_rows(manifest: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The eval split; without one, the first training pairs (and the report says so)."""
    evals = manifest[manifest["split"] == "eval"]
    if len(evals):
        return evals, "eval"
    return manifest[manifest["split"] == "train"].head(MAX_TRAIN_ROWS_WITHOUT_EVAL), "train"


@torch.no_grad()
def decode_latents(pipe, tokens: torch.Tensor, width: int, height: int) -> Image.Image:
    """The pipeline's own decode tail (unpack, de-normalise, VAE decode, postprocess)."""
    vae = pipe.vae
    latents = pipe._unpack_latents(tokens, height, width, pipe.vae_scale_factor).to(vae.dtype)
    mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1).to(latents)
    std = torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(latents)
    image = vae.decode(latents * std + mean, return_dict=False)[0][:, :, 0]
    return pipe.image_processor.postprocess(image, output_type="pil")[0]


@torch.no_grad()
def encode_conditioning(pipe, config: TrainConfig, caption: str, references: list[Image.Image]) -> EditConditioning:
    """Positive and negative prompt (both with the references, as the pipeline does) + reference latents."""
    flavour = config.flavour
    size = config.validation_size if references_take_target_area(flavour, config.model_kwargs.match_target_res) else None
    refs = prepare_references(pipe, flavour, references, size)
    positive = embed_prompt(pipe, flavour, caption, refs)
    negative = embed_prompt(pipe, flavour, config.validation_negative_prompt, refs)
    return EditConditioning(
        positive.embeds[None], positive.mask[None], negative.embeds[None], negative.mask[None],
        [encode_image_latents(pipe, image) for image in refs.vae_images],
        *((positive.image_pad_mask[None], negative.image_pad_mask[None]) if flavour.is_21 else ()),
    )


def edit_latents(pipe, config: TrainConfig, cond: EditConditioning) -> torch.Tensor:
    width, height = config.validation_size
    shared = (pipe.transformer, pipe.scheduler, cond, width, height, config.validation_num_inference_steps,
              config.validation_guidance, torch.Generator("cpu").manual_seed(config.validation_seed))
    if config.flavour.is_21:
        # the checkpoint's own schedule, when it sets one (then it sets the steps)
        return generate_latents_21(*shared, pipe.config.sample_sigmas)
    return generate_latents(*shared, pipe.vae_scale_factor)


def run_validation(
    config: TrainConfig,
    manifest: pd.DataFrame,
    lora_dir: Path | None,
    out_dir: Path,
    device: torch.device | None = None,
) -> ValidationReport:
    """After training: a fresh pipeline, edits without and then with the exported LoRA file.

    A quantised base (`base_model_precision`) or `blocks_to_swap` loads the transformer as training
    does, so that validation fits the card training fitted; the encoders take turns with it there.
    The report carries the run's GPU peak, loading included."""
    device = device or default_device()
    dtype = compute_dtype(config, device)
    reset_peak(device)
    if config.base_model_precision == "no_change" and not config.blocks_to_swap:
        pipe = load_pipeline(config, device, dtype)

        def use(stage: str) -> None:
            if stage == "lora":
                load_adapter(pipe, lora_dir)  # LoRA/DoRA by load_lora_weights, LoKr/LoHa their own way; safetensors only

        return validate(pipe, config, manifest, out_dir, ("base", "lora") if lora_dir else ("base",), use, peak_since_reset=True)
    from trainer.model.block_swap import BlockSwap

    pipe = load_pipeline(config, torch.device("cpu"), dtype, transformer=False)
    transformer, swapped = _transformer_as_training_loads_it(config, device, dtype)
    pipe.register_modules(transformer=transformer)
    if lora_dir:
        load_adapter(pipe, lora_dir)
    if swapped:  # after the LoRA is in: block swap moves (or keeps) its weights with their blocks
        BlockSwap(transformer, swapped, device)
    turns = TakingTurns(pipe, device)

    def use_adapters(stage: str) -> None:
        if lora_dir:
            transformer.enable_adapters() if stage == "lora" else transformer.disable_adapters()  # any peft adapter

    try:
        return validate(
            pipe, config, manifest, out_dir, ("base", "lora") if lora_dir else ("base",), use_adapters, turns, peak_since_reset=True
        )
    finally:
        turns.restore()


def _transformer_as_training_loads_it(config: TrainConfig, device: torch.device, dtype: torch.dtype):
    """Quantised block by block with the swapped blocks left in CPU memory, as training loads it;
    returns the transformer and the numbers of the blocks to swap."""
    from trainer.model.block_swap import move_to_device_except, swapped_block_indices
    from trainer.model.quantization import quantize_transformer, repeated_blocks

    transformer = load_transformer(config, dtype)
    swapped = swapped_block_indices(len(repeated_blocks(transformer)), config.blocks_to_swap)
    if config.base_model_precision not in ("no_change", "nf4-bnb"):
        quantize_transformer(transformer, config, device, stay_on_cpu=swapped)
    move_to_device_except(transformer, device, set(swapped))
    transformer.requires_grad_(False)
    return transformer, swapped


def run_live_validation(
    transformer, config: TrainConfig, manifest: pd.DataFrame, out_dir: Path, device: torch.device, dtype: torch.dtype
) -> ValidationReport:
    """During training: the training transformer itself, its LoRA switched off for the base row.

    Where the VL encoder and the VAE do not fit beside it, they take turns with it on the card
    (`TakingTurns`): the transformer's weights wait in CPU memory while they encode and decode."""
    pipe = load_pipeline(config, torch.device("cpu"), dtype, transformer=False)
    pipe.register_modules(transformer=transformer)
    turns = TakingTurns(pipe, device)
    was_training = transformer.training
    transformer.eval()

    def use(stage: str) -> None:
        transformer.disable_adapters() if stage == "base" else transformer.enable_adapters()

    try:
        return validate(pipe, config, manifest, out_dir, ("base", "lora"), use, turns)
    finally:
        turns.restore()
        transformer.enable_adapters()
        transformer.train(was_training)
        pipe.register_modules(transformer=None)
        del pipe
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def validate(
    pipe, config: TrainConfig, manifest: pd.DataFrame, out_dir: Path, stages: tuple[str, ...], use, turns=None,
    peak_since_reset: bool = False,
) -> ValidationReport:
    """Edit every validation pair once per stage (`use(stage)` readies the pipe), score, write the report.

    `turns` (a `TakingTurns`) puts only each phase's components on the card: encoders, transformer, VAE.
    `peak_since_reset`: the report carries the GPU peak since the caller reset it (validation after
    training; never during it, where that would reset the training loop's peak)."""
    phase = turns.phase if turns is not None else (lambda name: nullcontext())
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rows_df, split = validation_rows(manifest)
    width, height = config.validation_size
    rows = [ValidationRow(r["name"], r["caption"], reference_paths(r), r["target_path"]) for _, r in rows_df.iterrows()]
    if config.validation_prompt and rows:  # the user's own instruction on the first pair's references
        rows.append(ValidationRow(PROMPT_ROW, config.validation_prompt, list(rows[0].references), target=""))
    started = time.perf_counter()
    with phase("encode"):
        conditioning = {
            row.name: encode_conditioning(pipe, config, row.caption, [load_image(p, config.flavour.keeps_alpha) for p in row.references])
            for row in tqdm(rows, desc="validation: encoding", unit="pair")
        }
    outputs = {}
    encoded = time.perf_counter()
    with phase("generate"):
        for stage in stages:
            use(stage)
            for row in tqdm(rows, desc=f"validation: {stage} edits", unit="pair"):
                outputs[(stage, row.name)] = edit_latents(pipe, config, conditioning[row.name])
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # the edits' time, not their queueing
    generated = time.perf_counter()
    with phase("decode"):
        _decode_and_score(pipe, config, rows, stages, outputs, out_dir)
    timing = {"encode_s": encoded - started, "generate_s": generated - encoded, "decode_s": time.perf_counter() - generated,
              "edits": len(outputs), "generate_s_per_edit": (generated - encoded) / max(1, len(outputs))}
    summary = mean_metrics(rows)
    grid = write_grid(rows, out_dir / "validation_grid.png", cell=max(96, min(256, width)))
    html = write_html(rows, out_dir / "report.html", config, split, summary)
    report = ValidationReport(rows, html, grid, summary, split, {k: round(v, 4) for k, v in timing.items()},
                              peak_gib() if peak_since_reset else {})
    atomic_write_json(out_dir / "report.json", report.to_json())
    return report


def _decode_and_score(pipe, config: TrainConfig, rows: list, stages: tuple[str, ...], outputs: dict, out_dir: Path) -> None:
    width, height = config.validation_size
    for row in rows:
        row.references = [_copy_image(p, out_dir / "images" / f"{row.name}_reference_{i + 1}.png") for i, p in enumerate(row.references)]
        images = {}
        for stage in stages:
            decoded = decode_latents(pipe, outputs[(stage, row.name)], width, height)
            path = out_dir / "images" / f"{row.name}_{stage}.png"
            decoded.save(path)  # edit-2.1 decodes RGBA: saved with its alpha, scored on white like the targets
            images[stage] = on_white(decoded)
            setattr(row, f"{stage}_image", str(path))
        if row.target:  # the validation_prompt row has no target to be scored against
            target_image = load_rgb(row.target)
            reference_image = load_rgb(row.references[0])  # the image being edited: preservation and shift are against it
            encoded = load_image(row.target, config.flavour.keeps_alpha)
            target_tokens = pipeline_tokens(pipe, encode_image_latents(pipe, preprocess_target(pipe, encoded, (width, height)))[None])
            row.target = _copy_image(row.target, out_dir / "images" / f"{row.name}_target.png")
            for stage in stages:
                tokens = outputs[(stage, row.name)]
                row.metrics[f"{stage}_latent_mse"] = float(torch.mean((tokens.float().cpu() - target_tokens.float().cpu()) ** 2))
                for name, value in edit_metrics(images[stage], target_image, reference_image).items():
                    row.metrics[f"{stage}_{name}"] = value


def mean_metrics(rows: list[ValidationRow]) -> dict[str, float]:
    """Each metric's mean over the rows that have it (a pair whose target equals its reference has no edit_success)."""
    keys = dict.fromkeys(key for row in rows for key in row.metrics)
    return {key: float(np.mean([row.metrics[key] for row in rows if key in row.metrics])) for key in keys}


def _copy_image(source: str, destination: Path) -> str:
    """Copies beside the report, so the HTML works wherever it is opened (MLflow, Dagster, disk)."""
    load_rgb(source).save(destination)
    return str(destination)


def write_grid(rows: list[ValidationRow], path: Path, cell: int) -> Path:
    """One line per pair: references | base | LoRA | target."""
    columns = max((len(r.references) for r in rows), default=1) + 3
    grid = Image.new("RGB", (columns * cell, max(1, len(rows)) * cell), "white")
    for y, row in enumerate(rows):
        cells = [*row.references] + [""] * (columns - 3 - len(row.references)) + [row.base_image, row.lora_image, row.target]
        for x, image_path in enumerate(cells):
            if image_path:
                grid.paste(load_rgb(image_path).resize((cell, cell)), (x * cell, y * cell))
    grid.save(path)
    return path


METRICS_LEGEND = (
    "psnr, ssim: the output against the target (higher is better); edit_success: PSNR against the target "
    "inside the pixels the edit changes (did the edit happen?); preservation: PSNR against the reference "
    "outside them (did the rest stay?); pixel_shift: translation of the output against the reference in "
    "pixels (0 is best; shift_x/shift_y its signed parts); latent_mse: distance of the generated latent to "
    "the target's (lower is better). PSNRs in dB, 100 for identical pixels."
)


STAGE_TITLES = {"base": "base", "lora": "LoRA"}


def metrics_table(metrics: dict[str, float]) -> str:
    """`{stage}_{metric}` values as metric | base | LoRA rows, the better stage in bold where the direction is known."""
    stages = [s for s in STAGE_TITLES if any(k.startswith(f"{s}_") for k in metrics)]
    names = list(dict.fromkeys(k.split("_", 1)[1] for k in metrics))
    lines = ["<table border=1 cellpadding=4><tr><th>metric</th>" + "".join(f"<th>{STAGE_TITLES[s]}</th>" for s in stages) + "</tr>"]
    for name in names:
        values = {s: metrics.get(f"{s}_{name}") for s in stages}
        best = _better_stage(name, values)
        cells = "".join(
            "<td></td>" if v is None else (f"<td><b>{v:.4f}</b></td>" if s == best else f"<td>{v:.4f}</td>")
            for s, v in values.items()
        )
        lines.append(f"<tr><td>{escape(name)}</td>{cells}</tr>")
    return "".join(lines) + "</table>"


def _better_stage(name: str, values: dict[str, float | None]) -> str | None:
    higher_is_better = {**HIGHER_IS_BETTER, "latent_mse": False}.get(name)  # None: no direction (shift_x, shift_y)
    known = {s: v for s, v in values.items() if v is not None}
    if higher_is_better is None or len(known) < 2 or len(set(known.values())) == 1:
        return None
    return (max if higher_is_better else min)(known, key=known.get)


def write_html(rows: list[ValidationRow], path: Path, config: TrainConfig, split: str, summary: dict) -> Path:
    """Every caption, name and path is escaped: they come from the dataset, and the report is opened in
    browsers (MLflow's artifact view, Dagster, disk)."""

    def img(p: str) -> str:  # embedded (self-contained in MLflow, Dagster, a browser); the file named in alt (escaped)
        return f'<img src="{image_data_uri(p)}" alt="{escape(Path(p).relative_to(path.parent).as_posix())}" width="160">' if p else ""

    head = (
        f"<h1>qwen-edit validation: {escape(config.model_flavour)}</h1>"
        f"<p>model {escape(config.model_path)}; guidance {config.validation_guidance}; "
        f"{config.validation_num_inference_steps} steps; {escape(config.validation_resolution)}; pairs from the {escape(split)} split</p>"
        f"<p>{escape(METRICS_LEGEND)}</p>"
    )
    table = ["<table border=1 cellpadding=4><tr><th>pair</th><th>instruction</th><th>reference(s)</th>"
             "<th>base</th><th>LoRA</th><th>target</th><th>metrics</th></tr>"]
    for r in rows:
        metrics = metrics_table(r.metrics) if r.metrics else ""
        table.append(
            f"<tr><td>{escape(r.name)}</td><td>{escape(r.caption)}</td><td>{''.join(img(p) for p in r.references)}</td>"
            f"<td>{img(r.base_image)}</td><td>{img(r.lora_image)}</td><td>{img(r.target)}</td><td>{metrics}</td></tr>"
        )
    table.append("</table>")
    atomic_write_text(path, f"<html><body>{head}<h2>means</h2>{metrics_table(summary)}<h2>pairs</h2>{''.join(table)}</body></html>")
    return path


@outage_tolerant("the validation report")
def log_to_mlflow(report: ValidationReport, run_id: str, tracking_uri: str, step: int = 0) -> None:
    """Attach the report and the mean metrics to the training run at `step` (its last training step: the
    metrics continue the live validations' curves), and each pair's edits as an MLflow image at that step."""
    from mlflow.tracking import MlflowClient

    from trainer.tracking.validation_images import pair_strips

    client = MlflowClient(tracking_uri)
    strips = pair_strips(report)
    client.log_batch(run_id, metrics=[_metric(f"validation_{k}", v, step) for k, v in report.summary.items()])
    client.log_artifacts(run_id, str(report.html_path.parent), artifact_path="validation")
    for key, strip in strips.items():
        with Image.open(strip) as image:
            client.log_image(run_id, image.convert("RGB"), key=key, step=step, synchronous=True)


def _metric(key: str, value: float, step: int):
    import time

    from mlflow.entities import Metric

    return Metric(key, float(value), int(time.time() * 1000), step)
