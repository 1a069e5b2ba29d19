"""The MLflow Model Registry on the embedded sqlite store: three trainings of one project (conftest's
promoted_runs: a first one, one made worse with learning rate 0, a better one), each registered and promoted
as `qwen-edit train` does; then the commands that show and redo it, and their errors."""

import json
import shutil

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import PROMOTION_RUNS, tracking_uri_env
from trainer.cli import main
from trainer.tracking.promotion import CHALLENGER, CHAMPION
from trainer.tracking.registry import PROMOTION_FILE, RegistryError, promote_run

pytestmark = pytest.mark.slow  # the fixture trains three times


def check_promotion_sequence(promoted_runs_steps, client: MlflowClient, name: str) -> None:
    """first -> champion; worse -> challenger (the champion stays); better -> champion (worse stays challenger)."""
    (first, after_first), (worse, after_worse), (better, after_better) = promoted_runs_steps
    assert [p.new.version for p, _ in promoted_runs_steps] == ["1", "2", "3"]
    assert first.decision.alias == CHAMPION and first.previous_champion is None and after_first == {CHAMPION: "1"}
    assert worse.decision.alias == CHALLENGER and worse.previous_champion.version == "1"
    assert after_worse == {CHAMPION: "1", CHALLENGER: "2"}
    assert better.decision.alias == CHAMPION and better.previous_champion.version == "1"
    assert after_better == {CHAMPION: "3", CHALLENGER: "2"}
    # the registry itself says so, through MLflow's own alias lookup
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "3"
    assert str(client.get_model_version_by_alias(name, CHALLENGER).version) == "2"
    # what decided: the validation means logged to each training run
    key = better.rule.mlflow_key
    values = [p.new.metrics[key] for p, _ in promoted_runs_steps]
    assert values[2] < values[0] < values[1], values  # lower latent distance is better
    assert "not lower" in worse.decision.reason and "champion: version 1" in worse.decision.reason
    runs = {p.new.run_id: client.get_run(p.new.run_id).data.params["learning_rate"] for p, _ in promoted_runs_steps}
    assert list(runs.values()) == [str(settings["learning_rate"]) for _, settings in PROMOTION_RUNS]


def test_the_worse_run_is_challenger_and_a_better_one_takes_champion(promoted_runs):
    client = MlflowClient(promoted_runs.uri)
    check_promotion_sequence(promoted_runs.steps, client, promoted_runs.project.config.model_registry_name)


def test_a_version_holds_the_lora_its_metadata_the_report_and_where_it_came_from(promoted_runs, tmp_path):
    import mlflow.artifacts

    from trainer.tracking.registry import adapter_metadata

    name = promoted_runs.project.config.model_registry_name
    assert name == "promotion-demo"  # tracker_project_name: one registered model per project
    client = MlflowClient(promoted_runs.uri)
    champion = client.get_model_version_by_alias(name, CHAMPION)
    run = client.get_run(champion.run_id)
    folder = promoted_runs.project.output_dir / "better"
    assert champion.tags["flavour"] == "edit-v2" and champion.tags["run_name"] == "better"
    assert champion.tags["base_model"] == run.data.params["pretrained_model_name_or_path"]
    assert champion.tags["base_model_revision"] == "local folder"
    assert champion.tags["data_version"] == run.data.tags["manifest_version"] != "unknown"
    assert champion.tags["git_revision"] == run.data.tags["git_revision"]
    assert champion.tags["dagster_run_id"] == "none (command line)"
    assert (champion.tags["lora_rank"], champion.tags["lora_alpha"]) == ("4", "4.0")
    assert champion.tags["promotion"] == CHAMPION and champion.tags["promotion_rule"].startswith("lora_latent_mse")
    with tracking_uri_env(promoted_runs.uri):  # models:/name@alias resolves through the registry
        local = mlflow.artifacts.download_artifacts(f"models:/{name}@{CHAMPION}", dst_path=str(tmp_path / "champion"))
    from pathlib import Path

    local = Path(local)
    assert (local / "lora" / "pytorch_lora_weights.safetensors").read_bytes() == (folder / "lora" / "pytorch_lora_weights.safetensors").read_bytes()
    assert (local / "lora" / "pytorch_lora_weights_comfyui.safetensors").is_file()
    assert json.loads((local / "adapter_metadata.json").read_text()) == adapter_metadata(folder / "lora" / "pytorch_lora_weights.safetensors")
    assert json.loads((local / "validation" / "report.json").read_text()) == json.loads((folder / "validation" / "report.json").read_text())
    assert (local / "validation" / "report.html").is_file() and (local / "training_summary.json").is_file()
    # the logged model behind it carries the run's validation means, without doubling the run's own points
    model = client.get_logged_model(champion.tags["logged_model_id"])
    assert model.source_run_id == champion.run_id
    assert {m.key for m in model.metrics} >= {"validation_lora_latent_mse", "validation_lora_psnr"}
    assert len(client.get_metric_history(champion.run_id, "validation_lora_latent_mse")) == 1
    # the decision is kept beside the run, with links to the MLflow pages
    kept = json.loads((folder / PROMOTION_FILE).read_text())
    assert kept["decision"] == CHAMPION and kept["new"]["url"].endswith(f"/#/models/{name}/versions/3?workflowType=machine_learning")
    assert kept["previous_champion"]["version"] == "1"


