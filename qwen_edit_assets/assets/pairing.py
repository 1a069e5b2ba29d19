"""The validated pairing manifest: the gate nothing passes until the data is proven sound.

Bad data is a failed blocking check, not a crash: `pairs_complete` carries the table of every
problem (one row per file) and, being blocking, keeps every downstream asset of the run from
running; the manifest is then not materialised, so no later run reads a bad one.
"""

import dagster as dg
import pandas as pd

from qwen_edit_assets.launchpad import load_for_run
from qwen_edit_assets.scope import SINGLE, ProjectScope

GROUP = "data"
PAIRS_COMPLETE = "pairs_complete"
NO_ORPHANS = "no_orphan_references"
TABLE_ROWS = 20  # rows of the manifest shown in its metadata; dagster/row_count has them all

# what each manifest column holds (trainer.data.pairing.PairingManifestModel), for the UI's column schema
COLUMNS = {
    "split": ("string", "train, or eval for the eval_dataset_id dataset (validation only)"),
    "dataset_id": ("string", "the image dataset's id in the dataset config"),
    "name": ("string", "file name without extension: the key that pairs a target with its references"),
    "target_path": ("string", "the edited (target) image"),
    "caption": ("string", "the edit instruction"),
    "n_references": ("int", "number of reference images (edit-v1: 1; edit-v2/v3: 1-3)"),
    "target_width": ("int", "target width in pixels, after EXIF orientation"),
    "target_height": ("int", "target height in pixels, after EXIF orientation"),
    "reference_1": ("string", "first reference image (same name, first conditioning dataset)"),
    "reference_2": ("string", "second reference image, if any"),
    "reference_3": ("string", "third reference image, if any"),
}


def manifest_schema() -> dg.TableSchema:
    return dg.TableSchema(columns=[dg.TableColumn(name, kind, description) for name, (kind, description) in COLUMNS.items()])


def pairing_manifest_asset(raw_keys: list[dg.AssetKey], scope: ProjectScope = SINGLE) -> dg.AssetsDefinition:
    key = scope.key("pairing_manifest")

    @dg.asset(
        key=key,
        group_name=scope.group(GROUP),
        required_resource_keys={scope.resource_key},
        tags=scope.tags,
        deps=raw_keys,
        kinds={"pandas", "pandera"},
        description="One row per training sample: target, caption and same-named references, validated "
        "with pandera. Problems fail the blocking check pairs_complete (every offending file listed) and "
        "nothing downstream runs.",
        output_required=False,  # bad data: the checks are reported, the manifest is not materialised
        metadata={"dagster/column_schema": manifest_schema()},
        check_specs=[
            dg.AssetCheckSpec(
                PAIRS_COMPLETE, asset=key, blocking=True,
                description="Every target has a same-named file in each conditioning dataset, a caption and "
                "readable images. Blocking: on a failure its metadata lists every problem and nothing downstream runs.",
            ),
            dg.AssetCheckSpec(
                NO_ORPHANS, asset=key, blocking=False,
                description="Every reference image has a target of the same name (a reference without one is "
                "never trained on: usually a misnamed or deleted target). A warning, not a stop.",
            ),
        ],
    )
    def pairing_manifest(context: dg.AssetExecutionContext):
        from trainer.data.pairing import PairingError
        from trainer.data.versions import manifest_version
        from trainer.errors import QwenEditError
        from trainer.workflow import check_data

        loaded = load_for_run(context, scope.project(context), op_name=scope.op_name("trained_lora"))
        for note in loaded.notes:
            context.log.info(note)
        try:
            manifest, report = check_data(loaded)
        except PairingError as exc:
            context.log.error(f"{len(exc.report.errors)} problem(s) in the data; see the {PAIRS_COMPLETE} check")
            yield _pairs_complete(exc.report)
            yield _no_orphans(exc.report)
            return
        except QwenEditError as exc:  # e.g. a folder that cannot be read: the one message, no traceback
            raise dg.Failure(description=str(exc)) from None
        counts = manifest["split"].value_counts().to_dict()
        yield dg.Output(
            manifest,
            metadata={
                "dagster/row_count": len(manifest),
                "manifest": dg.MetadataValue.table(_records(manifest.head(TABLE_ROWS)), schema=manifest_schema()),
                "train_pairs": int(counts.get("train", 0)),
                "eval_pairs": int(counts.get("eval", 0)),
                "warnings": len(report.warnings),
                "config_notes": dg.MetadataValue.md("\n".join(f"- {n}" for n in loaded.notes) or "none"),
                "manifest_path": dg.MetadataValue.path(str(loaded.manifest_path)),
            },
            # the file's version: the same id the MLflow run's manifest_version tag and checkpoints carry
            data_version=dg.DataVersion(manifest_version(loaded.manifest_path)),
        )
        yield _pairs_complete(report)
        yield _no_orphans(report)

    return pairing_manifest


def problems_table(lines: list[str], severity: str) -> list[dg.TableRecord]:
    """`path: what is wrong` lines as rows: severity | file | problem."""
    rows = []
    for line in lines:
        path, sep, problem = line.partition(": ")
        if not sep or "/" not in path:  # a message about the whole dataset, not one file
            path, problem = "", line
        rows.append(dg.TableRecord({"severity": severity, "file": path, "problem": problem}))
    return rows


PROBLEMS_SCHEMA = dg.TableSchema(
    columns=[
        dg.TableColumn("severity", "string", "error: blocks training; warning: shown only"),
        dg.TableColumn("file", "string", "the file (or folder) concerned"),
        dg.TableColumn("problem", "string", "what is wrong and how to fix it"),
    ]
)


def _pairs_complete(report) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name=PAIRS_COMPLETE,
        passed=not report.errors,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "problems": dg.MetadataValue.table(problems_table(report.errors, "error"), schema=PROBLEMS_SCHEMA),
            "errors": len(report.errors),
        },
    )


def _no_orphans(report) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name=NO_ORPHANS,
        passed=not report.warnings,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "warnings": dg.MetadataValue.table(problems_table(report.warnings, "warning"), schema=PROBLEMS_SCHEMA),
            "count": len(report.warnings),
        },
    )


def _records(frame: pd.DataFrame) -> list[dg.TableRecord]:
    """Table rows (None for empty cells: Dagster's table records take str, int, float, bool or None)."""
    def cell(value):
        if value is None or (isinstance(value, float) and pd.isna(value)):
            return None
        return value.item() if hasattr(value, "item") else value

    return [dg.TableRecord({column: cell(value) for column, value in row.items()}) for row in frame.to_dict("records")]
