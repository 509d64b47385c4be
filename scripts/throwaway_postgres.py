"""Start or stop a throwaway PostgreSQL cluster on 127.0.0.1, for tests and CI only.

    python scripts/throwaway_postgres.py start DIR   # prints postgresql://postgres@127.0.0.1:PORT/postgres
    python scripts/throwaway_postgres.py stop DIR

Uses the server binaries of the Debian `postgresql` package (/usr/lib/postgresql/<version>/bin,
newest version first; $PG_BIN overrides). `initdb` refuses to run as root, so as root the cluster
belongs to the `postgres` system user the package creates. The cluster trusts every local
connection (no password) and listens on 127.0.0.1 only, on a free port; its socket lives in DIR.
DIR's parents must let that user through: use a fresh `mktemp -d` under /tmp. `stop` deletes DIR.
Exit code 3 when the binaries are missing, so callers can skip instead of fail.
"""

from __future__ import annotations

import argparse
import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
from pathlib import Path

MISSING = 3


def postgres_bin() -> Path | None:
    """Folder holding initdb and pg_ctl, or None when PostgreSQL's server is not installed."""
    candidates = [os.environ["PG_BIN"]] if os.environ.get("PG_BIN") else []
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    candidates += [str(Path(found).parent) for found in [shutil.which("initdb")] if found]
    for folder in candidates:
        if (Path(folder) / "initdb").exists() and (Path(folder) / "pg_ctl").exists():
            return Path(folder)
    return None


def _owner() -> str | None:
    """The user that runs the cluster: `postgres` when we are root, else ourselves (None)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise SystemExit("running as root and there is no `postgres` user: install the postgresql package") from None
    return "postgres"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(root: Path) -> str:
    """initdb + pg_ctl start in `root`; return the superuser URL."""
    folder = postgres_bin()
    if folder is None:
        print("PostgreSQL server binaries (initdb, pg_ctl) not found under /usr/lib/postgresql/*/bin; "
              "install the Debian package `postgresql`", file=sys.stderr)
        raise SystemExit(MISSING)
    owner = _owner()
    root.mkdir(parents=True, exist_ok=True)
    if owner is not None:
        shutil.chown(root, user=owner)
        root.chmod(0o700)  # its parents must let `postgres` through: use a folder under /tmp
    data, port = root / "data", _free_port()
    run = {"user": owner, "check": True, "stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "text": True}
    subprocess.run([str(folder / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                    "--no-sync"], **run)
    options = f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off -c max_connections=200"
    subprocess.run([str(folder / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "server.log"),
                    "-w", "-t", "60", "start"], **run)
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    (root / "url").write_text(url + "\n")
    return url


def stop(root: Path) -> None:
    folder = postgres_bin()
    if folder is None or not (root / "data").exists():
        return
    subprocess.run([str(folder / "pg_ctl"), "-D", str(root / "data"), "-m", "immediate", "-w", "stop"],
                   user=_owner(), check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("start", "stop"))
    parser.add_argument("root", type=Path, help="folder for the cluster's data, socket and log")
    args = parser.parse_args(argv)
    if args.action == "start":
        try:
            print(start(args.root.resolve()))
        except subprocess.CalledProcessError as exc:
            print(f"{Path(exc.cmd[0]).name} failed: {exc.stderr.strip()}", file=sys.stderr)
            return 1
    else:
        stop(args.root.resolve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