def test_qwen_edit_champion_shows_both_with_their_metrics(promoted_runs, capsys):
    project = promoted_runs.project
    with tracking_uri_env(promoted_runs.uri):
        assert main(["champion", "--config", str(project.config_path), "--root", str(project.root)]) == 0
    out = capsys.readouterr().out
    assert "registered model 'promotion-demo'" in out and "rule: lora_latent_mse, lower is better, margin 0" in out
    assert "champion: version 3 (run better" in out and "challenger: version 2 (run worse" in out
    assert "/#/models/promotion-demo/versions/3?workflowType=machine_learning" in out
    table = [line.split() for line in out.splitlines() if line.startswith("lora_latent_mse")]
    assert table and table[0][-2:] == ["<-", "decides"] and float(table[0][1]) < float(table[0][2])


def test_qwen_edit_promote_again_keeps_the_version_and_the_aliases(promoted_runs, capsys):
    project = promoted_runs.project
    with tracking_uri_env(promoted_runs.uri):
        code = main(["promote", "--config", str(project.config_path), "--data", str(project.data_path),
                     "--root", str(project.root), "--run", "worse"])
    out = capsys.readouterr().out
    assert code == 0
    assert "already registered: version 2" in out and "decision: challenger" in out and "champion: version 3" in out
    client = MlflowClient(promoted_runs.uri)
    assert str(client.get_model_version_by_alias("promotion-demo", CHAMPION).version) == "3"
    assert len(client.search_model_versions("name = 'promotion-demo'")) == 3
    # latest: the folder trained last ("better"), already the champion
    with tracking_uri_env(promoted_runs.uri):
        assert main(["promote", "--config", str(project.config_path), "--data", str(project.data_path), "--root", str(project.root)]) == 0
    assert "version 3 already holds champion" in capsys.readouterr().out


def test_a_margin_keeps_the_champion_where_the_better_run_won_without_one(promoted_runs, tmp_path):
    """The same registry seen by a project with a margin larger than the better run's lead."""
    from trainer.tracking.registry import RunFolder

    project = promoted_runs.project
    lead = promoted_runs.steps[0][0].new.metrics["validation_lora_latent_mse"] - promoted_runs.steps[2][0].new.metrics["validation_lora_latent_mse"]
    strict = project.config.model_copy(update={"registered_model_name": "promotion-demo-strict", "promotion_margin": 2 * lead})
    with tracking_uri_env(promoted_runs.uri):
        for name in ("first", "better"):
            copy = shutil.copytree(project.output_dir / name, tmp_path / name)  # promotion.json goes into the copy
            promotion = promote_run(copy, strict, promoted_runs.uri)
            assert RunFolder.read(copy).mlflow_run_id == promotion.new.run_id
    assert promotion.decision.alias == CHALLENGER and f"margin {2 * lead:g}" in promotion.decision.reason
    assert str(MlflowClient(promoted_runs.uri).get_model_version_by_alias("promotion-demo-strict", CHAMPION).version) == "1"


def test_nothing_to_register_or_show_is_one_error_line(promoted_runs, tmp_path, capsys):
    from tests.integration.servers import free_port

    project = promoted_runs.project
    args = ["--config", str(project.config_path), "--data", str(project.data_path), "--root", str(project.root)]
    with tracking_uri_env(promoted_runs.uri):
        assert main(["promote", *args, "--run", "nope"]) == 2
        assert "no run folder 'nope'" in capsys.readouterr().err
        unvalidated = shutil.copytree(project.output_dir / "first", tmp_path / "unvalidated")
        shutil.rmtree(unvalidated / "validation")
        assert main(["promote", *args, "--run", str(unvalidated)]) == 2
        assert "not validated yet" in capsys.readouterr().err
        untracked = shutil.copytree(project.output_dir / "first", tmp_path / "untracked")
        summary = json.loads((untracked / "training_summary.json").read_text())
        (untracked / "training_summary.json").write_text(json.dumps({**summary, "mlflow_run_id": None}))
        assert main(["promote", *args, "--run", str(untracked)]) == 2
        assert "trained without an MLflow run" in capsys.readouterr().err
        assert main(["champion", "--model", "promotion-dem", "--root", str(project.root)]) == 2
        err = capsys.readouterr().err
        assert "no registered model 'promotion-dem'" in err and "did you mean 'promotion-demo'" in err
    assert main(["champion", "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}"]) == 2
    assert "no MLflow store at" in capsys.readouterr().err
    down = f"http://127.0.0.1:{free_port()}"
    assert main(["champion", "--tracking-uri", down]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: MLflow at {down}") and "Connection refused" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(RegistryError, match="not in the store"):  # a run folder of another store
        promote_run(project.output_dir / "first", project.config, f"sqlite:///{_empty_store(tmp_path)}")


def _empty_store(tmp_path):
    path = tmp_path / "other.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()  # creates the tables
    return path
