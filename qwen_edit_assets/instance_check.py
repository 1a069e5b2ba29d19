"""Is the Dagster instance's PostgreSQL reachable? Asked before anything opens the instance, so a database
that is down, unknown or refusing the login is one line naming the URL (password hidden) and the fix,
instead of Dagster's five retries and a 200-line traceback.

- `python -m qwen_edit_assets.instance_check`: the check of `$DAGSTER_HOME/dagster.yaml` that `make ui` and
  `make demo` run first. It reads every PostgreSQL form of the file (`storage: postgres`, `storage: custom`,
  the per-store classes) and also names a `DAGSTER_PG_*` variable the file needs that is not set.
- `qwen_edit_assets.instance_storage.CheckedPostgresStorage` (used by `dagster_home/dagster.postgres.yaml`):
  the same check inside every Dagster process that opens the instance (`dagster asset materialize`,
  `dagster dev`, the daemon, run workers).
"""

import os
import sys
import time
from pathlib import Path
from typing import Any

import click

REPO_INSTANCE = Path(__file__).resolve().parent.parent / "dagster_home"
CONNECT_TIMEOUT_S = 5  # a host that drops packets: one line after 5 s, not a hang
REFUSED_RETRY_S = 3  # a server that is starting up refuses for a moment
# the postgres_db fields, and the setting a user changes to fix each
FIELDS = {"hostname": "host", "port": "port", "username": "user", "password": "password", "db_name": "database"}


class InstanceStorageUnreachable(click.ClickException):
    """Every Dagster command is a click command: click prints `Error: <message>` and exits 1, no traceback."""


def postgres_settings(instance_yaml: dict) -> dict | None:
    """The PostgreSQL config (`postgres_url` or `postgres_db`) of a parsed dagster.yaml, or None when the
    instance keeps its runs elsewhere (sqlite, the default)."""
    storage = instance_yaml.get("storage") or {}
    if isinstance(storage.get("postgres"), dict):
        return storage["postgres"]
    candidates = [storage.get("custom")] + [instance_yaml.get(key) for key in ("run_storage", "event_log_storage", "schedule_storage")]
    for entry in candidates:
        if isinstance(entry, dict) and _is_postgres_class(entry) and isinstance(entry.get("config"), dict):
            return entry["config"]
    return None


def _is_postgres_class(entry: dict) -> bool:
    return str(entry.get("module", "")).startswith(("dagster_postgres", __package__ + ".instance_storage"))


def env_names(settings: dict) -> dict[str, str]:
    """Which environment variable each connection field comes from ({'hostname': 'DAGSTER_PG_HOST', ...})."""
    fields = settings.get("postgres_db") or {}
    named = {key: value["env"] for key, value in fields.items() if isinstance(value, dict) and "env" in value}
    if isinstance(settings.get("postgres_url"), dict) and "env" in settings["postgres_url"]:
        named["postgres_url"] = settings["postgres_url"]["env"]
    return named


def resolved_url(settings: dict, where: str) -> str:
    """The SQLAlchemy URL the settings describe, `{env: NAME}` values read from the environment (no dagster
    import: `make ui` asks this before starting anything)."""
    from sqlalchemy.engine import URL

    def value(key: str, raw: Any) -> Any:
        if isinstance(raw, dict) and "env" in raw:
            if raw["env"] not in os.environ:
                raise InstanceStorageUnreachable(
                    f"the Dagster instance ({where}) keeps its runs in PostgreSQL and reads {key} from the environment "
                    f"variable {raw['env']}, which is not set: export {raw['env']}=... (README, 'Dagster on PostgreSQL')")
            return os.environ[raw["env"]]
        return raw

    if "postgres_url" in settings:
        return str(value("postgres_url", settings["postgres_url"]))
    fields = {key: value(key, raw) for key, raw in (settings.get("postgres_db") or {}).items()}
    url = URL.create(fields.get("scheme") or "postgresql", username=fields.get("username"), password=fields.get("password") or None,
                     host=fields.get("hostname"), port=int(fields.get("port") or 5432), database=fields.get("db_name"),
                     query={str(k): str(v) for k, v in (fields.get("params") or {}).items()})
    return url.render_as_string(hide_password=False)


