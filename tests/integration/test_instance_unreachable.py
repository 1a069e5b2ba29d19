"""The Dagster instance on PostgreSQL (dagster_home/dagster.postgres.yaml) when that PostgreSQL is stopped, or
refuses the login: `make ui` and `dagster asset materialize` end at once with one line naming the database's URL
(password hidden) and the fix, no traceback and nothing left running."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from qwen_edit_assets.instance_check import InstanceStorageUnreachable, check_instance
from tests.integration.servers import REPO, PostgresServer, free_port

pytestmark = pytest.mark.integration
EXIT_WITHIN_S = 120  # an import of dagster and one refused login on a busy 2-core machine; a dagster dev that started would never end


@pytest.fixture(scope="module")
def postgres():
    server = PostgresServer()
    try:
        server.create_database("dagster")
        yield server
    finally:
        server.stop()


@pytest.fixture
def instance_env(postgres, tmp_path, monkeypatch) -> dict[str, str]:
    """A DAGSTER_HOME with the template, DAGSTER_PG_* naming the server as a deployment would."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster_home" / "dagster.postgres.yaml", home / "dagster.yaml")
    env = {"DAGSTER_HOME": str(home), "DAGSTER_PG_HOST": "127.0.0.1", "DAGSTER_PG_PORT": str(postgres.port),
           "DAGSTER_PG_USER": postgres.USER, "DAGSTER_PG_PASSWORD": postgres.PASSWORD, "DAGSTER_PG_DB": "dagster"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def run_user_command(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=EXIT_WITHIN_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"{command[:4]} still ran {EXIT_WITHIN_S}s after it should have stopped:\n{output[-3000:]}") from None
    return subprocess.CompletedProcess(command, process.returncode, output)


def assert_one_clear_line(done: subprocess.CompletedProcess, url: str, fix: str, prefix: str) -> None:
    output = done.stdout
    assert done.returncode != 0, output
    assert "Traceback" not in output and "Retrying failed database connection" not in output, output
    assert PostgresServer.PASSWORD not in output
    lines = [line for line in output.splitlines() if url in line]
    assert len(lines) == 1 and lines[0].startswith(prefix) and fix in lines[0], output


def test_a_wrong_password_or_database_says_which_setting_to_fix(instance_env, postgres):
    import dagster as dg

    check_instance()  # the server is up and the template's settings log in: the check passes, and the instance opens
    with dg.DagsterInstance.from_config(instance_env["DAGSTER_HOME"]) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage" and instance.get_runs() == []
    os.environ["DAGSTER_PG_PASSWORD"] = "wrong"
    with pytest.raises(InstanceStorageUnreachable, match="password authentication failed .*Check DAGSTER_PG_USER / DAGSTER_PG_PASSWORD"):
        check_instance()
    os.environ["DAGSTER_PG_PASSWORD"], os.environ["DAGSTER_PG_DB"] = postgres.PASSWORD, "nosuchdb"
    with pytest.raises(InstanceStorageUnreachable, match=f'"nosuchdb" does not exist.*createdb -h 127.0.0.1 -p {postgres.port}'):
        check_instance()


def test_make_ui_and_asset_materialize_on_a_stopped_postgres_print_one_line(instance_env, postgres):
    postgres.stop()  # a real server, stopped: its port now refuses
    url = f"postgresql+psycopg2://{postgres.USER}:***@127.0.0.1:{postgres.port}/dagster"
    fix = "Start PostgreSQL there, or point DAGSTER_PG_HOST / DAGSTER_PG_PORT at the running server"

    venv = Path(sys.prefix)
    ui = run_user_command(["make", "--no-print-directory", "-o", str(venv / ".installed"), "ui", f"VENV={venv}",
                           f"DAGSTER_PORT={free_port()}"], instance_env)
    assert_one_clear_line(ui, url, fix, "error: ")
    assert "dagster dev" not in ui.stdout  # stopped before starting the servers

    # the raw Dagster command (no make): the template's storage class says the same in Dagster's own words
    materialize = run_user_command([str(venv / "bin" / "dagster"), "asset", "materialize", "-m", "qwen_edit_assets.definitions",
                                    "--select", "pairing_manifest"], instance_env)
    assert_one_clear_line(materialize, url, fix, "Error: ")
