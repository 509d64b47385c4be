"""`cdi server`: one MLflow tracking server that a team's audits log to.

Runs, in place of the current process, `python -m mlflow server` with
- a database backend store (PostgreSQL for a team; `psycopg2` is the driver, `pip install "cdi[postgres]"`),
- proxied artifact serving to `--artifacts-destination` (an `s3://bucket/prefix` through boto3,
  `pip install "cdi[s3]"`, or a local folder), so clients upload and download through the server
  and need neither S3 credentials nor boto3; only the server reads AWS_* and MLFLOW_S3_ENDPOINT_URL,
- the UI and REST API on `--host` (127.0.0.1 unless told otherwise) and `--port`.

The backend URI travels in MLFLOW_BACKEND_STORE_URI rather than on the command line, so a password
in it does not show in `ps`; the printed command and every error mask it (`cdi.tracking.redact_uri`).
Unless set, the server's boto3 retries are bounded (AWS_RETRY_MODE=standard, AWS_MAX_ATTEMPTS=3), so an
upload to a bucket that does not answer fails before the client's MLFLOW_HTTP_REQUEST_TIMEOUT.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from urllib.parse import urlsplit

from cdi.errors import OptionError
from cdi.tracking import S3_RETRY_DEFAULTS, redact_text, redact_uri

DATABASE_SCHEMES = ("postgresql", "mysql", "mssql", "sqlite")


@dataclass(frozen=True)
class ServerConfig:
    """What `cdi server` was asked for; `command()` and `environment()` say how MLflow is run."""

    backend_store_uri: str
    artifacts_destination: str
    host: str = "127.0.0.1"
    port: int = 5000
    workers: int = 4
    app_name: str | None = None
    s3_endpoint_url: str | None = None
    allowed_hosts: str | None = None

    def command(self) -> list[str]:
        """argv of the MLflow server (the backend store URI is in `environment()`)."""
        argv = [sys.executable, "-m", "mlflow", "server",
                "--serve-artifacts", "--artifacts-destination", self.artifacts_destination,
                "--host", self.host, "--port", str(self.port), "--workers", str(self.workers)]
        if self.app_name:
            argv += ["--app-name", self.app_name]
        if self.allowed_hosts:
            argv += ["--allowed-hosts", self.allowed_hosts]
        return argv

    def environment(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["MLFLOW_BACKEND_STORE_URI"] = self.backend_store_uri
        if self.s3_endpoint_url:
            env["MLFLOW_S3_ENDPOINT_URL"] = self.s3_endpoint_url
        for name, value in S3_RETRY_DEFAULTS.items():
            env.setdefault(name, value)
        return env

    def shell_line(self) -> str:
        """The command as one shell line, with any password masked."""
        assignments = [f"MLFLOW_BACKEND_STORE_URI={shlex.quote(redact_uri(self.backend_store_uri))}"]
        if self.s3_endpoint_url:
            assignments.append(f"MLFLOW_S3_ENDPOINT_URL={shlex.quote(redact_uri(self.s3_endpoint_url))}")
        return " ".join(assignments + [shlex.quote(redact_uri(part)) for part in self.command()])


mask_password = redact_uri  # the name this module exported before tracking.redact_uri existed


def check(config: ServerConfig) -> None:
    """Fail in seconds, with the option to fix, before MLflow would fail with a traceback."""
    scheme = urlsplit(config.backend_store_uri).scheme.split("+")[0]
    if scheme not in DATABASE_SCHEMES:
        raise OptionError(
            f"--backend-store-uri {redact_uri(config.backend_store_uri)}: not a database URI; "
            "give postgresql://USER@HOST:5432/DATABASE (a file store cannot serve a team)"
        )
    if scheme == "postgresql":
        _require("psycopg2", "--backend-store-uri postgresql://... needs psycopg2: pip install \"cdi[postgres]\"")
        _check_database(config.backend_store_uri)
    if config.artifacts_destination.startswith("s3://"):
        _require("boto3", "--artifacts-destination s3://... needs boto3: pip install \"cdi[s3]\"")
        _check_bucket(config.artifacts_destination, config.s3_endpoint_url or os.environ.get("MLFLOW_S3_ENDPOINT_URL"))
    if config.app_name == "basic-auth":
        _require("flask_wtf", "--app-name basic-auth needs MLflow's auth extra: pip install \"cdi[auth]\"")
        if not os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY"):
            raise OptionError("--app-name basic-auth: set MLFLOW_FLASK_SERVER_SECRET_KEY to a long random secret "
                              "(the same for every server process), e.g. export it from `openssl rand -hex 32`")
    if config.port < 1 or config.port > 65535:
        raise OptionError(f"--port {config.port}: must be between 1 and 65535")


def _require(module: str, message: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise OptionError(message)


def _check_database(uri: str) -> None:
    import sqlalchemy

    engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": 10})
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.SQLAlchemyError as exc:
        first = redact_text(str(exc.orig if getattr(exc, "orig", None) else exc).strip().splitlines()[0], uri)
        raise OptionError(
            f"--backend-store-uri {redact_uri(uri)}: cannot connect ({first}); "
            "create the database (createdb) and check host, port, user and password"
        ) from None
    finally:
        engine.dispose()


def _check_bucket(destination: str, endpoint_url: str | None) -> None:
    import boto3
    import botocore.exceptions
    from botocore.config import Config

    bucket = urlsplit(destination).netloc
    chosen = any(name in os.environ for name in S3_RETRY_DEFAULTS)  # else bounded, as the server will be
    config = Config(connect_timeout=10, **({} if chosen else {"retries": {"mode": "standard", "max_attempts": 3}}))
    try:
        boto3.client("s3", endpoint_url=endpoint_url, config=config).head_bucket(Bucket=bucket)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        raise OptionError(
            f"--artifacts-destination {redact_uri(destination)}: bucket {bucket} cannot be reached "
            f"({redact_text(str(exc), endpoint_url)}); "
            "create it and set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (and --s3-endpoint-url for MinIO and the like)"
        ) from None


def exec_server(config: ServerConfig) -> None:
    """Replace this process with the MLflow server (its signals and exit code become ours)."""
    argv = config.command()
    os.execve(argv[0], argv, config.environment())


__all__ = ["ServerConfig", "check", "exec_server", "mask_password"]
