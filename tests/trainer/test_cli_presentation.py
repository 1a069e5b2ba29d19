"""The terminal (issue 16 §13): `compare` finds the configured experiment and names the ones that exist,
`train` documents --set, --run-name and --tag, progress lines never break a progress bar."""

import sys

import pytest

from trainer.cli import build_parser, configured_experiment, main
from trainer.tracking.reporting import Reporter


def _help(command: str) -> str:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return sub.choices[command].format_help()


def test_train_documents_set_run_name_and_tag():
    text = " ".join(_help("train").split())
    assert "--set KEY=VALUE override a config key for this run" in text
    assert "--run-name RUN_NAME the MLflow run's name and its folder under output_dir" in text
    assert "--tag KEY=VALUE an MLflow tag on the run" in text


def test_compare_defaults_to_the_configured_experiment(tmp_path, monkeypatch):
    monkeypatch.delenv("QWEN_EDIT_CONFIG", raising=False)
    assert configured_experiment(None, tmp_path) == "qwen-edit"  # TrainConfig's default, not a second literal
    (tmp_path / "team.json").write_text('{"tracker_project_name": "team-edits"}')
    monkeypatch.setenv("QWEN_EDIT_CONFIG", str(tmp_path / "team.json"))  # the Dagster project's config
    assert configured_experiment(None, tmp_path) == "team-edits"
    (tmp_path / "mine.json").write_text('{"tracker_project_name": "mine"}')
    assert configured_experiment(tmp_path / "mine.json", tmp_path) == "mine"


def test_compare_on_a_missing_experiment_lists_the_ones_there(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for name in ("qwen-edit", "team-edits"):
        MlflowClient(uri).create_experiment(name, artifact_location=(tmp_path / name).as_uri())
    assert main(["compare", "--experiment", "nope", "--tracking-uri", uri, "--root", str(tmp_path)]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]  # (MLflow logs its migrations)
    assert line.startswith("error: no MLflow experiment 'nope' at sqlite:///")
    assert "the experiments there: Default, qwen-edit, team-edits" in line and "--experiment NAME" in line


def test_a_progress_line_is_a_line_of_its_own_under_a_bar(capsys):
    from tqdm.auto import tqdm

    with tqdm(total=4, desc="training", file=sys.stdout, ascii=True) as bar:
        bar.update(1)
        Reporter().log("step 1/4 loss 1.00000")
        bar.update(1)
    out = capsys.readouterr().out
    (line,) = [line for line in out.split("\n") if "step 1/4" in line]
    assert line.split("\r")[-1] == "step 1/4 loss 1.00000"  # the bar was cleared first, not appended to
