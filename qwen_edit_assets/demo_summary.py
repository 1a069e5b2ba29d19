"""Printed at the end of `make demo`: where the LoRA and the report are, and how to look at them."""

import json
import os

from qwen_edit_assets.resources import project_from_env


def main() -> None:
    from trainer.training.recipe import SUMMARY_NAME

    project = project_from_env().load()
    summary = json.loads((project.output_dir / SUMMARY_NAME).read_text())
    report = project.validation_dir / "report.html"
    home = os.environ.get("DAGSTER_HOME", "dagster_home")
    print(
        "\n".join(
            [
                "",
                "qwen-edit demo: every asset materialised",
                f"  LoRA (diffusers format): {summary['lora_path']}",
                f"  validation report:       {report}",
                f"  final training loss:     {summary['final_loss']:.4f} over {summary['steps']} steps",
                f"  MLflow run:              {summary.get('mlflow_run_url') or '-'}",
                "",
                "Look at it:",
                f"  Dagster UI:  make ui          (DAGSTER_HOME={home}, http://127.0.0.1:3000)",
                "  MLflow UI:   make mlflow-ui   (http://127.0.0.1:5000)",
            ]
        )
    )


if __name__ == "__main__":
    main()
