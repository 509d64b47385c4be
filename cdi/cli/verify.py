"""`cdi verify`: re-hash the model, its references and the images against an audit's manifest."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cdi.cli.common import add_format_option, add_reference_option, add_tracking_options

NAME, HELP = "verify", "re-hash model and images against an audit's manifest"


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    verify = commands.add_parser(NAME, help=HELP)
    verify.set_defaults(run=run)
    verify.add_argument("run_id", help="MLflow run id of the audit")
    verify.add_argument("--model", required=True, help="the audited pipeline directory")
    verify.add_argument("--suspect", required=True, help="the audited suspect folder")
    verify.add_argument("--control", required=True, help="the audited control folder")
    add_tracking_options(verify)
    add_reference_option(verify, "the audit's reference models, in its order (default: the paths the manifest records)")
    verify.add_argument("--lora", type=Path, default=None, metavar="FILE", help="the audit's LoRA file")
    add_format_option(verify)
    return verify


def run(args: argparse.Namespace) -> int:
    from cdi import tracking
    from cdi.manifest import verify

    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    manifest = tracking.download_json(args.run_id, "manifest.json", uri)
    found = verify(manifest, args.model, args.suspect, args.control, args.reference_models, args.lora)
    if args.output_format == "json":
        print(json.dumps({"run_id": args.run_id, "verified": found.ok, "checked_files": found.checked_files,
                          "differences": found.differences}))
        return 0 if found.ok else 1
    for difference in found.differences:
        print(f"mismatch: {difference}")
    if found.ok:
        print(f"verified: {found.checked_files} files match the manifest of run {args.run_id}")
        return 0
    print(f"{len(found.differences)} difference(s) from the manifest of run {args.run_id}")
    return 1
