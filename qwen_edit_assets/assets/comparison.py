"""The latest MLflow runs of the project's experiment side by side: differing params, losses, edits."""

import dagster as dg

from qwen_edit_assets.metadata import image_markdown
from qwen_edit_assets.resources import QwenEditProject

GROUP = "training"


class ComparisonConfig(dg.Config):
    last_n: int = 5


@dg.asset(
    group_name=GROUP,
    deps=["validation_report"],
    kinds={"mlflow", "markdown"},
    description="The last runs of the project's MLflow experiment compared: the params that differ, final and "
    "best training loss, validation metrics, each run's LoRA edit per eval pair, a link to MLflow's compare page.",
)
def run_comparison(context: dg.AssetExecutionContext, config: ComparisonConfig, project: QwenEditProject) -> dg.MaterializeResult:
    from trainer.tracking.compare import compare_runs, write_comparison_report
    from trainer.tracking.store import tracking_uri

    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per downloaded image, in the run's log
    loaded = project.load()
    out = loaded.output_dir / "comparison"
    uri = tracking_uri(loaded.root)
    comparison = compare_runs(uri, loaded.config.tracker_project_name, last_n=config.last_n, out_dir=out)
    report = write_comparison_report(comparison, out)
    context.log.info(f"compared {len(comparison.runs)} run(s); report {report}")
    metadata = {
        "runs": len(comparison.runs),
        "run_ids": dg.MetadataValue.json([run.run_id for run in comparison.runs]),
        "differing_params": dg.MetadataValue.json(sorted(comparison.differing_params)),
        "comparison": dg.MetadataValue.md(comparison.runs_table() + "\n\n" + comparison.table()),
        "mlflow_compare_url": dg.MetadataValue.url(comparison.compare_url),
        "report": dg.MetadataValue.path(str(report)),
    }
    if (out / "grid.png").is_file() and comparison.images:
        metadata["grid"] = image_markdown(out / "grid.png", "LoRA edit per eval pair (rows), one column per run, target last")
    return dg.MaterializeResult(metadata=metadata)