def check_reachable(url: str, where: str, names: dict[str, str] | None = None) -> None:
    """Raises InstanceStorageUnreachable (one line: the URL without its password, why, the fix) unless a login
    to the database works."""
    reason = _login_failure(url)
    if reason is None:
        return
    from sqlalchemy.engine import make_url

    shown = make_url(url).render_as_string(hide_password=True)
    end = "" if reason.endswith(("?", "!")) else "."
    raise InstanceStorageUnreachable(
        f"the Dagster instance ({where}) cannot open its PostgreSQL database {shown}: {reason}{end} {_fix(reason, url, names or {})}")


def _login_failure(url: str) -> str | None:
    """None when psycopg2 logs in, else its reason on one line. Refused connections are retried for a few seconds."""
    import psycopg2
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    params = {key: value for key, value in parsed.query.items() if isinstance(value, str)}  # sslmode=..., options=...
    deadline = time.monotonic() + REFUSED_RETRY_S
    while True:
        try:
            psycopg2.connect(host=parsed.host, port=parsed.port or 5432, user=parsed.username, password=parsed.password,
                             dbname=parsed.database, connect_timeout=CONNECT_TIMEOUT_S, **params).close()
            return None
        except psycopg2.Error as exc:
            lines = [" ".join(line.split()) for line in str(exc).splitlines() if line.strip()]
            reason = " ".join(line if line.endswith((".", "?", "!", ":")) or line is lines[-1] else line + "." for line in lines).rstrip(".")
            if "refused" not in reason or time.monotonic() > deadline:
                return reason
        time.sleep(0.5)


def _fix(reason: str, url: str, names: dict[str, str]) -> str:
    from sqlalchemy.engine import make_url

    def setting(*fields: str) -> str:
        return " / ".join(names.get(f, FIELDS[f]) for f in fields) if "postgres_url" not in names else names["postgres_url"]

    parsed = make_url(url)
    local = f"(a local instance without PostgreSQL: DAGSTER_HOME={REPO_INSTANCE})"
    lowered = reason.lower()
    if "password authentication failed" in lowered or "no pg_hba.conf entry" in lowered or ("role" in lowered and "does not exist" in lowered):
        return f"Check {setting('username', 'password')} (and the server's pg_hba.conf) {local}"
    if "database" in lowered and "does not exist" in lowered:
        return (f"Create it (createdb -h {parsed.host} -p {parsed.port or 5432} -U {parsed.username} {parsed.database}) "
                f"or set {setting('db_name')} to an existing one {local}")
    if "translate host name" in lowered or "name or service not known" in lowered:
        return f"Set {setting('hostname')} to the database server's name or address {local}"
    return f"Start PostgreSQL there, or point {setting('hostname', 'port')} at the running server {local}"


def instance_yaml_path() -> Path | None:
    home = os.environ.get("DAGSTER_HOME")
    return Path(home) / "dagster.yaml" if home else None


def check_instance(path: Path | None = None) -> None:
    """The check of one dagster.yaml (default: `$DAGSTER_HOME/dagster.yaml`); nothing to do for sqlite."""
    import yaml

    path = path or instance_yaml_path()
    if path is None or not path.is_file():
        return  # no DAGSTER_HOME, or a fresh one: Dagster's own sqlite default
    try:
        settings = postgres_settings(yaml.safe_load(path.read_text()) or {})
    except (OSError, yaml.YAMLError) as exc:
        raise InstanceStorageUnreachable(f"cannot read the Dagster instance config {path}: {exc}") from None
    if settings is not None:
        check_reachable(resolved_url(settings, str(path)), str(path), env_names(settings))


def main() -> int:
    try:
        check_instance()
    except InstanceStorageUnreachable as exc:
        print(f"error: {exc.message}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
