"""`cdi` command line. Thin: parse, call the library, print. User errors: one line, exit code 2.

One module per subcommand (`cdi/cli/audit.py`, `search.py`, `calibrate.py`, `report.py`, `verify.py`,
`server.py`), each with `add_parser(commands)` and `run(args)`; the option groups every subcommand shares
(`--batch-size`, `--device`, `--threads`, `--tracking-uri`, `--format`) and the helpers around a command live
in `cdi/cli/common.py`.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Sequence

from cdi.cli import audit, calibrate, report, search, server, verify
from cdi.cli.common import (Parser, check_output_path, quiet_libraries, set_threads, signals_raise_interrupted,
                            write_output)
from cdi.errors import CDIError, Interrupted

#: The subcommands, in the order `cdi --help` lists them.
COMMANDS = (audit, report, calibrate, search, server, verify)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Every subcommand's parser, or with `only` that one's in full and the others as their names and help
    lines (building a parser imports what its options list: the audit's imports torch, which `cdi server`
    and `cdi report` need not wait for)."""
    parser = Parser(prog="cdi", description="Was this image set used to train this diffusion model?")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in COMMANDS:
        if only is None or command.NAME == only:
            command.add_parser(commands)
        else:
            commands.add_parser(command.NAME, help=command.HELP)
    return parser


def _named_command(argv: Sequence[str]) -> str | None:
    """The subcommand `argv` names (its first word that is not an option), if it is one."""
    first = next((word for word in argv if not word.startswith("-")), None)
    return first if first in {command.NAME for command in COMMANDS} else None


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_named_command(argv)).parse_args(argv)
    if args.command != "server":  # the server becomes MLflow's process: loading torch first only costs seconds
        quiet_libraries(args.verbose)
    try:
        with signals_raise_interrupted(args.command != "server"):
            return args.run(args)
    except CDIError as exc:
        sys.stderr.write(f"cdi: error: {exc}\n")
        return exc.exit_code
    except (Interrupted, KeyboardInterrupt) as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        run_id = getattr(exc, "run_id", None)
        name = signal.Signals(signum).name
        if run_id:
            sys.stderr.write(f"cdi: interrupted by {name}: run {run_id} is marked KILLED; finished feature batches "
                             f"are cached: rerun the same command with --resume {run_id} to finish it\n")
        else:
            sys.stderr.write(f"cdi: interrupted by {name}; finished feature batches are cached: rerun the same "
                             "command to go on from them\n")
        return 128 + signum


__all__ = ["COMMANDS", "Parser", "build_parser", "check_output_path", "main", "quiet_libraries", "set_threads",
           "signals_raise_interrupted", "write_output"]
