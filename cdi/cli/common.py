"""What every `cdi` subcommand shares: the parser class, the option groups that must mean the same in every
subcommand (compute, tracking, output), and the helpers that run around a command (threads, output files,
quiet libraries, signals).

A subcommand module (`cdi/cli/<name>.py`) provides `add_parser(commands)`, which builds its options from these
groups and sets `run`, and `run(args) -> int`. `cdi.cli.main` parses, dispatches and turns `CDIError` into one
line with exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from cdi.errors import Interrupted, OptionError
from cdi.options import ACCESS_LEVELS, count, positive_int

DEVICES = ("auto", "cpu", "cuda")


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad option on one line with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def add_compute_options(parser, *, batch_size: int) -> None:
    """--batch-size, --device, --threads: how the model passes run (the same type, check and meaning in every
    subcommand and pipeline; only the default batch size differs). `parser`: a parser (the options get a
    "compute" group) or an argument group of one."""
    group = parser.add_argument_group("compute") if isinstance(parser, argparse.ArgumentParser) else parser
    group.add_argument("--batch-size", type=positive_int, default=batch_size,
                       help=f"images per batch of model passes (default {batch_size}; halved on out-of-memory)")
    group.add_argument("--device", choices=DEVICES, default="auto", help="auto (CUDA when present), cpu or cuda")
    group.add_argument("--threads", type=count, default=0, help="CPU threads for torch (default 0: torch's choice)")


def add_tracking_options(parser: argparse.ArgumentParser, *, experiment: str | None = None) -> None:
    """--tracking-uri (and --experiment where the command creates runs)."""
    group = parser.add_argument_group("tracking")
    group.add_argument("--tracking-uri", default=None,
                       help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    if experiment is not None:
        group.add_argument("--experiment", default=experiment, help=f"MLflow experiment (default {experiment})")


def add_format_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=("text", "json"), default="text", dest="output_format",
                        help="text (default) or json: one JSON object on stdout, for scripts and CI")


def add_progress_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def add_access_option(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    parser.add_argument("--access", choices=ACCESS_LEVELS, default="white",
                        help=help or "gray: the features that need only noise predictions; white: all, including "
                                     "those that need input gradients (default)")


def add_reference_option(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--reference-model", action="append", default=[], metavar="DIR", dest="reference_models",
                        help=help)


def set_threads(threads: int) -> None:
    if threads < 0:
        raise OptionError(f"--threads {threads}: must be 0 (torch's default) or a positive count")
    if threads:
        import torch

        torch.set_num_threads(threads)


def check_output_path(path: Path | None) -> None:
    """Refuse, before any model pass, an --output file that cannot be written."""
    if path is None:
        return
    parent = path.parent if str(path.parent) else Path(".")
    try:
        if path.is_dir():
            raise OptionError(f"--output {path}: is a directory; give a file name such as result.json")
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise OptionError(f"--output {path}: folder {parent} does not exist or is not writable; "
                              "choose another path")
        # Open it now, as the audit will at the end: a read-only file or a name the file system refuses
        # must fail before any model pass, not after a finished run.
        existed = path.exists()
        with path.open("a"):
            pass
        if not existed:
            path.unlink()
    except OSError as exc:
        raise OptionError(f"--output {path}: cannot be written ({exc.strerror or exc}); choose another path") from exc


def write_output(path: Path, text: str, run_id: str | None = None) -> None:
    """Write `path` atomically (a temporary file beside it, then a rename): a full disk or a lost mount leaves
    the old file or none, never half a JSON; a failure is one line naming the run that holds the result."""
    import tempfile

    target = Path(path)
    holder = f"; the audit itself finished: run {run_id} holds result.json" if run_id else ""
    try:
        if target.exists() and not target.is_file():  # /dev/full, a FIFO: write in place, no rename over it
            with target.open("w") as handle:
                handle.write(text)
                handle.flush()
            return
        handle = tempfile.NamedTemporaryFile("w", dir=target.parent if str(target.parent) else ".",
                                             prefix=f".{target.name}.", suffix=".tmp", delete=False)
        try:
            with handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(handle.name, target)
        except BaseException:
            Path(handle.name).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise OptionError(f"--output {target}: cannot be written ({exc.strerror or type(exc).__name__}){holder}; "
                          "free space or choose another path") from None


def quiet_libraries(verbose: bool) -> None:
    """Keep the output to cdi's own lines; --verbose shows what the libraries say."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if verbose:
        return
    warnings.filterwarnings("ignore")
    # MLflow's artifact download/upload bars on stderr ("Downloading artifacts: 100%") are not cdi's output.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Import first: these libraries set their own logger levels at import time.
    import diffusers
    import lightning  # noqa: F401
    import mlflow  # noqa: F401

    diffusers.utils.logging.set_verbosity_error()
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "alembic", "mlflow"):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextmanager
def signals_raise_interrupted(enabled: bool = True) -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise cdi.errors.Interrupted in the main thread, so the audit's run
    is marked KILLED, the cache keeps every finished batch and the exit code is 128 + signal; the old handlers
    come back afterwards. Shared by `cdi` and the pipelines."""
    import threading

    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Interrupted(signum)

    old = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    for signum in old:
        signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, previous in old.items():
            signal.signal(signum, previous)
