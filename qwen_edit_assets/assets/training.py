"""The trained LoRA: `accelerate launch` of the trainer under Dagster Pipes (rank 0 reports)."""

import json

import dagster as dg

from qwen_edit_assets.launchpad import load_for_run, override_tags, training_overrides_class
from qwen_edit_assets.metadata import image_markdown, readable
from qwen_edit_assets.resources import QwenEditProject
from qwen_edit_assets.scope import PARTITION_TAG, SINGLE, ProjectScope

GROUP = "training"


def trained_lora_asset(project: QwenEditProject, scope: ProjectScope = SINGLE) -> dg.AssetsDefinition:
    """The asset, with the Launchpad fields of this project's config (qwen_edit_assets.launchpad); with a
    sweep, one partition per point (qwen_edit_assets.scope)."""
    overrides_class = training_overrides_class(project.load().config)
    key = scope.key("trained_lora")
    sweep = f" One partition per point of the config's sweep ({len(scope.points)} points)." if scope.points else ""

    @dg.asset(
        key=key,
        group_name=scope.group(GROUP),
        pool=scope.pool,
        partitions_def=scope.partitions_def,
        backfill_policy=scope.backfill_policy,
        deps=[scope.key("text_embeds"), scope.key("vae_latents"), scope.key("pairing_manifest")],
        required_resource_keys={scope.resource_key, "pipes_subprocess_client"},
        tags=scope.tags,
        kinds={"pytorch", "accelerate", "mlflow"},
        description="A LoRA trained by `accelerate launch -m trainer.train` (a subprocess under Dagster Pipes), "
        "saved in diffusers format with its adapter metadata in its own run folder under output_dir "
        "(output_dir/latest points at the newest); the run is logged to MLflow." + sweep,
        check_specs=[
            dg.AssetCheckSpec(
                "loss_decreased", asset=key, blocking=False,
                description="The LoRA's held-out loss is below the base model's on the same fixed σ and noise",
            )
        ],
    )
    def trained_lora(context: dg.AssetExecutionContext, config: overrides_class):
        point = scope.point_overrides(context)
        launchpad = config.as_overrides()
        if clash := sorted(set(point) & set(launchpad)):
            raise dg.Failure(
                f"{', '.join(clash)}: set by this partition's sweep point ({context.partition_key}) and in the Launchpad; "
                "a point trains its own values: change the config's `sweep` instead, or remove them from the Launchpad"
            )
        overrides = {**point, **launchpad}

        from trainer.run_folders import default_run_name
        from trainer.training.recipe import SUMMARY_NAME
        from trainer.workflow import keep_manifest, new_run, training_command, training_env

        pipes_subprocess_client: dg.PipesSubprocessClient = context.resources.pipes_subprocess_client
        loaded = load_for_run(context, scope.project(context), overrides)
        dagster_run = context.run.run_id
        # a re-execution (from failure) continues in its original run's folder: `resume_from_checkpoint: latest`
        # then finds that run's checkpoints
        root_run = context.run.tags.get("dagster/root_run_id") or dagster_run
        run = new_run(loaded, loaded.config.tracker_run_name or default_run_name(loaded.config.model_flavour, overrides, root_run))
        keep_manifest(run, loaded.manifest_path)
        context.instance.add_run_tags(dagster_run, {**override_tags(loaded.config.model_flavour, overrides), **scope.tags})
        tags = {
            "dagster_run_id": dagster_run,
            "dagster_run_url": dagster_run_url(dagster_run),
            "flavour": loaded.config.model_flavour,
            **({"overrides": ", ".join(f"{k}={v}" for k, v in overrides.items())} if overrides else {}),
            **({PARTITION_TAG: context.partition_key} if scope.points else {}),
            **({"dagster_project": scope.name} if scope.name else {}),
        }
        command = training_command(run, overrides, tags)
        context.log.info(f"run {run.run_name} in {run.output_dir}; launching: " + " ".join(command))
        invocation = pipes_subprocess_client.run(command=command, context=context, env=training_env(run), cwd=str(run.root))
        result = invocation.get_materialize_result()
        summary = json.loads((run.output_dir / SUMMARY_NAME).read_text())
        metadata = readable(dict(result.metadata or {}))
        metadata["run_name"] = dg.MetadataValue.text(run.run_name)
        metadata["run_dir"] = dg.MetadataValue.path(str(run.output_dir))
        if point:
            metadata["sweep_point"] = dg.MetadataValue.json(point)
        metadata["loss_curve_image"] = image_markdown(run.output_dir / "loss_curve.png", "training loss")
        if summary.get("mlflow_run_url"):
            metadata["mlflow_run_url"] = dg.MetadataValue.url(summary["mlflow_run_url"])
        yield dg.MaterializeResult(metadata=metadata)
        yield loss_decreased(summary)

    return trained_lora


def dagster_run_url(run_id: str) -> str:
    """The run's page in the Dagster UI: DAGSTER_UI_URL, else `make ui`'s address (DAGSTER_HOST, DAGSTER_PORT)."""
    import os

    base = os.environ.get("DAGSTER_UI_URL")
    if not base:
        host = os.environ.get("DAGSTER_HOST") or "127.0.0.1"
        base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{os.environ.get('DAGSTER_PORT') or '3000'}"
    return f"{base.rstrip('/')}/runs/{run_id}"


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
