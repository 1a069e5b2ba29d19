"""Rank 0's MLflow run for training."""

import json
from pathlib import Path

from trainer.config.schema import TrainConfig
from trainer.tracking.store import ensure_experiment, run_tags, run_url, tracking_uri


class MlflowRun:
    """Rank 0's MLflow run: params at the start, a loss history per step, artifacts at the end."""

    def __init__(self, config: TrainConfig, project_root: Path, tags: dict[str, str], manifest_path: Path | None = None):
        import mlflow

        self.mlflow = mlflow
        self.uri = tracking_uri(project_root)
        self.experiment_id = ensure_experiment(config.tracker_project_name, self.uri, project_root)
        tags = {**run_tags(config.model_flavour, project_root, manifest_path), **tags}  # command-line tags win
        run = mlflow.start_run(
            experiment_id=self.experiment_id, run_name=config.tracker_run_name, tags=tags, log_system_metrics=True
        )
        self.run_id = run.info.run_id
        params = {k: v for k, v in config.model_dump().items() if v is not None}
        params["model_kwargs"] = json.dumps(params.get("model_kwargs", {}))
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})

    @property
    def url(self) -> str:
        return run_url(self.uri, self.experiment_id, self.run_id)

    def log_step(self, step: int, loss: float, lr: float) -> None:
        self.mlflow.log_metrics({"train_loss": loss, "learning_rate": lr}, step=step)

    def log_validation(self, step: int, report) -> None:
        self.mlflow.log_metrics({f"validation_{k}": v for k, v in report.summary.items()}, step=step)
        self.mlflow.log_artifacts(str(report.html_path.parent), artifact_path=f"validation/step-{step}")

    def finish(self, result, curve: Path) -> None:
        """`result` is the recipe's TrainResult."""
        self.mlflow.log_metrics({"final_loss": result.final_loss, "train_seconds": result.seconds})
        self.mlflow.log_artifact(str(result.lora_path), artifact_path="lora")
        self.mlflow.log_artifact(str(curve), artifact_path="plots")
        self.mlflow.end_run()
