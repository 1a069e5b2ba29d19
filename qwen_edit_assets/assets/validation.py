"""The validation report: edits of every eval pair without and with the LoRA, scored against targets."""

import json

import dagster as dg
import pandas as pd

from qwen_edit_assets.metadata import image_markdown
from qwen_edit_assets.resources import QwenEditProject

GROUP = "training"


@dg.asset(
    group_name=GROUP,
    pool="gpu",
    deps=["trained_lora"],
    kinds={"pytorch", "html", "mlflow"},
    description="Generated edits for the eval split (true CFG at validation_guidance), reference | base | "
    "LoRA | target per row, scored base vs LoRA (PSNR, SSIM, edit success, preservation, pixel shift, "
    "latent distance); an HTML report, also logged to MLflow.",
)
def validation_report(context: dg.AssetExecutionContext, project: QwenEditProject, pairing_manifest: pd.DataFrame) -> dg.MaterializeResult:
    from trainer.evaluation.validation import log_to_mlflow, run_validation
    from trainer.tracking.store import tracking_uri
    from trainer.training.recipe import SUMMARY_NAME

    loaded = project.load()
    summary = json.loads((loaded.output_dir / SUMMARY_NAME).read_text())
    report = run_validation(loaded.config, pairing_manifest, loaded.lora_dir, loaded.validation_dir)
    if summary.get("mlflow_run_id"):
        log_to_mlflow(report, summary["mlflow_run_id"], tracking_uri(loaded.root))
    metadata = {
        "report": dg.MetadataValue.path(str(report.html_path)),
        "pairs": sum(1 for row in report.rows if row.target),  # the validation_prompt row has no target
        "source_split": report.source_split,
        "grid": image_markdown(report.grid_path, "reference(s) | base | LoRA | target"),
        "pair_metrics": dg.MetadataValue.md(pair_metrics_markdown(report.rows)),
        **{key: dg.MetadataValue.float(value) for key, value in report.summary.items()},
    }
    if summary.get("mlflow_run_url"):
        metadata["mlflow_run_url"] = dg.MetadataValue.url(summary["mlflow_run_url"])
    return dg.MaterializeResult(metadata=metadata)


def pair_metrics_markdown(rows) -> str:
    """One line per scored pair, one column per `{stage}_{metric}`: the per-pair numbers behind the means."""
    scored = [row for row in rows if row.metrics]
    keys = list(dict.fromkeys(key for row in scored for key in row.metrics))
    lines = ["| pair | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for row in scored:
        cells = " | ".join(f"{row.metrics[key]:.3f}" if key in row.metrics else "" for key in keys)
        lines.append(f"| {row.name} | {cells} |")
    return "\n".join(lines)
