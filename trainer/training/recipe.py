"""The LoRA training recipe: setup -> train -> save -> cleanup, in the manner of torchtune's recipes.

`trainer.train` is its `accelerate launch` entry point; the step's arithmetic is in
`trainer.training.loss`, the data order in `trainer.training.data_order`.
"""

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import DistributedType
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from trainer.config.schema import TrainConfig
from trainer.data.caches import load_sample, verify_cache
from trainer.data.dataset_config import DatasetConfig
from trainer.data.pairing import read_manifest
from trainer.data.versions import manifest_version
from trainer.errors import DataError
from trainer.faults import kill_point
from trainer.model.block_swap import BlockSwap, move_to_device_except, swapped_block_indices
from trainer.model.loading import load_transformer
from trainer.model.adapters import adapter_plan, add_adapter, comfyui_tensors
from trainer.model.lora import LORA_WEIGHTS_NAME, adapter_metadata, load_lora_state_dict, lora_state_dict, save_lora
from trainer.model.memory import OffloadActivations, offload_optimizer_state, use_expandable_segments
from trainer.model.peak_memory import peak_gib, reset_peak
from trainer.model.quantization import quantize_transformer, repeated_blocks
from trainer.model.speed import apply_speed_settings
from trainer.tracking.loss_summary import FINAL_LOSS, final_loss
from trainer.tracking.mlflow_run import MlflowRun
from trainer.tracking.plots import plot_loss
from trainer.tracking.reporting import Reporter, open_reporter
from trainer.training import checkpoints as ckpt
from trainer.training import run_lock
from trainer.training.data_order import (
    SHARED_RANK,
    conditioning_for_step,
    micro_step_generator,
    micro_step_sample,
    training_samples,
)
from trainer.training.distributed import check_fsdp_config, make_accelerator, make_optimizer
from trainer.training.flow_matching import image_seq_len, training_sigma_schedule
from trainer.training.held_out import HELD_OUT_SAMPLES, base_and_lora_loss, held_out_grid
from trainer.training.guards import NonFiniteGuard, assert_finite
from trainer.training.loss import flow_matching_loss, rollout_input
from trainer.training.sharding import full_optimizer_state, full_tensor, load_optimizer_state

SUMMARY_NAME = "training_summary.json"
CACHE_COMMAND = "qwen-edit cache --config CONFIG"  # trainer.train names the exact command


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
            FINAL_LOSS: self.final_loss,
            "loss_history": self.loss_history,
            "lora_path": str(self.lora_path),
            "output_dir": str(self.output_dir),
            "mlflow_run_id": self.mlflow_run_id,
            "mlflow_run_url": self.mlflow_run_url,
            "seconds": self.seconds,
            **self.extra,  # e.g. skipped_steps (max_nonfinite_steps)
        }


@dataclass
class QueuedStep:
    """An optimizer step queued on the device: what `_finish_step` reads once it has run."""

    step: int
    losses: list[torch.Tensor] = field(default_factory=list)  # one per micro-step, on the device
    grad_norm: torch.Tensor | None = None
    skip_update: bool = False
    lr: float = math.nan  # the learning rate after this step's scheduler step, as the log reports it

    @property
    def loss(self) -> torch.Tensor:
        return torch.stack(self.losses).mean()


