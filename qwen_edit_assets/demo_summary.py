"""Printed at the end of `make demo`: where the LoRA and the report are, what validation measured
(base vs LoRA), how the asset checks came out, and how to look at it all."""

import json
import os


def check_outcomes() -> list[str]:
    """One line per asset check of the code location: its latest result on the instance in DAGSTER_HOME."""
    import dagster as dg

    from qwen_edit_assets.definitions import defs

    lines = []
    with dg.DagsterInstance.get() as instance:
        for key in sorted(defs.resolve_asset_graph().asset_check_keys, key=lambda k: (k.asset_key.to_user_string(), k.name)):
            record = instance.get_latest_asset_check_evaluation_record(key)
            evaluation = record.event.dagster_event.event_specific_data if record and record.event and record.event.dagster_event else None
            if evaluation is not None and hasattr(evaluation, "passed"):
                outcome = "passed" if evaluation.passed else f"FAILED ({evaluation.severity.value.lower()})"
            else:
                outcome = record.status.value.lower().replace("_", " ") if record else "not run"
            lines.append(f"{key.name:<28} on {key.asset_key.to_user_string():<18} {outcome}")
    return lines


def main() -> None:
    from qwen_edit_assets.resources import project_from_env
    from trainer.evaluation.means import means_table
    from trainer.run_folders import LATEST, latest_run_dir
    from trainer.tracking.loss_summary import FINAL_LOSS
    from trainer.tracking.store import mlflow_ui_url, tracking_uri
    from trainer.training.recipe import SUMMARY_NAME

    project = project_from_env().load()
    run_dir = latest_run_dir(project.output_dir)
    if run_dir is None:
        raise SystemExit(f"no trained run under {project.output_dir} ({LATEST} is missing): did the demo's training fail?")
    summary = json.loads((run_dir / SUMMARY_NAME).read_text())
    report = run_dir / "validation" / "report.json"
    means = json.loads(report.read_text())["summary"] if report.is_file() else {}
    home = os.environ.get("DAGSTER_HOME", "dagster_home")
    dagster_url = f"http://{os.environ.get('DAGSTER_HOST') or '127.0.0.1'}:{os.environ.get('DAGSTER_PORT') or '3000'}"
    lines = [
        "",
        "qwen-edit demo: every asset materialised",
        f"  run folder:              {run_dir}  ({project.output_dir / LATEST} points here)",
        f"  LoRA (diffusers format): {summary['lora_path']}",
        f"  validation report:       {run_dir / 'validation' / 'report.html'}",
        f"  {FINAL_LOSS}: {summary[FINAL_LOSS]:.4f} over {summary['steps']} steps",
        f"  MLflow run:              {summary.get('mlflow_run_url') or '-'}",
        "",
        "Validation means over the eval pairs (base model vs with the LoRA):",
        *(f"  {line}" for line in means_table(means)),
        "",
        "Asset checks:",
        *(f"  {line}" for line in check_outcomes()),
        "",
        "Look at it:",
        f"  Dagster UI:  make ui          (DAGSTER_HOME={home}, {dagster_url})",
        f"  MLflow UI:   make mlflow-ui   ({mlflow_ui_url(tracking_uri(project.root))})",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
