"""Real services for the team setup: PostgreSQL, an S3 endpoint (moto) and `cdi server` between them.

PostgreSQL: $CDI_TEST_POSTGRES_URL when set (.ci/run starts one), else a throwaway cluster started
with scripts/throwaway_postgres.py from the Debian package's binaries; skipped when those are absent.
S3: $CDI_TEST_S3_ENDPOINT when set (.ci/run starts moto's standalone server there), else moto's
standalone server started here on 127.0.0.1; skipped when `moto[server]` is not installed.
Only the server gets S3 credentials: clients in these tests have none, as in a team.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import requests

REPO = Path(__file__).resolve().parents[2]
BUCKET = "cdi-team"
PREFIX = "audits"
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_environment(**extra: str) -> dict[str, str]:
    """The environment of a team member's process: no MLflow run, no S3 credentials or endpoint."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), **extra)
    return env


def _wait_until_up(url: str, proc: subprocess.Popen, log: Path, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if requests.get(url, timeout=2).status_code < 500:
                return
        except (requests.ConnectionError, requests.Timeout):  # not listening yet, or too busy starting to answer
            pass
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with code {proc.returncode}: {log.read_text()[-3000:]}")
        time.sleep(0.3)
    _stop(proc)
    pytest.fail(f"{what} did not answer within {timeout:.0f} s: {log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """Stop a server started in its own session, with the workers it forked."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@dataclass
class CdiServer:
    """`cdi server OPTIONS --port PORT` in its own session; `start()` again restarts it with the same arguments.

    Its output goes to root/server.log (appended across restarts), the printed command to root/command.txt.
    """

    root: Path
    options: list[str]
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def artifacts_destination(self) -> str:
        return self.options[self.options.index("--artifacts-destination") + 1]

    def start(self, timeout: float = 150) -> "CdiServer":
        assert self.proc is None or self.proc.poll() is not None, "the server is still running"
        command = [sys.executable, "-m", "cdi.cli", "server", *self.options, "--port", str(self.port)]
        log = self.root / "server.log"
        with open(self.root / "command.txt", "a") as out, open(log, "a") as err:
            self.proc = subprocess.Popen(command, stdout=out, stderr=err, cwd=self.root, env=self.env,
                                         start_new_session=True)
        try:
            _wait_until_up(f"{self.url}/health", self.proc, log, "cdi server", timeout=timeout)
        except BaseException:  # also an interrupt while it starts: no server outlives the test run
            _stop(self.proc)
            raise
        return self

    def kill(self) -> None:
        """The machine dies: SIGKILL to the server and its workers, no clean shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)


def team_server_options(database_url: str, s3_endpoint: str, prefix: str = PREFIX, workers: int = 2) -> list[str]:
    """`cdi server` options of the team setup: runs in `database_url`, artifacts in s3://BUCKET/prefix."""
    return ["--backend-store-uri", database_url, "--artifacts-destination", f"s3://{BUCKET}/{prefix}",
            "--workers", str(workers), "--s3-endpoint-url", s3_endpoint]


@pytest.fixture(scope="session")
def postgres_url():
    """Superuser URL of a PostgreSQL server on 127.0.0.1."""
    if os.environ.get("CDI_TEST_POSTGRES_URL"):
        yield os.environ["CDI_TEST_POSTGRES_URL"]
        return
    root = Path(tempfile.mkdtemp(prefix="cdi-postgres-"))  # under /tmp: the `postgres` user can reach it
    script = [sys.executable, str(REPO / "scripts" / "throwaway_postgres.py")]
    try:
        started = subprocess.run([*script, "start", str(root)], capture_output=True, text=True)
        if started.returncode == 3:
            root.rmdir()
            pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql; .ci/run does)")
        assert started.returncode == 0, started.stderr
        yield started.stdout.strip()
    finally:  # also after an interrupt during start-up
        if root.exists():
            subprocess.run([*script, "stop", str(root)], check=False)


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 with an empty bucket; yields the endpoint URL."""
    if os.environ.get("CDI_TEST_S3_ENDPOINT"):
        endpoint = os.environ["CDI_TEST_S3_ENDPOINT"].rstrip("/")
        client = s3_client(endpoint)
        try:
            client.create_bucket(Bucket=BUCKET)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        yield endpoint
        return
    try:
        import boto3  # noqa: F401
        import moto.server  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"moto[server] and boto3 are needed for the S3 endpoint ({exc}); pip install -e \".[dev]\"")
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"), start_new_session=True,
                            env={**client_environment(), **S3_CREDENTIALS})
    endpoint = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(f"{endpoint}/moto-api/", proc, log, "moto server", timeout=60)
        s3_client(endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        _stop(proc)


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                        region_name="us-east-1")


@pytest.fixture
def bucket_keys(s3_endpoint):
    """Callable: the object keys under the server's artifact prefix, read straight from S3."""
    def keys() -> set[str]:
        listed = s3_client(s3_endpoint).list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/")
        return {item["Key"] for item in listed.get("Contents", [])}

    return keys


@pytest.fixture
def s3_keys(s3_endpoint):
    """Callable: the object keys under an s3://BUCKET/PREFIX destination, read straight from S3."""
    def keys(destination: str) -> set[str]:
        parts = urlsplit(destination)
        listed = s3_client(s3_endpoint).list_objects_v2(Bucket=parts.netloc, Prefix=f"{parts.path.strip('/')}/")
        return {item["Key"] for item in listed.get("Contents", [])}

    return keys


@pytest.fixture
def cdi_server(tmp_path):
    """Callable: start `cdi server` with these options and environment, return its CdiServer; all stopped afterwards."""
    started: list[CdiServer] = []

    def start(options: list[str], env: dict[str, str], name: str = "server") -> CdiServer:
        root = tmp_path / name
        root.mkdir()
        server = CdiServer(root, list(options), env)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def client_env():
    """Callable: a team member's process environment (see client_environment)."""
    return client_environment


@contextmanager
def _new_database(postgres_url: str):
    """A new, empty database on the server of `postgres_url`; yields its URL, then drops it."""
    import psycopg2

    name = f"cdi_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(postgres_url)
    admin.autocommit = True
    try:
        with admin.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {name}")
        parts = urlsplit(postgres_url)
        yield urlunsplit(parts._replace(path=f"/{name}"))
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        admin.close()


@pytest.fixture(scope="session")
def team_database(postgres_url):
    """A fresh database for this session's MLflow server; dropped afterwards."""
    with _new_database(postgres_url) as url:
        yield url


@pytest.fixture
def own_database(postgres_url):
    """A fresh database for one test (one that stops and restarts its own server); dropped afterwards."""
    with _new_database(postgres_url) as url:
        yield url


@pytest.fixture
def own_team_server(own_database, s3_endpoint, cdi_server):
    """A started `cdi server` of the team setup that one test may kill and restart (CdiServer.kill/start):
    its own PostgreSQL database and its own prefix in the bucket, one worker."""
    prefix = f"{PREFIX}-{uuid.uuid4().hex[:8]}"
    return cdi_server(team_server_options(own_database, s3_endpoint, prefix=prefix, workers=1),
                      env={**client_environment(), **S3_CREDENTIALS}, name="team-server")


@pytest.fixture(scope="session")
def team_server(team_database, s3_endpoint, tmp_path_factory):
    """`cdi server` on PostgreSQL + S3, as a team would run it; yields its URL."""
    server = CdiServer(tmp_path_factory.mktemp("team-server"), team_server_options(team_database, s3_endpoint),
                       env={**client_environment(), **S3_CREDENTIALS})
    try:
        server.start()
        yield server.url
    finally:
        server.stop()
