"""`cdi` command line. Thin: parse, call the library, print. User errors: one line, exit code 2."""

from __future__ import annotations

import argparse
from contextlib import contextmanager
import json
import logging
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Iterator, Sequence

from cdi.errors import CDIError, Interrupted, OptionError
from cdi.options import comma_list as _features
from cdi.options import count as _count
from cdi.options import positive_int as _positive_int
from cdi.tracking import audit as audit_layout


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad option on one line with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="cdi", description="Was this image set used to train this diffusion model?")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    audit = commands.add_parser("audit", help="audit a model for use of a suspect image set")
    audit.add_argument("--model", required=True, help="diffusers pipeline directory (save_pretrained output)")
    audit.add_argument("--suspect", required=True, help="folder of published images P (suspected used)")
    audit.add_argument("--control", required=True, help="folder of unpublished images U, same distribution")
    audit.add_argument("--alpha", type=float, default=0.01, help="significance level (default 0.01)")
    audit.add_argument("--access", choices=("gray", "white"), default="white",
                       help="gray: the features that need only noise predictions; white: all, including "
                            "those that need input gradients (default)")
    audit.add_argument("--features", type=_features, default=None,
                       help="comma-separated subset of feature names (default: all for the access level); "
                            "an unknown name is answered with the list of known ones")
    audit.add_argument("--test", choices=("permutation", "welch"), default="permutation",
                       help="permutation (exact, default) or welch (the paper's protocol; anti-conservative)")
    audit.add_argument("--permutations", type=_positive_int, default=1000,
                       help="label permutations of the permutation test (default 1000)")
    audit.add_argument("--power-resamples", type=_count, default=100,
                       help="resamples per set size for the power curve (default 100; 0 skips it)")
    audit.add_argument("--seed", type=_count, default=0, help="seed of noise draws and folds (default 0)")
    audit.add_argument("--folds", type=_count, default=5, help="cross-fitting folds (default 5)")
    audit.add_argument("--batch-size", type=_positive_int, default=16, help="images per batch (default 16)")
    audit.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    audit.add_argument("--devices", type=_positive_int, default=1, help="devices per node (Lightning), default 1")
    audit.add_argument("--num-nodes", type=_positive_int, default=1, help="nodes (Lightning), default 1; every node must join within "
                       "$CDI_RENDEZVOUS_TIMEOUT seconds (default 300)")
    audit.add_argument("--strategy", default="auto",
                       help="Lightning strategy; default ddp_spawn when several devices, else single device")
    audit.add_argument("--precision", choices=("auto", "32", "bf16", "16"), default="auto",
                       help="autocast precision (auto: bf16 on CUDA where supported, else 16; 32 on CPU, where "
                            "bf16 is ~1.5x faster on CPUs with AVX512-BF16/AMX); features are kept in float32 "
                            "and cached per precision")
    audit.add_argument("--timestep-batching", choices=("auto", "on", "off"), default="auto",
                       help="make each feature family's model calls at several timesteps or draws of a batch as "
                            "fewer, larger calls (auto: on in bf16 on CPU, off in float32, whose features it "
                            "changes in the last bits, ~1e-6 relative; cached apart when on)")
    audit.add_argument("--cache-dir", default=None,
                       help="feature cache folder (default $CDI_CACHE_DIR, else ~/.cache/cdi/features)")
    audit.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    audit.add_argument("--threads", type=_count, default=0, help="CPU threads for torch (default 0: torch's choice)")
    audit.add_argument("--allow-pickle", action="store_true",
                       help="allow pickle (.bin/.pt/.ckpt) weights; they can run code: only for trusted models")
    audit.add_argument("--prompt", default=None,
                       help="caption for every image without one in metadata.jsonl (text-to-image models)")
    audit.add_argument("--class-label", default=None,
                       help="class id or name for every image without a label in metadata.jsonl")
    audit.add_argument("--latent-sample-seed", type=_count, default=None,
                       help="latent models: encode with a seeded VAE posterior sample (default: posterior mean)")
    audit.add_argument("--experiment", default=audit_layout.EXPERIMENT,
                       help=f"MLflow experiment (default {audit_layout.EXPERIMENT})")
    audit.add_argument("--tracking-uri", default=None,
                       help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    audit.add_argument("--output", type=Path, default=None, help="write the result JSON to this file")
    audit.add_argument("--resume", default=None, metavar="RUN_ID",
                       help="finish an audit run that stopped (e.g. tracking server lost); features come from the cache")
    audit.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    audit.add_argument("--format", choices=("text", "json"), default="text", dest="output_format",
                       help="text (default) or json: one JSON object on stdout, for scripts and CI")
    audit.add_argument("--reference-model", action="append", default=[], metavar="DIR", dest="reference_models",
                       help="a model not trained on the suspect images (e.g. the base model of a fine-tune), queried "
                            "with the same seeded noise to remove per-image difficulty; may be given more than once")
    audit.add_argument("--lora", type=Path, default=None, metavar="FILE",
                       help="LoRA weights (.safetensors) applied to --model: the audited model is base + LoRA, and "
                            "the base is the reference model unless --reference-model is given")
    audit.add_argument("--representation", choices=("raw", "calibrated", "both"), default="calibrated",
                       help="with reference models: score the calibrated features (default), the raw ones, or both")
    audit.add_argument("--reference-formula", choices=("difference", "log_ratio"), default="difference",
                       help="calibrated feature: target minus mean reference (default) or log ratio")
    audit.add_argument("--difficulty-calibration", choices=("off", "image"), default=None,
                       help="regress the features on label-free image statistics and score the residuals "
                            "(image) or not (off); default: see README")
    audit.add_argument("--duplicates", choices=("refuse", "keep-one"), default="refuse",
                       help="a picture found more than once (same file, or re-encoded, resized, lightly edited): "
                            "refuse the audit (default) or keep one copy per set; a picture in both sets is refused")
    chosen = audit.add_mutually_exclusive_group()
    chosen.add_argument("--config", type=Path, default=None,
                        help="best_config.yaml of a search: its features, access, folds and seed replace those options")
    chosen.add_argument("--from-search", default=None, metavar="RUN_ID",
                        help="as --config, with the best_config.yaml downloaded from this search run")
    report = commands.add_parser("report", help="rebuild the HTML report of a past audit")
    report.add_argument("run_id", help="MLflow run id of the audit")
    report.add_argument("--output", type=Path, default=None, help="HTML file (default report-<run id>.html)")
    report.add_argument("--tracking-uri", default=None)
    report.add_argument("--format", choices=("text", "json"), default="text", dest="output_format",
                       help="text (default) or json: one JSON object on stdout, for scripts and CI")

    calibrate = commands.add_parser("calibrate", help="false-positive rate and power on known members/non-members")
    calibrate.add_argument("--model", required=True)
    calibrate.add_argument("--members", required=True, help="folder of images the model was trained on")
    calibrate.add_argument("--nonmembers", required=True, type=_features,
                           help="comma-separated folders of images it was not trained on")
    calibrate.add_argument("--access", choices=("gray", "white"), default="white")
    calibrate.add_argument("--null-audits", type=_positive_int, default=500, help="null audits (default 500)")
    calibrate.add_argument("--resamples", type=_positive_int, default=100, help="resamples per power point")
    calibrate.add_argument("--permutations", type=_positive_int, default=199,
                           help="permutations per simulated permutation test (default 199)")
    calibrate.add_argument("--seed", type=_count, default=0)
    calibrate.add_argument("--batch-size", type=_positive_int, default=50)
    calibrate.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    calibrate.add_argument("--threads", type=_count, default=0)
    calibrate.add_argument("--tracking-uri", default=None)
    calibrate.add_argument("--output", type=Path, default=None, help="write the calibration JSON here")
    calibrate.add_argument("--no-progress", action="store_true")

    from cdi.search.cli import add_search_parser

    add_search_parser(commands)

    server = commands.add_parser("server", help="run the team's MLflow tracking server (PostgreSQL + S3)")
    server.add_argument("--backend-store-uri", required=True,
                        help="database of runs, e.g. postgresql://cdi@db.example:5432/mlflow")
    server.add_argument("--artifacts-destination", required=True,
                        help="where the server stores artifacts, e.g. s3://bucket/cdi (clients need no S3 access)")
    server.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1; 0.0.0.0 for all)")
    server.add_argument("--port", type=_count, default=5000, help="port (default 5000)")
    server.add_argument("--workers", type=_positive_int, default=4, help="worker processes (default 4)")
    server.add_argument("--app-name", choices=("basic-auth",), default=None,
                        help="basic-auth: users and passwords (MLflow's auth app; see MLFLOW_AUTH_CONFIG_PATH)")
    server.add_argument("--s3-endpoint-url", default=None,
                        help="S3-compatible endpoint such as MinIO (default $MLFLOW_S3_ENDPOINT_URL, else AWS)")
    server.add_argument("--allowed-hosts", default=None,
                        help="Host headers to accept when serving beyond localhost, e.g. mlflow.example.org")
    server.add_argument("--dry-run", action="store_true", help="check the stores and print the command only")

    verify = commands.add_parser("verify", help="re-hash model and images against an audit's manifest")
    verify.add_argument("run_id", help="MLflow run id of the audit")
    verify.add_argument("--model", required=True)
    verify.add_argument("--suspect", required=True)
    verify.add_argument("--control", required=True)
    verify.add_argument("--tracking-uri", default=None)
    verify.add_argument("--reference-model", action="append", default=[], metavar="DIR", dest="reference_models",
                        help="the audit's reference models, in its order (default: the paths the manifest records)")
    verify.add_argument("--lora", type=Path, default=None, metavar="FILE", help="the audit's LoRA file")
    verify.add_argument("--format", choices=("text", "json"), default="text", dest="output_format",
                       help="text (default) or json: one JSON object on stdout, for scripts and CI")
    return parser


