"""The training recipe, an `accelerate` entry point:

    accelerate launch -m trainer.train --config CONFIG --data DATA --manifest MANIFEST [--set key=value ...]

It reads the caches written by `trainer.caches` (prompt embeddings, VAE latents), trains a
LoRA on the transformer with flow matching exactly as the diffusers pipeline conditions it,
checkpoints, and saves the LoRA. Rank 0 alone reports to Dagster (Pipes) and MLflow.
"""

import argparse
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, DistributedDataParallelKwargs, DistributedType
from accelerate.utils import parse_flag_from_env
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from trainer import checkpoints as ckpt
from trainer.caches import CachedSample, SamplePaths, load_sample, sample_paths
from trainer.conditioning import img_shapes, pack, unpack
from trainer.config import TrainConfig, parse_override
from trainer.dataset_config import DatasetConfig
from trainer.errors import ConfigError, DataError
from trainer.flow_matching import add_noise, sample_sigma, velocity_target
from trainer.lora import LORA_WEIGHTS_NAME, adapter_metadata, add_lora, load_lora_state_dict, lora_state_dict, save_lora
from trainer.memory import OffloadActivations, offload_optimizer_state, use_expandable_segments
from trainer.models import load_transformer
from trainer.pairing import read_manifest
from trainer.quantization import quantize_transformer
from trainer.reporting import Reporter, open_reporter
from trainer.sharding import full_optimizer_state, load_optimizer_state
from trainer.tracking import ensure_experiment, manifest_version, run_tags, run_url, tracking_uri

SUMMARY_NAME = "training_summary.json"


def predict_velocity(transformer, sample: CachedSample, x_t: torch.Tensor, sigma: torch.Tensor, dtype) -> torch.Tensor:
    """The transformer's velocity for the target tokens, called exactly as the pipeline's denoising step calls it."""
    device = sigma.device
    noisy = pack(x_t)
    references = [pack(r[None].to(device, torch.float32)) for r in sample.references]
    mask = sample.prompt_embeds_mask[None].to(device)
    prediction = transformer(
        hidden_states=torch.cat([noisy, *references], dim=1).to(dtype),
        timestep=sigma.to(dtype),  # the pipeline passes t / 1000 = σ
        encoder_hidden_states=sample.prompt_embeds[None].to(device, dtype),
        encoder_hidden_states_mask=None if bool(mask.all()) else mask,  # as the pipeline drops an all-ones mask
        img_shapes=img_shapes(x_t[0], [r[None] for r in sample.references]),
        return_dict=False,
    )[0]
    return prediction[:, : noisy.shape[1]]  # the target's tokens; references come after


def flow_matching_loss(
    transformer, sample: CachedSample, sigma: torch.Tensor, noise: torch.Tensor, dtype, x_t: torch.Tensor | None = None
) -> torch.Tensor:
    """One sample's loss; `x_t` replaces the ground-truth noised latent (scheduled sampling)."""
    x0 = sample.target[None].to(sigma.device, torch.float32)
    x_t = add_noise(x0, noise, sigma) if x_t is None else x_t
    prediction = predict_velocity(transformer, sample, x_t, sigma, dtype)
    return F.mse_loss(prediction.float(), pack(velocity_target(x0, noise)).float())


@torch.no_grad()
def rollout_input(
    transformer, sample: CachedSample, sigma: torch.Tensor, noise: torch.Tensor, offset: float, steps: int, dtype
) -> torch.Tensor:
    """Scheduled sampling: reach σ by the model's own Euler steps from a noisier σ + offset,
    so training sees the kind of input it will meet at inference (exposure bias)."""
    x0 = sample.target[None].to(sigma.device, torch.float32)
    start = torch.clamp(sigma + offset, max=1.0)
    x = add_noise(x0, noise, start)
    sigmas = torch.linspace(float(start), float(sigma), steps + 1, device=sigma.device)
    for current, following in zip(sigmas[:-1], sigmas[1:]):
        velocity = predict_velocity(transformer, sample, x, current.reshape(1), dtype).float()
        x = x + (following - current) * unpack(velocity, x.shape[-2], x.shape[-1])
    return x


