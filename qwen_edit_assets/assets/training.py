"""The trained LoRA: `accelerate launch` of the trainer under Dagster Pipes (rank 0 reports)."""

import json

import dagster as dg

from qwen_edit_assets.metadata import image_markdown
from qwen_edit_assets.resources import QwenEditProject

GROUP = "training"


class TrainingOverrides(dg.Config):
    """Launchpad overrides of the training config; unset fields keep the config's values."""

    max_train_steps: int | None = None
    learning_rate: float | None = None
    lora_rank: int | None = None
    lora_alpha: float | None = None
    base_model_precision: str | None = None
    seed: int | None = None

    def as_overrides(self) -> dict:
        return {k: v for k, v in self.model_dump().items() if v is not None}


@dg.asset(
    group_name=GROUP,
    pool="gpu",
    deps=["text_embeds", "vae_latents", "pairing_manifest"],
    kinds={"pytorch", "accelerate", "mlflow"},
    description="A LoRA trained by `accelerate launch -m trainer.train` (a subprocess under Dagster Pipes), "
    "saved in diffusers format with its adapter metadata; the run is logged to MLflow.",
    check_specs=[
        dg.AssetCheckSpec(
            "loss_decreased", asset="trained_lora", blocking=False,
            description="The LoRA's held-out loss is below the base model's on the same fixed σ and noise",
        )
    ],
)
def trained_lora(
    context: dg.AssetExecutionContext,
    config: TrainingOverrides,
    project: QwenEditProject,
    pipes_subprocess_client: dg.PipesSubprocessClient,
):
    from trainer.training.recipe import SUMMARY_NAME
    from trainer.workflow import training_command, training_env

    overrides = config.as_overrides()
    loaded = project.load(overrides)
    tags = {"dagster_run_id": context.run_id, "flavour": loaded.config.model_flavour}
    command = training_command(loaded, overrides, tags)
    context.log.info("launching: " + " ".join(command))
    invocation = pipes_subprocess_client.run(command=command, context=context, env=training_env(loaded), cwd=str(loaded.root))
    result = invocation.get_materialize_result()
    summary = json.loads((loaded.output_dir / SUMMARY_NAME).read_text())
    metadata = dict(result.metadata or {})
    metadata["loss_curve_image"] = image_markdown(loaded.output_dir / "loss_curve.png", "training loss")
    if summary.get("mlflow_run_url"):
        metadata["mlflow_run_url"] = dg.MetadataValue.url(summary["mlflow_run_url"])
    yield dg.MaterializeResult(metadata=metadata)
    yield loss_decreased(summary)


def loss_decreased(summary: dict) -> dg.AssetCheckResult:
    """The LoRA's held-out loss below the base's, both on the same fixed σ and noise over training samples
    (trainer.training.held_out): the first and last training losses differ by their σ draws alone."""
    base, lora = summary["held_out_base_loss"], summary["held_out_lora_loss"]
    return dg.AssetCheckResult(
        check_name="loss_decreased",
        passed=bool(lora < base),
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"held_out_base_loss": base, "held_out_lora_loss": lora, "held_out_ratio": lora / base},
    )