def run_calibrate(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from cdi.calibrate import run_calibration

    check_output_path(args.output)
    set_threads(args.threads)
    run_id, result = run_calibration(
        args.model, args.members, args.nonmembers, access=args.access, seed=args.seed, batch_size=args.batch_size,
        device=args.device, n_null=args.null_audits, n_resamples=args.resamples, n_permutations=args.permutations,
        tracking_uri=args.tracking_uri, progress=not args.no_progress,
    )
    for row in result.false_positive:
        print(f"false-positive rate ({row['test']}, alpha {row['alpha']}): {row['rate']:.3f} "
              f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}] over {row['n_audits']} null audits")
    for row in result.power_vs_n:
        print(f"power at n = {row['n']}: {row['power']:.2f} (median p {row['median_p']:.2g})")
    for row in result.power_vs_contamination:
        print(f"power at contamination {row['contamination']}: {row['power']:.2f} (n = {row['n']})")
    print(f"run: {run_id}")
    if args.output:
        write_output(args.output, json.dumps(asdict(result), indent=2) + "\n", run_id)
    return 0


def set_threads(threads: int) -> None:
    if threads < 0:
        raise OptionError(f"--threads {threads}: must be 0 (torch's default) or a positive count")
    if threads:
        import torch

        torch.set_num_threads(threads)


