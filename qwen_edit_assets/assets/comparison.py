"""The latest MLflow runs of the project's experiment side by side: differing params, losses, edits.

With a sweep, the runs compared are the latest of each point (MLflow tag `dagster_partition`), ranked on
the project's promotion rule (promotion_metric, promotion_direction): the best point is the LoRA the
promotion would prefer.
"""

import dagster as dg

from qwen_edit_assets.metadata import image_markdown, rounded
from qwen_edit_assets.scope import PARTITION_TAG, SINGLE, ProjectScope

GROUP = "training"


class ComparisonConfig(dg.Config):
    last_n: int = 5


def run_comparison_asset(scope: ProjectScope = SINGLE) -> dg.AssetsDefinition:
    ranks = " With a sweep: the latest run of each point, ranked on promotion_metric." if scope.points else ""

    @dg.asset(
        key=scope.key("run_comparison"),
        group_name=scope.group(GROUP),
        deps=[scope.key("validation_report")],
        required_resource_keys={scope.resource_key},
        tags=scope.tags,
        kinds={"mlflow", "markdown"},
        description="The last runs of the project's MLflow experiment compared: the params that differ, final and "
        "best training loss, validation metrics, each run's LoRA edit per eval pair, a link to MLflow's compare page."
        + ranks,
    )
    def run_comparison(context: dg.AssetExecutionContext, config: ComparisonConfig) -> dg.MaterializeResult:
        import os

        from trainer.tracking.compare import compare_latest_by_tag, compare_runs, rank_runs, ranking_table, write_comparison_report
        from trainer.tracking.store import tracking_uri

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per downloaded image, in the run's log
        loaded = scope.project(context).load()
        out = loaded.output_dir / "comparison"
        uri = tracking_uri(loaded.root)
        experiment = loaded.config.tracker_project_name
        if scope.points:
            keys = [point.key for point in scope.points]
            comparison = compare_latest_by_tag(uri, experiment, PARTITION_TAG, keys, out_dir=out)
        else:
            comparison = compare_runs(uri, experiment, last_n=config.last_n, out_dir=out)
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
        if scope.points:
            from trainer.tracking.promotion import PromotionRule

            rule = PromotionRule.from_config(loaded.config)
            metric = rule.mlflow_key
            ranked = rank_runs(comparison, metric, rule.higher_is_better)
            metadata["ranking"] = dg.MetadataValue.md(ranking_table(ranked, metric, rule.higher_is_better, PARTITION_TAG))
            metadata["ranked_points"] = dg.MetadataValue.json(
                [{"point": r.run.tags.get(PARTITION_TAG), "rank": r.rank, metric: r.value if r.value is None else rounded(r.value),
                  "mlflow_run_id": r.run.run_id} for r in ranked]
            )
            if ranked and ranked[0].rank:
                metadata["best_point"] = dg.MetadataValue.text(ranked[0].run.tags.get(PARTITION_TAG, ""))
            metadata["points_without_a_run"] = dg.MetadataValue.json(sorted(set(keys) - {r.run.tags.get(PARTITION_TAG) for r in ranked}))
        if (out / "grid.png").is_file() and comparison.images:
            metadata["grid"] = image_markdown(out / "grid.png", "LoRA edit per eval pair (rows), one column per run, target last")
        return dg.MaterializeResult(metadata=metadata)

    return run_comparison


run_comparison = run_comparison_asset(SINGLE)  # the single project's
