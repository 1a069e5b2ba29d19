"""The Model Registry through a real `mlflow server` (sqlite backend, proxied artifacts): the same three
trainings as on the embedded store (conftest's PROMOTION_RUNS), registered and promoted through its REST API;
the champion's LoRA downloads from the server by alias, and `qwen-edit champion` reads it there."""

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import PROMOTION_RUNS, prepare_small_project, tracking_uri_env, train_and_promote
from tests.integration.servers import MlflowServer
from tests.trainer.tracking.test_registry import check_promotion_sequence
from trainer.cli import main
from trainer.tracking.promotion import CHAMPION
from trainer.tracking.registry import promote_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_promotion_on_a_tracking_server(demo_root, tmp_path, capsys):
    import mlflow.artifacts

    server = MlflowServer(f"sqlite:///{tmp_path / 'server.db'}", tmp_path)
    try:
        with tracking_uri_env(server.url):
            project = prepare_small_project(tmp_path / "project", demo_root, report_to="mlflow", tracker_project_name="promotion-server")
        steps = [train_and_promote(project, name, server.url, **settings) for name, settings in PROMOTION_RUNS]
        client = MlflowClient(server.url)
        check_promotion_sequence(steps, client, "promotion-server")
        champion = client.get_model_version_by_alias("promotion-server", CHAMPION)
        assert champion.source.startswith("mlflow-artifacts:/")  # stored by the server, not on this machine's path
        assert steps[2][0].new.url.startswith(server.url + "/#/models/promotion-server/versions/3")  # the server is its UI
        again = promote_run(project.output_dir / "worse", project.config, server.url)  # found by run id through REST
        assert (again.registered, again.new.version, again.decision.alias) == (False, "2", "challenger")
        with tracking_uri_env(server.url):
            local = mlflow.artifacts.download_artifacts(f"models:/promotion-server@{CHAMPION}", dst_path=str(tmp_path / "dl"))
            assert main(["champion", "--config", str(project.config_path), "--root", str(project.root)]) == 0
        lora = project.output_dir / "better" / "lora" / "pytorch_lora_weights.safetensors"
        assert (tmp_path / "dl" / "lora" / "pytorch_lora_weights.safetensors").read_bytes() == lora.read_bytes(), local
        out = capsys.readouterr().out
        assert f"registered model 'promotion-server' at {server.url}" in out
        assert "champion: version 3 (run better" in out and "challenger: version 2 (run worse" in out
    finally:
        server.stop()
