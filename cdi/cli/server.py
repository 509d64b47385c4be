"""`cdi server`: the team's MLflow tracking server (PostgreSQL for runs, S3 for artifacts)."""

from __future__ import annotations

import argparse

from cdi.options import count, positive_int

NAME, HELP = "server", "run the team's MLflow tracking server (PostgreSQL + S3)"


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    server = commands.add_parser(NAME, help=HELP)
    server.set_defaults(run=run)
    server.add_argument("--backend-store-uri", required=True,
                        help="database of runs, e.g. postgresql://cdi@db.example:5432/mlflow")
    server.add_argument("--artifacts-destination", required=True,
                        help="where the server stores artifacts, e.g. s3://bucket/cdi (clients need no S3 access)")
    server.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1; 0.0.0.0 for all)")
    server.add_argument("--port", type=count, default=5000, help="port (default 5000)")
    server.add_argument("--workers", type=positive_int, default=4, help="worker processes (default 4)")
    server.add_argument("--app-name", choices=("basic-auth",), default=None,
                        help="basic-auth: users and passwords (MLflow's auth app; see MLFLOW_AUTH_CONFIG_PATH)")
    server.add_argument("--s3-endpoint-url", default=None,
                        help="S3-compatible endpoint such as MinIO (default $MLFLOW_S3_ENDPOINT_URL, else AWS)")
    server.add_argument("--allowed-hosts", default=None,
                        help="Host headers to accept when serving beyond localhost, e.g. mlflow.example.org")
    server.add_argument("--dry-run", action="store_true", help="check the stores and print the command only")
    return server


def run(args: argparse.Namespace) -> int:
    from cdi import server

    config = server.ServerConfig(
        backend_store_uri=args.backend_store_uri, artifacts_destination=args.artifacts_destination,
        host=args.host, port=args.port, workers=args.workers, app_name=args.app_name,
        s3_endpoint_url=args.s3_endpoint_url, allowed_hosts=args.allowed_hosts,
    )
    server.check(config)
    print(config.shell_line(), flush=True)
    if not args.dry_run:
        server.exec_server(config)
    return 0