def micro_step_sample(micro_step: int, n_samples: int, seed: int, world: int, rank: int) -> int:
    """Which sample a rank trains on at a micro-step: a seeded permutation per epoch.

    A pure function of the step, so a resumed run sees exactly the data order it would have.
    """
    global_index = micro_step * world + rank
    epoch, position = divmod(global_index, n_samples)
    order = np.random.default_rng([seed, epoch]).permutation(n_samples)
    return int(order[position])


def conditioning_for_step(sample: CachedSample, dropout_probability: float, generator: torch.Generator) -> CachedSample:
    """Caption dropout (instruction dropped, references kept) or, with `random` sampling, one reference.

    Each choice keeps prompt embeddings and references consistent: dropout embeddings were
    encoded with all references, so a dropped caption keeps them all.
    """
    drop = dropout_probability > 0 and float(torch.rand((), generator=generator)) < dropout_probability
    if drop and sample.dropout_embeds is not None:
        return sample.with_caption_dropped()
    if sample.per_reference_embeds is not None:
        return sample.with_one_reference(int(torch.randint(len(sample.references), (), generator=generator)))
    return sample


def micro_step_generator(seed: int, micro_step: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(hash((seed, micro_step, rank)) & 0x7FFF_FFFF_FFFF)


SHARED_RANK = -1  # micro_step_generator's stream that every rank draws alike


def make_accelerator(config: TrainConfig) -> Accelerator:
    on_cpu = not torch.cuda.is_available()
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision="no" if on_cpu else config.mixed_precision,
        cpu=on_cpu,
        # the last block's text-stream LoRA layers get no gradient (their output is discarded)
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    if parse_flag_from_env("ACCELERATE_USE_FSDP") and accelerator.distributed_type != DistributedType.FSDP:
        # accelerate shards only on accelerators: elsewhere it would quietly train unsharded
        raise ConfigError(
            f"the accelerate config asks for FSDP, but accelerate runs FSDP on GPUs only and would train "
            f"{accelerator.distributed_type.value} (unsharded) here; use config/accelerate/ddp.yaml on this machine"
        )
    return accelerator


def check_fsdp_config(config: TrainConfig) -> None:
    """Refuse, before any model is loaded, the settings that cannot run on a sharded transformer."""
    if config.base_model_precision != "no_change":
        raise ConfigError(
            f"base_model_precision {config.base_model_precision!r} cannot be sharded by FSDP (quantised weights are "
            "not plain tensors); set base_model_precision 'no_change', or keep the quantised base with "
            "config/accelerate/ddp.yaml (it fits one card)"
        )
    if config.use_ema:
        raise ConfigError(
            "use_ema is not supported with FSDP (the EMA copy of the LoRA is not sharded); set use_ema false, "
            "or use config/accelerate/ddp.yaml"
        )
    if config.offload_optimizer_state:
        raise ConfigError(
            "offload_optimizer_state is not supported with FSDP (it shards the optimizer state across the cards "
            "already); set offload_optimizer_state false, or keep it with config/accelerate/ddp.yaml"
        )
    if config.validation_step_interval:
        raise ConfigError(
            "validation_step_interval is not supported with FSDP: live validation runs on rank 0 alone, and the sharded "
            "transformer needs every rank for each forward pass; unset it (the validation_report asset and "
            "`qwen-edit train` validate the saved LoRA after training), or use config/accelerate/ddp.yaml"
        )


def make_optimizer(config: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if config.optimizer == "adamw8bit":
        if not torch.cuda.is_available():
            raise ConfigError("optimizer 'adamw8bit' needs a CUDA GPU (bitsandbytes); use 'adamw' on this machine")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("optimizer 'adamw8bit' needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(params, lr=config.learning_rate, weight_decay=1e-2)
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=1e-2)


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    loss_history: list[float]
    lora_path: Path
    output_dir: Path
    mlflow_run_id: str | None = None
    mlflow_run_url: str | None = None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "steps": self.steps,
            "final_loss": self.final_loss,
            "loss_history": self.loss_history,
            "lora_path": str(self.lora_path),
            "output_dir": str(self.output_dir),
            "mlflow_run_id": self.mlflow_run_id,
            "mlflow_run_url": self.mlflow_run_url,
            "seconds": self.seconds,
        }


def training_samples(manifest, dataset_config: DatasetConfig, config: TrainConfig) -> list[tuple[str, SamplePaths]]:
    """One epoch's samples: each training row 1 + its dataset's `repeats` times."""
    samples = []
    for row in manifest[manifest["split"] == "train"].to_dict("records"):
        copies = 1 + dataset_config.by_id(row["dataset_id"]).repeats
        samples += [(row["name"], sample_paths(dataset_config, config, row))] * copies
    return samples


class LoraTrainingRecipe:
    """setup -> train -> save -> cleanup, in the manner of torchtune's recipes."""

    def __init__(self, config: TrainConfig, dataset_config: DatasetConfig, manifest_path: Path, project_root: Path, tags: dict[str, str]):
        self.config = config
        self.dataset_config = dataset_config
        self.project_root = project_root
        self.tags = tags
        manifest = read_manifest(manifest_path)
        self.manifest = manifest
        self.data_version = manifest_version(manifest_path)
        self.samples = training_samples(manifest, dataset_config, config)
        self.output_dir = dataset_config.resolve(config.output_dir)
        self.checkpoint_root = self.output_dir / "checkpoints"

    # -- setup ---------------------------------------------------------------------------
    def setup(self) -> None:
        config = self.config
        self._check_caches()
        if torch.cuda.is_available():
            use_expandable_segments()  # before CUDA starts: the reserved peak stays near the allocated one
        self.accelerator = make_accelerator(config)
        self.sharded = self.accelerator.distributed_type == DistributedType.FSDP
        if self.sharded:
            check_fsdp_config(config)
        self.weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.accelerator.mixed_precision, torch.float32)
        transformer = load_transformer(config, self.weight_dtype)
        if config.base_model_precision not in ("no_change", "nf4-bnb"):
            quantize_transformer(transformer, config, self.accelerator.device)
        if not self.sharded:  # FSDP moves each shard to its card as it shards: the whole model never lands on one
            transformer.to(self.accelerator.device)
        params = add_lora(transformer, config.lora_rank, config.lora_scale_alpha, config.seed)
        if config.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        self.max_steps = config.resolved_max_train_steps(len(self.samples))
        optimizer = make_optimizer(config, params)
        on_gpu = self.accelerator.device.type == "cuda"
        if config.offload_optimizer_state and on_gpu:
            offload_optimizer_state(optimizer)  # on the plain optimizer, before prepare wraps it
        self.offload = OffloadActivations() if config.offload_activations and on_gpu else nullcontext()
        self.lr_scheduler = get_scheduler(
            config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=self.max_steps
        )
        self.resumed_from, state = self._checkpoint_to_resume()
        if state is not None:
            load_lora_state_dict(transformer, state.lora)  # full tensors, before prepare shards them
        self.transformer, self.optimizer = self.accelerator.prepare(transformer, optimizer)
        # FSDP2 replaces the parameters by sharded DTensors: clip, average and save those
        self.params = [p for p in self.transformer.parameters() if p.requires_grad]
        self.ema_device = torch.device("cpu") if config.ema_device == "cpu" else self.accelerator.device
        self.ema = EMAModel([p.detach().to(self.ema_device).clone() for p in self.params], decay=config.ema_decay) if config.use_ema else None
        self.start_step, self.loss_history = 0, []
        if state is not None:
            self._restore(state)
        self.validation_reports = []

    def _checkpoint_to_resume(self) -> tuple[Path | None, ckpt.TrainingState | None]:
        resume = ckpt.resolve_resume(self.checkpoint_root, self.config.resume_from_checkpoint)
        state = ckpt.load_checkpoint(resume) if resume is not None else None
        if state is None or not self._resumable(state):
            return None, None
        return resume, state

    def _restore(self, state: ckpt.TrainingState) -> None:
        """Optimiser, scheduler, step and EMA from a checkpoint (the LoRA is loaded before prepare)."""
        load_optimizer_state(self.optimizer, state.optimizer)
        self.lr_scheduler.load_state_dict(state.lr_scheduler)
        self.start_step, self.loss_history = state.step, list(state.loss_history)
        if self.ema is not None and state.ema is not None:
            self.ema.shadow_params = [state.ema[f"ema.{i}"].to(self.ema_device) for i in range(len(self.params))]
            self.ema.optimization_step = state.ema_step

    def _resumable(self, state: ckpt.TrainingState) -> bool:
        """`latest` continues an interrupted run; a finished run or one on other data starts fresh."""
        if self.config.resume_from_checkpoint != "latest":
            return True  # a checkpoint named explicitly is always resumed
        if state.step >= self.max_steps:
            print(f"the latest checkpoint (step {state.step}) is of a finished run: training from scratch", flush=True)
            return False
        if state.data_version and state.data_version != self.data_version:
            print("the latest checkpoint was trained on other data: training from scratch", flush=True)
            return False
        return True

    def _check_caches(self) -> None:
        if not self.samples:
            raise DataError("the manifest has no training samples")
        missing = [str(p.text if not p.text.exists() else p.vae) for _, p in self.samples if not (p.text.exists() and p.vae.exists())]
        if missing:
            raise DataError(
                f"{len(missing)} sample(s) have no cache yet, e.g. {missing[0]}; materialise the text_embeds "
                "and vae_latents assets (or run `qwen-edit cache`) before training"
            )

    # -- train ---------------------------------------------------------------------------
    def train(self, reporter: Reporter, on_step=None) -> None:
        config, accelerator = self.config, self.accelerator
        world, rank = accelerator.num_processes, accelerator.process_index
        accumulation = config.gradient_accumulation_steps
        self.transformer.train()
        reporter.log(
            f"training {self.max_steps} steps on {len(self.samples)} samples "
            f"(accumulation {accumulation}, {world} process(es){', sharded by FSDP' if self.sharded else ''}, "
            f"{accelerator.device}, from step {self.start_step})"
        )
        for step in range(self.start_step, self.max_steps):
            losses = []
            for micro in range(step * accumulation, (step + 1) * accumulation):
                index = micro_step_sample(micro, len(self.samples), config.seed, world, rank)
                generator = micro_step_generator(config.seed, micro, rank)
                sample = load_sample(self.samples[index][1], self.samples[index][0])
                sample = conditioning_for_step(sample, config.caption_dropout_probability, generator)
                sigma = sample_sigma(config.flow_schedule_shift, generator).to(accelerator.device)
                noise = torch.randn((1, *sample.target.shape), generator=generator).to(accelerator.device)
                # under FSDP every forward pass needs every rank: whether to roll out is drawn alike on all of them
                rollout = micro_step_generator(config.seed, micro, SHARED_RANK) if self.sharded else generator
                x_t = self._scheduled_sampling_input(sample, sigma, noise, rollout)
                with accelerator.accumulate(self.transformer):
                    with self.offload:
                        loss = flow_matching_loss(self.transformer, sample, sigma, noise, self.weight_dtype, x_t)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and config.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(self.params, config.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                losses.append(loss.detach())
            if self.ema is not None:
                # EMAModel averages only tensors that require grad (it copies the rest): mark the copies
                self.ema.step([p.detach().to(self.ema_device).requires_grad_(True) for p in self.params])
            self.lr_scheduler.step()
            step_loss = accelerator.gather(torch.stack(losses).mean()[None]).mean().item()
            self.loss_history.append(step_loss)
            if on_step is not None:
                on_step(step + 1, step_loss, self.lr_scheduler.get_last_lr()[0])
            if config.validation_step_interval and (step + 1) % config.validation_step_interval == 0:
                self.validate(step + 1, reporter)
            if (step + 1) % config.checkpointing_steps == 0 and step + 1 < self.max_steps:
                self.save_checkpoint(step + 1)
                reporter.log(f"step {step + 1}: checkpoint saved")

    def _scheduled_sampling_input(self, sample, sigma, noise, generator) -> torch.Tensor | None:
        config = self.config
        if config.scheduled_sampling_probability <= 0:
            return None
        if float(torch.rand((), generator=generator)) >= config.scheduled_sampling_probability:
            return None
        offset = float(torch.rand((), generator=generator)) * config.scheduled_sampling_max_step_offset / 1000
        return rollout_input(self.transformer, sample, sigma, noise, offset, config.scheduled_sampling_steps, self.weight_dtype)

    def validate(self, step: int, reporter: Reporter) -> None:
        """Rank 0 edits the validation pairs with the current LoRA; the report goes to validation/step-N."""
        if self.accelerator.is_main_process:
            from trainer.validation import run_live_validation

            out = self.output_dir / "validation" / f"step-{step}"
            report = run_live_validation(
                self.accelerator.unwrap_model(self.transformer), self.config, self.manifest, out,
                self.accelerator.device, self.weight_dtype,
            )
            self.validation_reports.append((step, report))
            reporter.log(f"step {step}: validation " + ", ".join(f"{k} {v:.4f}" for k, v in report.summary.items()))
        self.accelerator.wait_for_everyone()

    def save_checkpoint(self, step: int) -> None:
        # every rank gathers (collectives under FSDP), rank 0 writes
        lora, optimizer = lora_state_dict(self.accelerator.unwrap_model(self.transformer)), full_optimizer_state(self.optimizer)
        if self.accelerator.is_main_process:
            state = ckpt.TrainingState(
                step=step,
                lora=lora,
                optimizer=optimizer,
                lr_scheduler=self.lr_scheduler.state_dict(),
                loss_history=self.loss_history,
                ema={f"ema.{i}": p.detach().cpu() for i, p in enumerate(self.ema.shadow_params)} if self.ema else None,
                ema_step=self.ema.optimization_step if self.ema else 0,
                data_version=self.data_version,
            )
            ckpt.save_checkpoint(self.checkpoint_root, state, self.config.checkpoints_total_limit)
        self.accelerator.wait_for_everyone()

    def save_lora(self) -> Path:
        """The trained LoRA in lora/; with use_ema, the EMA weights beside it in lora/ema/."""
        path = self.output_dir / "lora"
        self._write_lora(path)
        if self.ema is not None:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)
            self._write_lora(path / "ema")
            self.ema.restore(self.params)
        self.accelerator.wait_for_everyone()
        return path / LORA_WEIGHTS_NAME

    def _write_lora(self, path: Path) -> None:
        """Every rank gathers the LoRA (a collective under FSDP); rank 0 writes it."""
        transformer = self.accelerator.unwrap_model(self.transformer)
        layers = lora_state_dict(transformer)
        if self.accelerator.is_main_process:
            save_lora(self.config.flavour.pipeline_cls(), layers, adapter_metadata(transformer), path)

    def cleanup(self) -> None:
        self.accelerator.end_training()