class LoraTrainingRecipe:
    """setup -> train -> save -> cleanup, in the manner of torchtune's recipes."""

    def __init__(
        self, config: TrainConfig, dataset_config: DatasetConfig, manifest_path: Path, project_root: Path,
        tags: dict[str, str], cache_command: str = CACHE_COMMAND,
    ):
        self.config = config
        self.cache_command = cache_command  # how the user rebuilds the caches, for the stale-cache error
        self.dataset_config = dataset_config
        self.project_root = project_root
        self.tags = tags
        manifest = read_manifest(manifest_path)
        self.manifest = manifest
        self.data_version = manifest_version(manifest_path)
        self.samples = training_samples(manifest, dataset_config, config)
        self.output_dir = dataset_config.resolve(config.output_dir)
        self.checkpoint_root = self.output_dir / "checkpoints"
        self.notices: list[str] = []  # see _notice
        self.peak_memory_gib: dict[str, dict[str, float]] = {}  # per phase, filled by run_training
        self.step_ends: list[float] = []  # perf_counter when each step's statistics were read

    # -- setup ---------------------------------------------------------------------------
    def setup(self) -> None:
        """Each step's name says what it must come before; the order below is the one that works."""
        self._check_caches()
        self._setup_accelerator_before_cuda_starts()
        transformer, params = self._setup_transformer_with_lora()
        optimizer = self._setup_optimizer_before_prepare(params)
        state = self._setup_resume_before_prepare(transformer)
        self._setup_prepare(transformer, optimizer)
        self._setup_ema_after_prepare()
        self.start_step, self.loss_history = 0, []
        if state is not None:
            self._restore(state)
        self.validation_reports = []
        self.nonfinite = NonFiniteGuard(
            self.config.max_nonfinite_steps, check_gradients=self.accelerator.scaler is None,
            skipped=list(state.skipped_steps) if state is not None else [],
        )
        self.resumed_mlflow_run_id = state.mlflow_run_id if state is not None else None
        self.tracker = None  # run_training's MlflowRun (rank 0): checkpoints keep its run id

    def _setup_accelerator_before_cuda_starts(self) -> None:
        """The allocator setting only applies before CUDA's first use; the accelerator starts it."""
        if torch.cuda.is_available():
            use_expandable_segments()  # the reserved peak stays near the allocated one
        self.accelerator = make_accelerator(self.config)
        self.sharded = self.accelerator.distributed_type == DistributedType.FSDP
        if self.sharded:
            check_fsdp_config(self.config)  # before any model is loaded
        self.weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.accelerator.mixed_precision, torch.float32)
        self.max_steps = self.config.resolved_max_train_steps(len(self.samples), self.accelerator.num_processes)
        self.sigma_schedule = training_sigma_schedule(self.config)

    def _setup_transformer_with_lora(self) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
        """Load, quantise and freeze the base, then add the LoRA (peft wraps quanto's layers directly)."""
        config, device = self.config, self.accelerator.device
        transformer = load_transformer(config, self.weight_dtype)
        # block swap: these blocks' frozen weights never land on the card together (loading included)
        swapped = swapped_block_indices(len(repeated_blocks(transformer)), config.blocks_to_swap)
        if config.base_model_precision not in ("no_change", "nf4-bnb"):
            quantize_transformer(transformer, config, device, stay_on_cpu=swapped)
        if not self.sharded:  # FSDP moves each shard to its card as it shards: the whole model never lands on one
            move_to_device_except(transformer, device, set(swapped))
        self.adapter = adapter_plan(config, self.dataset_config.resolve)  # LoRA, DoRA, or LyCORIS' LoKr/LoHa through peft
        params = add_adapter(transformer, self.adapter, config.seed)
        apply_speed_settings(transformer, config, device)  # checkpointing (selective), attention kernel, compile
        self.block_swap = BlockSwap(transformer, swapped, device) if swapped else None
        self.offload = OffloadActivations() if config.offload_activations and self._on_gpu else nullcontext()
        return transformer, params

    def _setup_optimizer_before_prepare(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """Optimizer hooks go on the plain torch optimizer, before `prepare` wraps it."""
        config = self.config
        optimizer = make_optimizer(config, params)
        if config.offload_optimizer_state and self._on_gpu:
            offload_optimizer_state(optimizer)
        self.lr_scheduler = get_scheduler(
            config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=self.max_steps
        )
        return optimizer

    def _setup_resume_before_prepare(self, transformer: torch.nn.Module) -> ckpt.TrainingState | None:
        """The checkpoint's LoRA is loaded as full tensors, before `prepare` shards them (FSDP)."""
        self.resumed_from, state = self._checkpoint_to_resume()
        if state is not None:
            load_lora_state_dict(transformer, state.lora, source=f"checkpoint {self.resumed_from}")
        return state

    def _setup_prepare(self, transformer: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        placement = None
        if self.block_swap is not None:
            # the model is placed already; `.to(device)` would pull the swapped weights onto the card, and DDP
            # must not broadcast them (frozen, the same on every rank, and in CPU memory)
            placement = [False, True]
            transformer._ddp_params_and_buffers_to_ignore = [n for n, p in transformer.named_parameters() if not p.requires_grad]
        self.transformer, self.optimizer = self.accelerator.prepare(transformer, optimizer, device_placement=placement)
        # FSDP2 replaces the parameters by sharded DTensors: clip, average and save those
        self.params = [p for p in self.transformer.parameters() if p.requires_grad]

    def _setup_ema_after_prepare(self) -> None:
        """The EMA shadows the prepared (possibly sharded) parameters."""
        config = self.config
        self.ema_device = torch.device("cpu") if config.ema_device == "cpu" else self.accelerator.device
        self.ema = (
            EMAModel([p.detach().to(self.ema_device).clone() for p in self.params], decay=config.ema_decay)
            if config.use_ema
            else None
        )

    @property
    def _on_gpu(self) -> bool:
        return self.accelerator.device.type == "cuda"

    def _checkpoint_to_resume(self) -> tuple[Path | None, ckpt.TrainingState | None]:
        resume = ckpt.resolve_resume(self.checkpoint_root, self.config.resume_from_checkpoint)
        state = ckpt.load_checkpoint(resume) if resume is not None else None
        if state is None:
            return None, None
        if not self._resumable(state):
            # that run's checkpoints go aside, so a kill of this fresh run resumes this run, not that one
            self.accelerator.wait_for_everyone()  # every rank has decided from the same files
            if self.accelerator.is_main_process:
                moved = ckpt.move_aside(self.checkpoint_root, self.output_dir / "previous_checkpoints")
                self._notice(f"its checkpoints were moved to {moved}")
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
        if state.step == self.max_steps and not (self.output_dir / SUMMARY_NAME).is_file():
            # killed after its final checkpoint, before the LoRA export or the summary: finish that run
            self._notice(f"the latest checkpoint (step {state.step}) is the last of a run that did not finish saving: finishing it")
            return True
        if state.step >= self.max_steps:
            self._notice(f"the latest checkpoint (step {state.step}) is of a finished run: training from scratch")
            return False
        if state.data_version and state.data_version != self.data_version:
            self._notice("the latest checkpoint was trained on other data: training from scratch")
            return False
        return True

    def _notice(self, message: str) -> None:
        """Said during setup, before Dagster Pipes is open: printed now, sent to Dagster's event log once it is."""
        print(message, flush=True)
        self.notices.append(message)

    def _check_caches(self) -> None:
        """Every training sample's cache files exist and match this config and these files.

        A cache built before e.g. caption dropout or `random` sampling was switched on lacks their
        embeddings and would train without them. The fingerprints' stat shortcut keeps this cheap.
        """
        if not self.samples:
            raise DataError("the manifest has no training samples")
        train = self.manifest[self.manifest["split"] == "train"]
        stale = [p for kind in ("text", "vae") for p in verify_cache(train, self.dataset_config, self.config, kind)]
        if stale:
            raise DataError(
                f"{len(stale)} cache file(s) are missing or were built from other settings or files, e.g. {stale[0]}; "
                f"rebuild them with `{self.cache_command}` (or materialise the text_embeds and vae_latents assets) "
                "before training"
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
        # Reading a step's loss waits for the device. When nothing before the next step needs it (no EMA, no
        # skipping of non-finite steps, no validation or checkpoint now), it is read once the next step is
        # queued, so the card never idles while the host loads the next sample or logs.
        overlap = self.ema is None and config.max_nonfinite_steps == 0
        pending = None
        for step in range(self.start_step, self.max_steps):
            queued = self.optimizer_step(step)
            self.lr_scheduler.step()
            queued.lr = self.lr_scheduler.get_last_lr()[0]
            if pending is not None:
                self._finish_step(pending, reporter, on_step)
                pending = None
            if overlap and step + 1 < self.max_steps and not self._host_work_after(step + 1):
                pending = queued
            else:
                self._finish_step(queued, reporter, on_step)
        if pending is not None:
            self._finish_step(pending, reporter, on_step)

    def optimizer_step(self, step: int) -> "QueuedStep":
        """One optimizer step, queued on the device without waiting for it (no host sync on the default path):
        `gradient_accumulation_steps` micro-steps (load, condition, forward, backward), clipping, the update."""
        config, accelerator = self.config, self.accelerator
        world, rank = accelerator.num_processes, accelerator.process_index
        accumulation = config.gradient_accumulation_steps
        queued = QueuedStep(step)
        for micro in range(step * accumulation, (step + 1) * accumulation):
            index = micro_step_sample(micro, len(self.samples), config.seed, world, rank)
            generator = micro_step_generator(config.seed, micro, rank)
            sample = load_sample(self.samples[index][1], self.samples[index][0])
            sample = conditioning_for_step(sample, config.caption_dropout_probability, generator)
            sigma = self.sigma_schedule.sample(generator, image_seq_len(config.flavour, sample.target)).to(accelerator.device)
            noise = torch.randn((1, *sample.target.shape), generator=generator).to(accelerator.device)
            # under FSDP every forward pass needs every rank: whether to roll out is drawn alike on all of them
            rollout = micro_step_generator(config.seed, micro, SHARED_RANK) if self.sharded else generator
            x_t = self._scheduled_sampling_input(sample, sigma, noise, rollout)
            masked = self._masked_this_step(sample, generator)
            with accelerator.accumulate(self.transformer):
                with self.offload:
                    loss = flow_matching_loss(self.transformer, sample, sigma, noise, self.weight_dtype, x_t, masked)
                accelerator.backward(loss)
                kill_point("train.mid_step", step + 1)
                if accelerator.sync_gradients:
                    # max_grad_norm 0: clipping at inf scales by exactly 1.0, for the norm the guard reads
                    queued.grad_norm = accelerator.clip_grad_norm_(self.params, config.max_grad_norm or math.inf)
                    queued.skip_update = self.nonfinite.skip_before_update(queued.grad_norm)
                if not queued.skip_update:
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            queued.losses.append(loss.detach())
        return queued

    def _host_work_after(self, step: int) -> bool:
        """Does the host read the model after this step (validation, a checkpoint)?"""
        config = self.config
        return bool(config.validation_step_interval and step % config.validation_step_interval == 0) or (
            step % config.checkpointing_steps == 0
        )

    def _finish_step(self, queued: "QueuedStep", reporter: Reporter, on_step) -> None:
        """Read the step's loss and gradient norm (the step's one host sync), then the guard, EMA, log,
        validation and checkpoint of that step."""
        config, step = self.config, queued.step
        step_loss, norm = self._step_statistics(queued.losses, queued.grad_norm)
        self.step_ends.append(time.perf_counter())  # the step has run on the device: its statistics were read
        if self._nonfinite_step(step + 1, step_loss, norm, queued.skip_update, queued.losses):  # raises NonFiniteError to stop
            reporter.log(f"step {step + 1}: skipped, {self.nonfinite.skipped[-1]['reason']} (samples {self.nonfinite.skipped[-1]['samples']})")
            return
        if self.ema is not None:
            # EMAModel averages only tensors that require grad (it copies the rest): mark the copies
            self.ema.step([p.detach().to(self.ema_device).requires_grad_(True) for p in self.params])
        self.loss_history.append(step_loss)
        if on_step is not None:
            on_step(step + 1, step_loss, queued.lr)
        if config.validation_step_interval and (step + 1) % config.validation_step_interval == 0:
            self.validate(step + 1, reporter)
        if (step + 1) % config.checkpointing_steps == 0 and step + 1 < self.max_steps:
            self.save_checkpoint(step + 1)
            reporter.log(f"step {step + 1}: checkpoint saved")

    def _step_statistics(self, losses: list[torch.Tensor], grad_norm: torch.Tensor | None) -> tuple[float, float | None]:
        """The step loss (mean over micro-steps and ranks) and the gradient norm, in one gather and one sync."""
        loss = torch.stack(losses).mean()
        norm = full_tensor(grad_norm).float().to(loss.device) if grad_norm is not None else torch.zeros((), device=loss.device)
        gathered = self.accelerator.gather(torch.stack([loss, norm])[None])
        step_loss, step_norm = torch.stack([gathered[:, 0].mean(), gathered[:, 1].max()]).tolist()
        return step_loss, (step_norm if grad_norm is not None else None)

    def _nonfinite_step(self, step: int, loss: float, norm: float | None, update_skipped: bool, losses: list[torch.Tensor]) -> bool:
        if math.isfinite(loss) and (norm is None or math.isfinite(norm)):
            return False
        last = ckpt.checkpoint_dirs(self.checkpoint_root)
        return self.nonfinite.check(step, loss, norm, update_skipped, lambda: self._samples_of_step(step, losses), last[-1].name if last else None)

    def _samples_of_step(self, step: int, losses: list[torch.Tensor]) -> list[str]:
        """Names of the step's samples whose loss was not finite, on any rank (all of them if none was).

        A collective (every rank reaches it: the decision came from gathered values); every rank's
        sample index is a pure function of (micro-step, rank), so rank 0 names the others' too.
        """
        config, world = self.config, self.accelerator.num_processes
        per_micro = self.accelerator.gather(torch.stack(losses)[None]).reshape(world, -1).cpu()
        micros = range((step - 1) * config.gradient_accumulation_steps, step * config.gradient_accumulation_steps)
        named = [
            (bool(torch.isfinite(per_micro[rank, j])), self.samples[micro_step_sample(micro, len(self.samples), config.seed, world, rank)][0])
            for rank in range(world) for j, micro in enumerate(micros)
        ]
        bad = [name for finite, name in named if not finite]
        return list(dict.fromkeys(bad or [name for _, name in named]))

    def _masked_this_step(self, sample, generator: torch.Generator) -> bool:
        """masked_loss_probability: the chance that a sample's loss mask weights this step's loss (a draw only
        when it is strictly between 0 and 1, so runs without masks draw exactly what they drew before)."""
        probability = self.config.masked_loss_probability
        if sample.loss_mask is None or probability >= 1:
            return True
        return probability > 0 and float(torch.rand((), generator=generator)) < probability

    def _scheduled_sampling_input(self, sample, sigma, noise, generator) -> torch.Tensor | None:
        config = self.config
        if config.scheduled_sampling_probability <= 0:
            return None
        if float(torch.rand((), generator=generator)) >= config.scheduled_sampling_probability:
            return None
        offset = float(torch.rand((), generator=generator)) * config.scheduled_sampling_max_step_offset / 1000
        return rollout_input(self.transformer, sample, sigma, noise, offset, config.scheduled_sampling_steps, self.weight_dtype)

    def held_out_losses(self) -> tuple[float, float]:
        """(base, LoRA) loss on the fixed σ/noise grid over the first training samples by name.

        Every rank computes it (under FSDP each forward pass is a collective); the grid is the same on all.
        """
        unique = sorted(dict.fromkeys(self.samples), key=lambda sample: sample[0])[:HELD_OUT_SAMPLES]
        samples = [load_sample(paths, name) for name, paths in unique]
        flavour = self.config.flavour
        grid = held_out_grid(samples, self.sigma_schedule, self.config.seed, seq_len_of=lambda s: image_seq_len(flavour, s.target))
        model = self.accelerator.unwrap_model(self.transformer)
        return base_and_lora_loss(self.transformer, model, grid, self.accelerator.device, self.weight_dtype)

    def validate(self, step: int, reporter: Reporter) -> None:
        """Rank 0 edits the validation pairs with the current LoRA; the report goes to validation/step-N."""
        if self.accelerator.is_main_process:
            from trainer.evaluation.validation import run_live_validation

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
                mlflow_run_id=(self.tracker.run_id if self.tracker else None) or self.resumed_mlflow_run_id,
                skipped_steps=self.nonfinite.skipped,
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
            assert_finite(layers, f"the LoRA for {path}")
            comfyui = comfyui_tensors(transformer, layers) if self.adapter.kind != "lora" else None
            save_lora(self.config.flavour.pipeline_cls(), layers, adapter_metadata(transformer), path, comfyui, self.adapter.lycoris)

    def cleanup(self) -> None:
        self.accelerator.end_training()


def run_training(
    config: TrainConfig, dataset_config: DatasetConfig, manifest_path: Path, project_root: Path, tags: dict[str, str],
    cache_command: str = CACHE_COMMAND,
) -> TrainResult | None:
    """Rank 0 holds the output_dir lock for the whole run and first clears what a killed run left."""
    if not run_lock.is_global_rank_zero():
        return _run_training(config, dataset_config, manifest_path, project_root, tags, cache_command, [])
    output_dir = dataset_config.resolve(config.output_dir)
    with run_lock.output_dir_lock(output_dir):
        removed, notices = run_lock.remove_stale_temp_files(output_dir), []
        if removed:
            notices.append(f"removed {len(removed)} leftover(s) of an interrupted save: {', '.join(p.name for p in removed[:5])}")
            print(notices[-1], flush=True)
        return _run_training(config, dataset_config, manifest_path, project_root, tags, cache_command, notices)


def _run_training(
    config: TrainConfig, dataset_config: DatasetConfig, manifest_path: Path, project_root: Path, tags: dict[str, str],
    cache_command: str, notices: list[str],
) -> TrainResult | None:
    recipe = LoraTrainingRecipe(config, dataset_config, manifest_path, project_root, tags, cache_command)
    recipe.setup()
    recipe.peak_memory_gib["setup"] = peak_gib(recipe.accelerator.device)  # loading, quantising, LoRA (since CUDA started)
    reset_peak(recipe.accelerator.device)
    is_main = recipe.accelerator.is_main_process
    started = time.time()
    with open_reporter(is_main) as reporter:
        reporter.replay([*notices, *recipe.notices])  # printed already; now also in Dagster's event log
        tracker = None
        if is_main:
            (recipe.output_dir / SUMMARY_NAME).unlink(missing_ok=True)  # written again when this run has finished
            if config.report_to == "mlflow":
                tracker = MlflowRun(
                    config, project_root, tags, manifest_path, output_dir=recipe.output_dir,
                    resume_run_id=recipe.resumed_mlflow_run_id, resuming=recipe.resumed_from is not None,
                )
        recipe.tracker = tracker
        try:
            return _train_and_save(recipe, reporter, tracker, started)
        except BaseException as exc:
            if tracker:
                status = "KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "FAILED"
                note = tracker.end(status, timeout=10)
                if note:
                    reporter.log(note)
            raise


def _train_and_save(recipe: LoraTrainingRecipe, reporter: Reporter, tracker: MlflowRun | None, started: float) -> TrainResult | None:
    """Train, save the LoRA and the final checkpoint, then (rank 0) the summary, MLflow's artifacts, Dagster's metadata."""
    is_main = recipe.accelerator.is_main_process
    progress = _progress_bar(recipe, is_main)

    def on_step(step: int, loss: float, lr: float) -> None:
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4f}")
        if tracker:
            tracker.log_step(step, loss, lr)
        if step % max(1, recipe.max_steps // 10) == 0 or step == recipe.max_steps:
            reporter.log(f"step {step}/{recipe.max_steps} loss {loss:.5f} lr {lr:.2e}")

    try:
        recipe.train(reporter, on_step)
        recipe.peak_memory_gib["train"] = peak_gib(recipe.accelerator.device)  # the loop (live validations included)
    finally:
        progress.close()  # an error message then starts on a line of its own
    held_out_base, held_out_lora = recipe.held_out_losses()  # every rank: FSDP's forwards are collectives
    lora_path = recipe.save_lora()
    if recipe.start_step < recipe.max_steps:  # else this run finishes from its final checkpoint, which is there
        recipe.save_checkpoint(recipe.max_steps)
    kill_point("train.final_checkpoint_saved")
    recipe.cleanup()
    if not is_main:
        return None
    history = recipe.loss_history
    result = TrainResult(
        steps=len(history),
        final_loss=final_loss(history),
        loss_history=history,
        lora_path=lora_path,
        output_dir=recipe.output_dir,
        seconds=time.time() - started,
    )
    # the loss_decreased check's numbers: the same fixed σ and noise with the adapters off and on
    result.extra.update(held_out_base_loss=held_out_base, held_out_lora_loss=held_out_lora)
    # rank 0's GPU peaks per phase ({} off CUDA) and its steady step time (consecutive steps' ends, the first left out)
    result.extra.update(peak_memory_gib=recipe.peak_memory_gib, seconds_per_step=steady_step_seconds(recipe.step_ends))
    if recipe.nonfinite.skipped:
        result.extra["skipped_steps"] = recipe.nonfinite.skipped
    curve = plot_loss(history, recipe.output_dir / "loss_curve.png")
    if tracker:
        for step, report in recipe.validation_reports:
            tracker.log_validation(step, report)
        note = tracker.finish(result, curve)  # waits for the outbox: the run id is known once it has drained
        result.mlflow_run_id, result.mlflow_run_url = tracker.run_id, tracker.url
        if note:
            reporter.log(note)
    from trainer.io import atomic_write_json

    atomic_write_json(recipe.output_dir / SUMMARY_NAME, result.to_json())
    reporter.materialization(
        {
            FINAL_LOSS: result.final_loss,
            "steps": result.steps,
            "lora_path": str(lora_path),
            "lora_bytes": lora_path.stat().st_size,
            "loss_curve": str(curve),
            "mlflow_run_id": result.mlflow_run_id or "",
            "mlflow_run_url": result.mlflow_run_url or "",
            "held_out_base_loss": held_out_base,
            "held_out_lora_loss": held_out_lora,
            "resumed_from": str(recipe.resumed_from or ""),
            "data_version": recipe.data_version,  # the manifest's: as on pairing_manifest, in MLflow, in checkpoints
            "train_seconds": round(result.seconds, 2),
        }
    )
    reporter.log(
        f"saved LoRA to {lora_path} (final loss, mean of the last 10% of steps, {result.final_loss:.5f}; held-out loss {held_out_lora:.5f}, "
        f"base {held_out_base:.5f})"
    )
    return result


def steady_step_seconds(ends: list[float]) -> float | None:
    """The median time between consecutive steps' ends, the first interval (warm-up) left out when there are more."""
    gaps = sorted([b - a for a, b in zip(ends, ends[1:])][1 if len(ends) > 3 else 0 :])
    return round(gaps[len(gaps) // 2], 4) if gaps else None


def _progress_bar(recipe: LoraTrainingRecipe, is_main: bool):
    import os

    from tqdm.auto import tqdm

    from trainer.tracking.reporting import PIPES_ENV

    # under Dagster the progress lines go to its event log, and a bar in the captured output (or between
    # the Dagster log lines of `make demo`) is only fragments
    quiet = not is_main or bool(os.environ.get(PIPES_ENV))
    return tqdm(total=recipe.max_steps, initial=recipe.start_step, desc="training", unit="step", disable=quiet)
