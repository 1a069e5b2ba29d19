"""The validated pairing manifest: the gate nothing passes until the data is proven sound."""

import dagster as dg
import pandas as pd

from qwen_edit_assets.resources import QwenEditProject

GROUP = "data"


def pairing_manifest_asset(raw_keys: list[dg.AssetKey]) -> dg.AssetsDefinition:
    @dg.asset(
        name="pairing_manifest",
        group_name=GROUP,
        deps=raw_keys,
        kinds={"pandas", "pandera"},
        description="One row per training sample: target, caption and same-named references, validated "
        "with pandera. A failure lists every offending file and stops the graph before any encoding.",
        check_specs=[dg.AssetCheckSpec("no_orphan_references", asset="pairing_manifest", blocking=False)],
    )
    def pairing_manifest(context: dg.AssetExecutionContext, project: QwenEditProject):
        from trainer.data.pairing import PairingError
        from trainer.data.versions import manifest_version
        from trainer.workflow import check_data

        loaded = project.load()
        try:
            manifest, report = check_data(loaded)
        except PairingError as exc:
            raise dg.Failure(
                description=str(exc),
                metadata={"problems": dg.MetadataValue.md(exc.report.to_markdown()), "errors": len(exc.report.errors)},
            ) from None
        for note in loaded.notes:
            context.log.info(note)
        counts = manifest["split"].value_counts().to_dict()
        yield dg.Output(
            manifest,
            metadata={
                "train_pairs": int(counts.get("train", 0)),
                "eval_pairs": int(counts.get("eval", 0)),
                "warnings": len(report.warnings),
                "config_notes": dg.MetadataValue.md("\n".join(f"- {n}" for n in loaded.notes) or "none"),
                "manifest_path": dg.MetadataValue.path(str(loaded.manifest_path)),
                "preview": dg.MetadataValue.md(_preview(manifest)),
            },
            # the file's version: the same id the MLflow run's manifest_version tag and checkpoints carry
            data_version=dg.DataVersion(manifest_version(loaded.manifest_path)),
        )
        yield dg.AssetCheckResult(
            check_name="no_orphan_references",
            passed=not report.warnings,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"warnings": dg.MetadataValue.md(report.to_markdown() if report.warnings else "none")},
        )

    return pairing_manifest


def _preview(manifest: pd.DataFrame, rows: int = 8) -> str:
    columns = ["split", "dataset_id", "name", "caption", "n_references"]
    return manifest[columns].head(rows).to_markdown(index=False) if len(manifest) else "(empty)"