def plot_loss(history: list[float], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.plot(range(1, len(history) + 1), history, lw=1, alpha=0.5, label="loss")
    if len(history) >= 10:
        window = max(2, len(history) // 10)
        smooth = np.convolve(history, np.ones(window) / window, mode="valid")
        ax.plot(range(window, len(history) + 1), smooth, lw=2, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


class MlflowRun:
    """Rank 0's MLflow run: params at the start, a loss history per step, artifacts at the end."""

    def __init__(self, config: TrainConfig, project_root: Path, tags: dict[str, str], manifest_path: Path | None = None):
        import mlflow

        self.mlflow = mlflow
        self.uri = tracking_uri(project_root)
        self.experiment_id = ensure_experiment(config.tracker_project_name, self.uri, project_root)
        tags = {**run_tags(config.model_flavour, project_root, manifest_path), **tags}  # command-line tags win
        run = mlflow.start_run(
            experiment_id=self.experiment_id, run_name=config.tracker_run_name, tags=tags, log_system_metrics=True
        )
        self.run_id = run.info.run_id
        params = {k: v for k, v in config.model_dump().items() if v is not None}
        params["model_kwargs"] = json.dumps(params.get("model_kwargs", {}))
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})

    @property
    def url(self) -> str:
        return run_url(self.uri, self.experiment_id, self.run_id)

    def log_step(self, step: int, loss: float, lr: float) -> None:
        self.mlflow.log_metrics({"train_loss": loss, "learning_rate": lr}, step=step)

    def log_validation(self, step: int, report) -> None:
        self.mlflow.log_metrics({f"validation_{k}": v for k, v in report.summary.items()}, step=step)
        self.mlflow.log_artifacts(str(report.html_path.parent), artifact_path=f"validation/step-{step}")

    def finish(self, result: TrainResult, curve: Path) -> None:
        self.mlflow.log_metrics({"final_loss": result.final_loss, "train_seconds": result.seconds})
        self.mlflow.log_artifact(str(result.lora_path), artifact_path="lora")
        self.mlflow.log_artifact(str(curve), artifact_path="plots")
        self.mlflow.end_run()


def run_training(
    config: TrainConfig, dataset_config: DatasetConfig, manifest_path: Path, project_root: Path, tags: dict[str, str]
) -> TrainResult | None:
    recipe = LoraTrainingRecipe(config, dataset_config, manifest_path, project_root, tags)
    recipe.setup()
    is_main = recipe.accelerator.is_main_process
    started = time.time()
    with open_reporter(is_main) as reporter:
        tracker = MlflowRun(config, project_root, tags, manifest_path) if (is_main and config.report_to == "mlflow") else None
        progress = _progress_bar(recipe, is_main)

        def on_step(step: int, loss: float, lr: float) -> None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}")
            if tracker:
                tracker.log_step(step, loss, lr)
            if step % max(1, recipe.max_steps // 10) == 0 or step == recipe.max_steps:
                reporter.log(f"step {step}/{recipe.max_steps} loss {loss:.5f} lr {lr:.2e}")

        recipe.train(reporter, on_step)
        progress.close()
        lora_path = recipe.save_lora()
        recipe.save_checkpoint(recipe.max_steps)
        recipe.cleanup()
        if not is_main:
            return None
        history = recipe.loss_history
        result = TrainResult(
            steps=len(history),
            final_loss=float(np.mean(history[-max(1, len(history) // 10):])) if history else math.nan,
            loss_history=history,
            lora_path=lora_path,
            output_dir=recipe.output_dir,
            seconds=time.time() - started,
        )
        curve = plot_loss(history, recipe.output_dir / "loss_curve.png")
        if tracker:
            result.mlflow_run_id, result.mlflow_run_url = tracker.run_id, tracker.url
            for step, report in recipe.validation_reports:
                tracker.log_validation(step, report)
            tracker.finish(result, curve)
        from trainer.io import atomic_write_json

        atomic_write_json(recipe.output_dir / SUMMARY_NAME, result.to_json())
        reporter.materialization(
            {
                "final_loss": result.final_loss,
                "steps": result.steps,
                "lora_path": str(lora_path),
                "lora_bytes": lora_path.stat().st_size,
                "loss_curve": str(curve),
                "mlflow_run_id": result.mlflow_run_id or "",
                "mlflow_run_url": result.mlflow_run_url or "",
                "resumed_from": str(recipe.resumed_from or ""),
                "train_seconds": round(result.seconds, 2),
            }
        )
        reporter.log(f"saved LoRA to {lora_path} (final loss {result.final_loss:.5f})")
        return result


def _progress_bar(recipe: LoraTrainingRecipe, is_main: bool):
    from tqdm.auto import tqdm

    return tqdm(total=recipe.max_steps, initial=recipe.start_step, desc="training", unit="step", disable=not is_main)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="trainer.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, type=Path, help="training config.json")
    parser.add_argument("--data", type=Path, help="multidatabackend.json (default: the config's data_backend_config)")
    parser.add_argument("--manifest", required=True, type=Path, help="pairing manifest written by the pairing step")
    parser.add_argument("--project-root", type=Path, default=Path.cwd(), help="where relative paths and mlruns/ live")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--tag", dest="tags", action="append", default=[], metavar="KEY=VALUE", help="MLflow run tag")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from trainer.workflow import load_project

    args = parse_args(argv)
    overrides = dict(parse_override(o) for o in args.overrides)
    project = load_project(args.config, args.data, args.project_root, overrides)
    tags = dict(t.split("=", 1) for t in args.tags)
    run_training(project.config, project.dataset_config, args.manifest, project.root, tags)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