def run_report(args: argparse.Namespace) -> int:
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


def run_server(args: argparse.Namespace) -> int:
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


def run_verify(args: argparse.Namespace) -> int:
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


def check_output_path(path: Path | None) -> None:
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


def run_audit(args: argparse.Namespace) -> int:
    from cdi.audit import audit

    check_output_path(args.output)
    set_threads(args.threads)
    search_config = _search_config(args)  # audit() applies it whole: features, access, folds, seed, scorer, ...
    result = audit(
        args.model,
        args.suspect,
        args.control,
        alpha=args.alpha,
        access=args.access,
        features=args.features,
        seed=args.seed,
        folds=args.folds,
        batch_size=args.batch_size,
        device=args.device,
        allow_pickle=args.allow_pickle,
        experiment=args.experiment,
        tracking_uri=args.tracking_uri,
        progress=not args.no_progress,
        cache_dir=args.cache_dir,
        use_cache=not args.no_cache,
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=args.strategy,
        precision=args.precision,
        timestep_batching=args.timestep_batching,
        threads=args.threads or None,  # also inside Lightning's DDP processes, which pick their own count
        prompt=args.prompt,
        class_label=args.class_label,
        latent_sample_seed=args.latent_sample_seed,
        resume_run_id=args.resume,
        test=args.test,
        n_permutations=args.permutations,
        power_resamples=args.power_resamples,
        search_config=search_config,
        reference_models=args.reference_models,
        lora=args.lora,
        representation=args.representation,
        reference_formula=args.reference_formula,
        difficulty_calibration=args.difficulty_calibration,
        duplicates=args.duplicates,
    )
    if result is None:
        if args.output_format != "json":
            print("features of this rank are in the cache; rank 0 reports the audit")
        return 0
    from cdi import tracking

    record = tracking.redact_value(result.to_dict(), tracking.resolve_tracking_uri(args.tracking_uri))
    if args.output_format == "json":  # the result JSON (docs/result.schema.json) and nothing else on stdout
        if args.output is not None:
            write_output(args.output, json.dumps(record, indent=2, sort_keys=True) + "\n", result.run_id)
        print(json.dumps(record, sort_keys=True, allow_nan=False))
        return 0
    comparison = "<" if result.verdict == "used" else ">="
    print(f"verdict: {result.verdict} (p = {result.p_value:.3g} {comparison} alpha = {result.alpha})")
    print(f"suspect: {result.n_suspect} images, control: {result.n_control} images, access: {result.access}, "
          f"test: {result.test}")
    for reference in result.extras.get("reference_models", []):
        role = " (the base of --lora)" if reference.get("base_of_lora") else ""
        print(f"reference model{role}: {reference['path']} (fingerprint {reference['fingerprint'][:12]})")
    calibration = result.extras.get("calibration") or {}
    if calibration.get("representation", "raw") != "raw" or calibration.get("difficulty_calibration", "off") != "off":
        print(f"calibration: representation {calibration['representation']}"
              + (f" ({calibration['reference_formula']})" if calibration.get("reference_formula") else "")
              + f", difficulty {calibration['difficulty_calibration']}")
    held_out = result.extras.get("excluded_calibration_images")
    if held_out:
        print(f"left out: {held_out['suspect']} suspect and {held_out['control']} control images held out as "
              f"calibration data of search run {held_out['search_run_id']}")
    for warning in result.extras.get("warnings", []):
        print(f"WARNING: {warning}")
    print(f"run: {result.run_id} (tracking URI {result.tracking_uri}, experiment {result.experiment})")
    for dropped in result.extras.get("duplicates_dropped", []):
        print(f"left out (duplicate): {dropped['set']} {dropped['path']}")
    if args.output is not None:
        write_output(args.output, json.dumps(record, indent=2, sort_keys=True) + "\n", result.run_id)
        print(f"result: {args.output}")
    return 0


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


def _search_config(args: argparse.Namespace):
    """The search result named by --config or --from-search, or None."""
    from cdi.search import SearchConfig, download_config

    if args.config is not None:
        return SearchConfig.read(args.config)
    if args.from_search:
        from cdi import tracking

        return download_config(args.from_search, tracking.resolve_tracking_uri(args.tracking_uri))
    return None


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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "server":  # the server becomes MLflow's process: loading torch first only costs seconds
        quiet_libraries(args.verbose)
    try:
        with signals_raise_interrupted(args.command != "server"):
            return _dispatch(args)
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


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "audit":
        return run_audit(args)
    if args.command == "report":
        return run_report(args)
    if args.command == "calibrate":
        return run_calibrate(args)
    if args.command == "verify":
        return run_verify(args)
    if args.command == "server":
        return run_server(args)
    if args.command == "search":
        from cdi.search.cli import run_search_command

        return run_search_command(args)
    return 1


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


if __name__ == "__main__":
    raise SystemExit(main())
