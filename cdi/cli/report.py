"""`cdi report`: rebuild the HTML report of a past audit from its run's artifacts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cdi.cli.common import add_format_option, add_tracking_options, check_output_path

NAME, HELP = "report", "rebuild the HTML report of a past audit"


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    report = commands.add_parser(NAME, help=HELP)
    report.set_defaults(run=run)
    report.add_argument("run_id", help="MLflow run id of the audit")
    report.add_argument("--output", type=Path, default=None, help="HTML file (default report-<run id>.html)")
    add_tracking_options(report)
    add_format_option(report)
    return report


def run(args: argparse.Namespace) -> int:
    from cdi import tracking
    from cdi.report import write_report

    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    output = args.output or Path(f"report-{args.run_id}.html")
    check_output_path(output)
    result = tracking.download_json(args.run_id, "result.json", uri)
    table = tracking.download_table(args.run_id, "features.csv", uri)
    write_report(result, table, output)
    if args.output_format == "json":
        print(json.dumps({"report": str(output), "run_id": args.run_id, "verdict": result["verdict"],
                          "p_value": result["p_value"]}, allow_nan=False))
        return 0
    print(f"report: {output} (verdict {result['verdict']}, p = {result['p_value']:.3g})")
    return 0
