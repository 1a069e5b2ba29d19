"""The Dagster instance's PostgreSQL, unreachable: one message naming the URL (no password) and the fix.

Against a real closed port here; a real stopped PostgreSQL server under `make ui` and `dagster asset
materialize` in tests/integration/test_instance_unreachable.py.
"""

import shutil
import socket
import time

import pytest
import yaml

from qwen_edit_assets import instance_check
from qwen_edit_assets.instance_check import InstanceStorageUnreachable, check_instance, postgres_settings
from tests.conftest import REPO

TEMPLATE = REPO / "dagster_home" / "dagster.postgres.yaml"
PASSWORD = "not-to-be-printed"


def closed_port() -> int:
    """A port nothing listens on: bound once for a free number, then released."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def pg_env(monkeypatch):
    port = closed_port()
    for key, value in {"DAGSTER_PG_HOST": "127.0.0.1", "DAGSTER_PG_PORT": str(port), "DAGSTER_PG_USER": "dagster",
                       "DAGSTER_PG_PASSWORD": PASSWORD, "DAGSTER_PG_DB": "dagster"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(instance_check, "REFUSED_RETRY_S", 0)
    return port


@pytest.fixture
def home(tmp_path, monkeypatch):
    shutil.copy(TEMPLATE, tmp_path / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    return tmp_path


def test_every_postgres_form_of_dagster_yaml_is_recognised_and_sqlite_is_not():
    db = {"postgres_db": {"hostname": "db"}}
    assert postgres_settings({"storage": {"postgres": db}}) == db
    assert postgres_settings(yaml.safe_load(TEMPLATE.read_text()))["postgres_db"]["hostname"] == {"env": "DAGSTER_PG_HOST"}
    assert postgres_settings({"run_storage": {"module": "dagster_postgres.run_storage", "class": "PostgresRunStorage", "config": db}}) == db
    assert postgres_settings({"storage": {"sqlite": {"base_dir": "x"}}}) is None
    assert postgres_settings({}) is None


def test_a_closed_port_is_one_line_with_the_url_and_the_fix(home, pg_env):
    with pytest.raises(InstanceStorageUnreachable) as caught:
        check_instance()
    message = caught.value.message
    assert "\n" not in message
    assert f"postgresql+psycopg2://dagster:***@127.0.0.1:{pg_env}/dagster" in message
    assert "Connection refused" in message and "Start PostgreSQL" in message
    assert "DAGSTER_PG_HOST / DAGSTER_PG_PORT" in message and str(home / "dagster.yaml") in message
    assert PASSWORD not in message


def test_an_unset_variable_is_named(home, pg_env, monkeypatch):
    monkeypatch.delenv("DAGSTER_PG_HOST")
    with pytest.raises(InstanceStorageUnreachable, match="DAGSTER_PG_HOST, which is not set"):
        check_instance()


def test_an_unknown_host_names_the_host_setting(home, pg_env, monkeypatch):
    monkeypatch.setenv("DAGSTER_PG_HOST", "no-such-host.invalid")
    with pytest.raises(InstanceStorageUnreachable, match="Set DAGSTER_PG_HOST to the database server's name"):
        check_instance()


def test_sqlite_and_no_home_need_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    check_instance()
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", tmp_path / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    check_instance()


def test_opening_the_instance_in_process_fails_at_once_with_the_same_message(home, pg_env):
    """The template's storage class checks first: no five retries with back-off, the same one message."""
    import dagster as dg

    import qwen_edit_assets.instance_storage  # noqa: F401  (imported before the clock starts: dagster_postgres is slow to import)

    started = time.monotonic()
    with pytest.raises(InstanceStorageUnreachable) as caught:
        dg.DagsterInstance.from_config(str(home))
    assert time.monotonic() - started < 4  # Dagster's own retries alone take about 6 s
    assert f"127.0.0.1:{pg_env}/dagster" in caught.value.message and "Start PostgreSQL" in caught.value.message
    assert PASSWORD not in caught.value.message
