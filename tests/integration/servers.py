"""Real servers for the integration tests: `make ui` (dagster dev), PostgreSQL and `mlflow server`.

Each runs in its own session on a free 127.0.0.1 port, is stopped the way a person would stop it
(Ctrl-C / SIGTERM) and is checked to leave no process behind.
"""

import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LOCATION = "qwen_edit_assets.definitions"  # `dagster dev -m qwen_edit_assets.definitions` names the location so
REPOSITORY = "__repository__"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, what: str, timeout: float, interval: float = 0.5, alive: subprocess.Popen | None = None, log: Path | None = None):
    """Polls `predicate()` until truthy; fails naming `what` (and the server's log tail) otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        died = alive is not None and alive.poll() is not None
        if died or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
            reason = f"exited with {alive.returncode}" if died else f"timed out after {timeout:.0f}s"
            raise AssertionError(f"{what}: {reason}\n{tail}")
        time.sleep(interval)


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def processes_of(session: int, marker: str) -> list[int]:
    """Processes (other than this one) in `session`, or whose command line or environment mentions `marker`
    (children that started a session of their own still carry the server's temp folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            stat = (entry / "stat").read_text()
            blob = (entry / "cmdline").read_bytes() + b"\0" + (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if int(stat.rsplit(")", 1)[1].split()[4]) == session or marker.encode() in blob:
            found.append(int(entry.name))
    return found


def stop_session(process: subprocess.Popen, marker: str, sig: int = signal.SIGINT, timeout: float = 60) -> None:
    """Sends `sig` to the process group (as Ctrl-C does), waits, and fails if anything of its session, or
    carrying `marker` (a temp folder only this server knows), still runs afterwards; stragglers are killed by pid first."""
    if process.poll() is None:
        os.killpg(process.pid, sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise AssertionError(f"{process.args[:3]} did not stop within {timeout:.0f}s of signal {sig}") from None
    deadline = time.monotonic() + 15
    while (left := processes_of(process.pid, marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    if left:
        commands = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:200] for pid in left}
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        raise AssertionError(f"processes left behind after stopping {process.args[:3]}: {commands}")


def _ignore_stop_signals():
    """What a shell does to a job started with `&`: the server must still stop on SIGINT (Makefile's WITH_SIGNALS)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class DagsterUI:
    """`make ui` (dagster dev: webserver + daemon + code server) on a temp DAGSTER_HOME, started the way a
    background job is (SIGINT/SIGTERM ignored), stopped with Ctrl-C."""

    def __init__(self, home: Path, env: dict[str, str], log: Path):
        self.home, self.log_path = home, log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        venv = Path(sys.prefix)
        command = ["make", "--no-print-directory", "-o", str(venv / ".installed"), "ui", f"VENV={venv}", f"DAGSTER_PORT={self.port}"]
        self.log = open(log, "w")
        self.process = subprocess.Popen(command, cwd=REPO, env={**os.environ, **env, "DAGSTER_HOME": str(home)},
                                        stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                        preexec_fn=_ignore_stop_signals)
        try:
            wait_until(lambda: http_ok(self.url + "/server_info"), f"dagster webserver on {self.url}", 120, alive=self.process, log=log)
            wait_until(self._location_loaded, "code location loaded", 120, alive=self.process, log=log)
        except BaseException:
            self.stop()
            raise

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(self.url + "/graphql", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        assert not answer.get("errors"), answer["errors"]
        return answer["data"]

    def _location_loaded(self) -> bool:
        data = self.graphql("{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus "
                            "locationOrLoadError { __typename ... on PythonError { message } } } } } }")
        entries = data["workspaceOrError"]["locationEntries"]
        for entry in entries:
            error = entry["locationOrLoadError"]
            assert not error or error["__typename"] != "PythonError", f"code location failed to load: {error['message']}"
        return any(e["name"] == LOCATION and e["loadStatus"] == "LOADED" and e["locationOrLoadError"] for e in entries)

    def stop(self) -> None:
        try:
            stop_session(self.process, str(self.home))
        finally:
            self.log.close()


# --- PostgreSQL -----------------------------------------------------------------------------------

def postgres_bindir() -> Path:
    """The folder with initdb and postgres (Debian keeps them out of PATH), or a failure saying what to install."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0)
    candidates = [Path(p) for p in candidates[::-1]]
    if shutil.which("initdb"):
        candidates.append(Path(shutil.which("initdb")).resolve().parent)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "postgres").is_file():
            return folder
    raise AssertionError("the PostgreSQL tests need the server binaries (initdb, postgres): "
                         "apt-get install -y --no-install-recommends postgresql (make test installs it: make system-packages)")


class PostgresServer:
    """A throwaway PostgreSQL cluster: initdb into a temp dir, TCP on a free 127.0.0.1 port with password
    (scram) authentication, its unix socket in the same temp dir. As root it runs as the `postgres` user."""

    USER = "qwen"
    PASSWORD = "integration-test-password"

    def __init__(self):
        bindir = postgres_bindir()
        self.run_as = None
        if os.geteuid() == 0:  # postgres refuses to run as root
            try:
                self.run_as = pwd.getpwnam("postgres")
            except KeyError:
                raise AssertionError("running as root and there is no 'postgres' user to run the server as "
                                     "(Debian's postgresql package creates it)") from None
        # as root, somewhere the postgres user can reach (TMPDIR may sit under /root)
        self.dir = Path(tempfile.mkdtemp(prefix="qwen-edit-pg-", dir="/tmp" if self.run_as else None))
        pwfile = self.dir / "pwfile"
        pwfile.write_text(self.PASSWORD + "\n")
        if self.run_as:
            os.chown(self.dir, self.run_as.pw_uid, self.run_as.pw_gid)
            os.chown(pwfile, self.run_as.pw_uid, self.run_as.pw_gid)
        self.port = free_port()
        self.log_path = self.dir / "postgres.log"
        data = self.dir / "data"
        initdb = subprocess.run(
            [str(bindir / "initdb"), "-D", str(data), "-U", self.USER, f"--pwfile={pwfile}", "--auth-local=trust",
             "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync"],
            capture_output=True, text=True, cwd=self.dir, **self._as_user())
        assert initdb.returncode == 0, f"initdb failed:\n{initdb.stdout}\n{initdb.stderr}"
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [str(bindir / "postgres"), "-D", str(data), "-p", str(self.port), "-k", str(self.dir),
             "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
             "-c", "full_page_writes=off", "-c", "max_connections=100"],
            cwd=self.dir, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, **self._as_user())
        try:
            wait_until(self._accepts, f"postgres on 127.0.0.1:{self.port}", 60, alive=self.process, log=self.log_path)
        except BaseException:
            self.stop()
            raise

    def _as_user(self) -> dict:
        return {"user": self.run_as.pw_uid, "group": self.run_as.pw_gid, "extra_groups": []} if self.run_as else {}

    def connect(self, db: str = "postgres"):
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=self.port, user=self.USER, password=self.PASSWORD, dbname=db)

    def _accepts(self) -> bool:
        import psycopg2

        try:
            self.connect().close()
            return True
        except psycopg2.OperationalError:
            return False

    def create_database(self, name: str) -> None:
        connection = self.connect()
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        connection.close()

    def query(self, db: str, sql: str, params: tuple = ()) -> list[tuple]:
        connection = self.connect(db)
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql, params)
                return cursor.fetchall()
        finally:
            connection.close()

    def url(self, db: str) -> str:
        """A SQLAlchemy URL (SQLAlchemy 2.1 picks psycopg 3 for plain postgresql://; we ship psycopg2)."""
        return f"postgresql+psycopg2://{self.USER}:{self.PASSWORD}@127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        try:
            stop_session(self.process, str(self.dir), sig=signal.SIGINT)  # SIGINT: fast shutdown
        finally:
            self.log.close()
            shutil.rmtree(self.dir, ignore_errors=True)


class MlflowServer:
    """`mlflow server` with a SQL backend store and proxied artifacts in a local folder."""

    def __init__(self, backend_store_uri: str, workdir: Path):
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.artifacts = workdir / "mlflow-artifacts"
        self.log_path = workdir / "mlflow-server.log"
        self.log = open(self.log_path, "w")
        mlflow = Path(sys.executable).parent / "mlflow"
        self.process = subprocess.Popen(
            [str(mlflow), "server", "--backend-store-uri", backend_store_uri, "--artifacts-destination", str(self.artifacts),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            cwd=workdir, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        try:
            wait_until(lambda: http_ok(self.url + "/health"), f"mlflow server on {self.url}", 120, alive=self.process, log=self.log_path)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        try:
            stop_session(self.process, str(self.artifacts), sig=signal.SIGTERM)
        finally:
            self.log.close()
