"""Promotion: the validated LoRA becomes a version of the project's MLflow registered model and takes the
alias `champion` when it beats the champion on the promotion rule, else `challenger`
(trainer.tracking.registry; the rule's keys: registered_model_name, promotion_metric,
promotion_direction, promotion_margin)."""

import dagster as dg

from qwen_edit_assets.launchpad import load_for_run

GROUP = "training"
# one promotion at a time (the instance's pools take one step each): two runs never move the aliases together
POOL = "model_registry"


def promotion_asset(scope=None) -> dg.AssetsDefinition:
    """The promotion asset of one project (`scope`: a qwen_edit_assets.scope.ProjectScope; default the single
    project's, unprefixed names). With a sweep, one partition per point, each promoting its point's LoRA."""
    if scope is None:
        from qwen_edit_assets.scope import SINGLE

        scope = SINGLE
    validation_key = scope.key("validation_report")

    @dg.asset(
        key=scope.key("promotion"),
        group_name=scope.group(GROUP),
        pool=POOL,
        partitions_def=scope.partitions_def,
        backfill_policy=scope.backfill_policy,
        deps=[validation_key],
        required_resource_keys={scope.resource_key},
        tags=scope.tags,
        kinds={"mlflow"},
        description="The validated LoRA registered as a version of the project's MLflow registered model (LoRA "
        "files, adapter metadata, validation report; tagged with flavour, base model, data version, Dagster run, "
        "git revision), then compared with the version holding `champion` on promotion_metric and "
        "promotion_margin: better takes `champion`, otherwise it gets `challenger`.",
    )
    def promotion(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        from qwen_edit_assets.assets.validation import trained_run_name
        from trainer.errors import QwenEditError
        from trainer.tracking.registry import promote_run
        from trainer.tracking.store import tracking_uri

        point = scope.point_overrides(context)
        loaded = load_for_run(context, scope.project(context), op_name=scope.op_name("trained_lora"), point=point)
        # the run folder validation_report validated (its run_name metadata), of this run or else its latest
        run = loaded.for_run(trained_run_name(context, validation_key))
        if run.config.report_to != "mlflow":
            context.log.info("report_to is none: no MLflow run, nothing to register or promote")
            return dg.MaterializeResult(metadata={"decision": "not registered (report_to: none)", "run_name": run.run_name})
        try:
            promotion = promote_run(run.output_dir, run.config, tracking_uri(run.root))
        except QwenEditError as exc:
            raise dg.Failure(str(exc)) from None
        context.log.info(promotion.message())
        return dg.MaterializeResult(metadata=promotion_metadata(promotion, run.run_name))

    return promotion


def promotion_metadata(promotion, run_name: str) -> dict:
    """The decision, both versions' numbers and their MLflow pages, as the asset's page shows them."""
    rule, new, previous = promotion.rule, promotion.new, promotion.previous_champion
    metadata = {
        "decision": dg.MetadataValue.text(promotion.decision.alias),
        "reason": dg.MetadataValue.text(promotion.decision.reason),
        "rule": dg.MetadataValue.text(rule.describe()),
        "registered_model": dg.MetadataValue.text(promotion.model_name),
        "registered_model_url": dg.MetadataValue.url(promotion.model_url),
        "run_name": dg.MetadataValue.text(run_name),
        "version": dg.MetadataValue.int(int(new.version)),
        "version_url": dg.MetadataValue.url(new.url),
        "newly_registered": dg.MetadataValue.bool(promotion.registered),
        "champion_version": dg.MetadataValue.int(int(promotion.champion.version)) if promotion.champion else dg.MetadataValue.text("none"),
        "comparison": dg.MetadataValue.md(comparison_markdown(promotion)),
    }
    if new.value(rule) is not None:
        metadata[f"new_{rule.metric}"] = dg.MetadataValue.float(new.value(rule))
    if new.run_url:
        metadata["mlflow_run_url"] = dg.MetadataValue.url(new.run_url)
    if previous is not None:
        metadata["previous_champion_version"] = dg.MetadataValue.int(int(previous.version))
        metadata["previous_champion_url"] = dg.MetadataValue.url(previous.url)
        if previous.value(rule) is not None:
            metadata[f"previous_champion_{rule.metric}"] = dg.MetadataValue.float(previous.value(rule))
    return metadata


def comparison_markdown(promotion) -> str:
    """The LoRA's validation means of the new version beside the champion's it was compared with."""
    columns = [(f"new: version {promotion.new.version}", promotion.new)]
    if promotion.previous_champion is not None:
        columns.append((f"champion: version {promotion.previous_champion.version}", promotion.previous_champion))
    keys = sorted({k for _, view in columns for k in view.metrics if k.startswith("validation_lora_")})
    lines = ["| metric | " + " | ".join(title for title, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for key in keys:
        name = key.removeprefix("validation_")
        mark = " (decides)" if name == promotion.rule.metric else ""
        cells = " | ".join(f"{view.metrics[key]:.6g}" if key in view.metrics else "" for _, view in columns)
        lines.append(f"| {name}{mark} | {cells} |")
    return "\n".join(lines)
