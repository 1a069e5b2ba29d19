"""The validation report: edits of every eval pair without and with the LoRA, scored against targets."""

import json

import dagster as dg
import pandas as pd

from qwen_edit_assets.launchpad import load_for_run
from qwen_edit_assets.metadata import image_markdown, rounded, validation_grid_markdown, validation_table
from qwen_edit_assets.scope import SINGLE, ProjectScope

GROUP = "training"
TRAINED_LORA = dg.AssetKey("trained_lora")


def validation_report_asset(scope: ProjectScope = SINGLE) -> dg.AssetsDefinition:
    """One project's validation report; with a sweep, one partition per point, each validating its point's LoRA."""
    trained_lora = scope.key("trained_lora")

    @dg.asset(
        key=scope.key("validation_report"),
        group_name=scope.group(GROUP),
        pool=scope.pool,
        partitions_def=scope.partitions_def,
        backfill_policy=scope.backfill_policy,
        deps=[trained_lora],
        ins={"pairing_manifest": dg.AssetIn(key=scope.key("pairing_manifest"))},
        required_resource_keys={scope.resource_key},
        tags=scope.tags,
        kinds={"pytorch", "html", "mlflow"},
        description="Generated edits for the eval split (true CFG at validation_guidance), reference | base | "
        "LoRA | target per row, scored base vs LoRA (PSNR, SSIM, edit success, preservation, pixel shift, "
        "latent distance); a self-contained HTML report in the LoRA's run folder, also logged to MLflow.",
    )
    def validation_report(context: dg.AssetExecutionContext, pairing_manifest: pd.DataFrame) -> dg.MaterializeResult:
        point = scope.point_overrides(context)
        loaded = load_for_run(context, scope.project(context), op_name=scope.op_name("trained_lora"), point=point)
        return report_materialization(loaded.for_run(trained_run_name(context, trained_lora)), pairing_manifest, point)

    return validation_report


def report_materialization(run, pairing_manifest: pd.DataFrame, point: dict) -> dg.MaterializeResult:
    """Validate the run's LoRA, log the report to its MLflow run, describe it for the UI."""
    from trainer.evaluation.validation import log_to_mlflow, run_validation
    from trainer.tracking.store import tracking_uri
    from trainer.training.recipe import SUMMARY_NAME

    summary = json.loads((run.output_dir / SUMMARY_NAME).read_text())
    report = run_validation(run.config, pairing_manifest, run.lora_dir, run.validation_dir)
    if summary.get("mlflow_run_id"):
        # at the last training step: MLflow draws the final metrics and images after the live validations'
        log_to_mlflow(report, summary["mlflow_run_id"], tracking_uri(run.root), step=summary["steps"])
    metadata = {
        "report": dg.MetadataValue.path(str(report.html_path)),
        "run_name": dg.MetadataValue.text(run.run_name),
        "pairs": sum(1 for row in report.rows if row.target),  # the validation_prompt row has no target
        "source_split": report.source_split,
        "pairs_table": validation_table(report.rows),  # inline: each pair with its instruction and numbers
        "edits": dg.MetadataValue.md(validation_grid_markdown(report.rows)),  # the images with headers ([Show Markdown])
        "grid": image_markdown(report.grid_path, "reference(s) | base | LoRA | target"),
        "pair_metrics": dg.MetadataValue.md(pair_metrics_markdown(report.rows)),
        **{key: dg.MetadataValue.float(rounded(value)) for key, value in report.summary.items()},
    }
    if point:
        metadata["sweep_point"] = dg.MetadataValue.json(point)
    if summary.get("mlflow_run_url"):
        metadata["mlflow_run_url"] = dg.MetadataValue.url(summary["mlflow_run_url"])
    return dg.MaterializeResult(metadata=metadata)


def trained_run_name(context: dg.AssetExecutionContext, trained_lora: dg.AssetKey = TRAINED_LORA) -> str:
    """The run folder of the LoRA to validate: trained_lora's of this Dagster run, else (a re-execution that
    did not train again, or validation_report alone) its latest materialisation's, of the same partition
    (sweep point) when partitioned."""
    partition = context.partition_key if context.has_partition_key else None
    records = context.instance.get_records_for_run(context.run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records
    for record in reversed(records):
        materialization = record.event_log_entry.asset_materialization
        if (
            materialization is not None and materialization.asset_key == trained_lora
            and materialization.partition == partition and "run_name" in materialization.metadata
        ):
            return materialization.metadata["run_name"].value
    found = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=trained_lora, asset_partitions=[partition] if partition else None), limit=1
    ).records
    materialization = found[0].asset_materialization if found else None
    if materialization is None or "run_name" not in materialization.metadata:
        which = f"{trained_lora.to_user_string()}" + (f" (partition {partition})" if partition else "")
        raise dg.Failure(f"{which} has no materialisation with a run folder yet: materialise it first")
    return materialization.metadata["run_name"].value


def pair_metrics_markdown(rows) -> str:
    """One line per scored pair, one column per `{stage}_{metric}`: the per-pair numbers behind the means."""
    scored = [row for row in rows if row.metrics]
    keys = list(dict.fromkeys(key for row in scored for key in row.metrics))
    lines = ["| pair | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for row in scored:
        cells = " | ".join(f"{row.metrics[key]:.3f}" if key in row.metrics else "" for key in keys)
        lines.append(f"| {row.name} | {cells} |")
    return "\n".join(lines)


validation_report = validation_report_asset(SINGLE)  # the single project's
