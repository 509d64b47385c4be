"""The owner's full audit: calibrate on a reference model with known membership -> search -> audit -> report.

    python -m pipelines.owner_audit --model M --suspect P --control U \\
        --reference-model R --members R_MEMBERS --nonmembers R_NONMEMBERS[,MORE]
    mlflow run pipelines -e owner_audit --env-manager local -P model=M -P suspect=P ...

1. calibrate: `cdi.calibrate.run_calibration` on the reference model R, whose training set is known:
   the false-positive rate of null audits and the power on its members and non-members;
2. search: `cdi.search.run_search` on that calibration data (R, its members, its non-members), over
   `--space`; the run holds `best_config.yaml`;
3. audit: `cdi.audit.audit(model, suspect, control, search_config=...)` with that configuration, as
   `cdi audit --from-search RUN_ID`. An image of P or U that was calibration data is refused: the
   configuration must not be judged on the images it was chosen on;
4. report: copies the audit's `report.html` (the page `cdi report RUN_ID` renders: rendering it again would
   give the same page) and adds `summary.md`, the chain's account: the calibration's false-positive rate,
   the configuration chosen, the verdict, each step's run. `--report` / `--output` get local copies.

Every step is a run under one parent run, reused when it already ran (`pipelines.steps`).

With none of the model and sets given, the bundled demo: its one model (demo/model) was trained on
demo/members, so the known-membership calibration data and the audited sets are disjoint halves of the
demo folders (`demo_sets`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from cdi import tracking
from cdi.tracking import calibration as calibration_layout
from cdi.errors import OptionError
from cdi.hashing import sha256_text
from pipelines.steps import (
    REPO, Pipeline, RunOptions, StepContext, StepRecord, add_run_options, download_artifact, file_digest,
    images_digest, model_digest, optional_path, optional_text, pipeline_run, publish, run_command, scratch_folder,
    write_pipeline_result,
)

NAME = "owner_audit"
DEMO = REPO / "demo"
#: The demo's split into calibration data and audited sets: `cdi.search.labelled_data.held_out` with this seed.
DEMO_SPLIT_SEED = 0
CALIBRATION_ARTIFACT = calibration_layout.ARTIFACT
REPORT_ARTIFACT = "report.html"
SUMMARY_ARTIFACT = "summary.md"
SET_OPTIONS = ("model", "suspect", "control", "reference_model", "members", "nonmembers")


@dataclass
class OwnerAuditOutcome:
    parent_run_id: str
    tracking_uri: str
    steps: list[StepRecord]
    result: dict[str, Any]  # the audit's result.json
    summary: str  # the report step's summary.md
    sets: dict[str, Any]  # the model and folders of each step (the demo: the prepared halves)


def demo_sets(work_dir: str | Path) -> dict[str, Any]:
    """The demo as an owner's data: P (`suspect`) and calibration members are disjoint halves of demo/members,
    U (`control`) and calibration non-members halves of demo/heldout, with all of demo/heldout2 added to the
    non-members. Chosen by content (`held_out`), copied once into a folder of `work_dir` named by the digest
    of the demo folders."""
    from cdi.data import discover_images
    from cdi.search.labelled_data import held_out

    folders = {name: DEMO / name for name in ("members", "heldout", "heldout2")}
    digest = sha256_text(json.dumps({name: images_digest(path, f"demo/{name}") for name, path in folders.items()}
                                    | {"split_seed": DEMO_SPLIT_SEED}, sort_keys=True))
    target = Path(work_dir) / f"demo-sets-{digest[:16]}"
    if not target.is_dir():
        members = discover_images(folders["members"], "suspect")
        heldout = discover_images(folders["heldout"], "control")
        known = {r.sha256 for r in held_out(members, 0.5, DEMO_SPLIT_SEED)}
        unknown = {r.sha256 for r in held_out(heldout, 0.5, DEMO_SPLIT_SEED + 1)}
        layout = {
            "members": [r for r in members if r.sha256 in known],
            "suspect": [r for r in members if r.sha256 not in known],
            "nonmembers": [r for r in heldout if r.sha256 in unknown] + discover_images(folders["heldout2"], "control"),
            "control": [r for r in heldout if r.sha256 not in unknown],
        }
        scratch = scratch_folder(Path(work_dir), target.name)
        for name, records in layout.items():
            (scratch / name).mkdir()
            for record in records:
                shutil.copy2(record.path, scratch / name / record.path.name)
        publish(scratch, target)
    return {"model": DEMO / "model", "reference_model": DEMO / "model", "suspect": target / "suspect",
            "control": target / "control", "members": target / "members", "nonmembers": [target / "nonmembers"]}


def _sets(work_dir: Path, **given: Any) -> tuple[dict[str, Any], bool]:
    """The model and folders to use, and whether they are the demo's."""
    missing = [name for name in SET_OPTIONS if not given[name]]
    if len(missing) == len(SET_OPTIONS):
        return demo_sets(work_dir), True
    if missing:
        named = ", ".join(f"--{name.replace('_', '-')}" for name in missing)
        raise OptionError(f"{named}: missing; give the model, both sets and the reference model with its members "
                          "and non-members (or none of them for the bundled demo)")
    sets = {name: Path(given[name]) for name in SET_OPTIONS if name != "nonmembers"}
    sets["nonmembers"] = [Path(folder) for folder in given["nonmembers"]]
    return sets, False


def check_disjoint(sets: dict[str, Any]) -> None:
    """Refuse P or U images that are also calibration data, before the calibration's minutes (the audit would
    refuse them after): a configuration must not be judged on the images it was chosen on."""
    from cdi.data import discover_images
    from cdi.errors import ImageSetError

    calibration = {r.sha256: r.path for folder in [sets["members"], *sets["nonmembers"]]
                   for r in discover_images(folder, "control", "--members/--nonmembers")}
    for option in ("suspect", "control"):
        for record in discover_images(sets[option], option):
            if record.sha256 in calibration:
                raise ImageSetError(f"{record.path}: the same image as calibration image {calibration[record.sha256]}; "
                                    "the reference model's members and non-members must be other images than P and U "
                                    "(a configuration must not be judged on the images it was chosen on)")


def owner_audit(
    model: str | Path | None = None,
    suspect: str | Path | None = None,
    control: str | Path | None = None,
    reference_model: str | Path | None = None,
    members: str | Path | None = None,
    nonmembers: Sequence[str | Path] = (),
    *,
    space: str | Path | None = None,
    access: str = "white",
    n_trials: int = 40,
    n: int = 40,
    member_fraction: float | None = None,
    search_resamples: int = 10,
    null_audits: int = 100,
    calibration_resamples: int = 20,
    calibration_permutations: int = 199,
    alpha: float = 0.01,
    permutations: int = 1000,
    power_resamples: int = 100,
    seed: int = 0,
    run: RunOptions = RunOptions(),
) -> OwnerAuditOutcome:
    """Run (or reuse) calibrate, search, audit and report; see the module docstring.

    `space`: a search space YAML (default: the built-in space of `access`). `member_fraction`: share of members
    on the suspect side of the search's resamples (default 1; the demo's 0.25, as `cdi search` on the demo).
    `run`: where the runs and folders go and how features are computed, so not part of any step's reuse key.
    """
    from cdi.audit import check_permutations
    from cdi.search.run import DEMO_MEMBER_FRACTION, load_space

    work = run.work
    sets, demo = _sets(work, model=model, suspect=suspect, control=control, reference_model=reference_model,
                       members=members, nonmembers=list(nonmembers))
    check_permutations(permutations, alpha, "permutation")  # before the calibration's minutes, not after
    check_disjoint(sets)
    search_space = load_space(space, access)
    if member_fraction is None:
        member_fraction = DEMO_MEMBER_FRACTION if demo else 1.0
    settings = {
        "space": str(space) if space else f"built-in {access}", "n_trials": n_trials, "n": n,
        "member_fraction": member_fraction, "search_resamples": search_resamples, "null_audits": null_audits,
        "calibration_resamples": calibration_resamples, "calibration_permutations": calibration_permutations,
        "alpha": alpha, "permutations": permutations, "power_resamples": power_resamples, "seed": seed,
    }
    where = {name: [str(Path(v).resolve()) for v in value] if isinstance(value, list) else str(Path(value).resolve())
             for name, value in sets.items()}
    recorded = {**where, **settings, "demo": demo}

    with pipeline_run(NAME, tracking_uri=run.tracking_uri, experiment=run.experiment, params=recorded,
                      echo=run.echo) as pipeline:
        calibrated = _calibrate(pipeline, sets, search_space.access, seed, null_audits, calibration_resamples,
                                calibration_permutations, run)
        searched = _search(pipeline, calibrated, sets, space, access, n_trials=n_trials, n=n,
                           member_fraction=member_fraction, n_resamples=search_resamples, alpha=alpha, seed=seed,
                           run=run)
        audited = _audit(pipeline, searched, sets, alpha=alpha, permutations=permutations,
                         power_resamples=power_resamples, run=run)
        reported = _report(pipeline, calibrated, searched, audited, alpha)
        result = tracking.download_json(audited.run_id, "result.json", pipeline.tracking_uri)
        summary = _artifact_text(pipeline, reported.run_id, SUMMARY_ARTIFACT)
        pipeline.describe(summary)
        pipeline.client.set_tag(pipeline.parent_run_id, "cdi.verdict", result["verdict"])
        pipeline.client.log_metric(pipeline.parent_run_id, "p_value", float(result["p_value"]))
    return OwnerAuditOutcome(parent_run_id=pipeline.parent_run_id, tracking_uri=pipeline.tracking_uri,
                             steps=list(pipeline.records), result=result, summary=summary, sets=sets)


def _calibrate(pipeline: Pipeline, sets: dict[str, Any], access: str, seed: int, null_audits: int, resamples: int,
               permutations: int, run: RunOptions) -> StepRecord:
    reference, members, nonmembers = sets["reference_model"], sets["members"], sets["nonmembers"]
    inputs = {"reference_model": model_digest(reference), "members": images_digest(members, "--members"),
              "nonmembers": [images_digest(folder, "--nonmembers") for folder in nonmembers]}

    def execute(step: StepContext) -> dict[str, Any]:
        from cdi.calibrate import run_calibration

        run_calibration(reference, members, nonmembers, access=access, seed=seed, n_null=null_audits,
                        n_resamples=resamples, n_permutations=permutations, tracking_uri=step.tracking_uri,
                        **run.compute())
        return {"reference_model": str(Path(reference).resolve()), "members": str(Path(members).resolve()),
                "nonmembers": [str(Path(folder).resolve()) for folder in nonmembers],
                "model_fingerprint": inputs["reference_model"], "calibration": CALIBRATION_ARTIFACT}

    return pipeline.step("calibrate", inputs=inputs, execute=execute, params={
        "access": access, "seed": seed, "null_audits": null_audits, "resamples": resamples,
        "permutations": permutations})


def _search(pipeline: Pipeline, calibrated: StepRecord, sets: dict[str, Any], space: str | Path | None, access: str,
            *, n_trials: int, n: int, member_fraction: float, n_resamples: int, alpha: float, seed: int,
            run: RunOptions) -> StepRecord:
    """The search on the calibration step's data: its reference model, members and non-members, read where they
    are now (the calibration step's key holds their digests, so they are the images it calibrated on)."""
    inputs = {"space": file_digest(space) if space else f"built-in {access}"}

    def execute(step: StepContext) -> dict[str, Any]:
        from cdi.search import CONFIG_ARTIFACT, run_search

        outcome = run_search(model=sets["reference_model"], members=sets["members"], nonmembers=sets["nonmembers"],
                             space=space, access=access, n_trials=n_trials, n=n, member_fraction=member_fraction,
                             n_resamples=n_resamples, alpha=alpha, seed=seed, tracking_uri=step.tracking_uri,
                             **run.compute())
        config = outcome.config
        return {"config": CONFIG_ARTIFACT, "features": list(config.features), "C": config.C, "penalty": config.penalty,
                "folds": config.folds, "access": config.access, "objective": config.objective}

    return pipeline.step("search", inputs=inputs, upstream=[calibrated], execute=execute, params={
        "n_trials": n_trials, "n": n, "member_fraction": member_fraction, "resamples": n_resamples, "alpha": alpha,
        "seed": seed})


def _audit(pipeline: Pipeline, searched: StepRecord, sets: dict[str, Any], *, alpha: float, permutations: int,
           power_resamples: int, run: RunOptions) -> StepRecord:
    """`cdi audit --from-search <search run>` of the model on P and U."""
    model, suspect, control = sets["model"], sets["suspect"], sets["control"]
    inputs = {"model": model_digest(model), "suspect": images_digest(suspect, "--suspect"),
              "control": images_digest(control, "--control")}

    def execute(step: StepContext) -> dict[str, Any]:
        from cdi.audit import REPORT_ARTIFACT as AUDIT_REPORT
        from cdi.audit import audit
        from cdi.search import download_config

        config = download_config(searched.run_id, step.tracking_uri)
        result = audit(model, suspect, control, alpha=alpha, n_permutations=permutations,
                       power_resamples=power_resamples, search_config=config, tracking_uri=step.tracking_uri,
                       extraction=run.extraction())
        return {"verdict": result.verdict, "p_value": result.p_value, "result": "result.json", "report": AUDIT_REPORT}

    return pipeline.step("audit", inputs=inputs, upstream=[searched], execute=execute, params={
        "alpha": alpha, "permutations": permutations, "power_resamples": power_resamples, "test": "permutation"})


def _report(pipeline: Pipeline, calibrated: StepRecord, searched: StepRecord, audited: StepRecord,
            alpha: float) -> StepRecord:
    """The audit's report.html, and summary.md: the chain in one page."""

    def execute(step: StepContext) -> dict[str, Any]:
        uri = step.tracking_uri
        result = tracking.download_json(audited.run_id, "result.json", uri)
        calibration = tracking.download_json(calibrated.run_id, CALIBRATION_ARTIFACT, uri)
        summary = summary_markdown(calibrated, searched, audited, result, calibration, alpha)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            page = pipeline.download(audited.run_id, audited.outputs["report"], folder / "audit")
            shutil.copyfile(page, folder / REPORT_ARTIFACT)
            (folder / SUMMARY_ARTIFACT).write_text(tracking.redact_text(summary, uri))
            for name in (REPORT_ARTIFACT, SUMMARY_ARTIFACT):
                pipeline.client.log_artifact(step.run_id, str(folder / name))
        pipeline.client.set_tag(step.run_id, "mlflow.note.content", tracking.redact_text(summary, uri))
        return {"report": REPORT_ARTIFACT, "summary": SUMMARY_ARTIFACT, "verdict": result["verdict"],
                "p_value": result["p_value"]}

    return pipeline.step("report", inputs={}, params={}, upstream=[calibrated, searched, audited], execute=execute)


def _false_positive(calibration: dict[str, Any], alpha: float) -> dict[str, Any] | None:
    """The calibration's permutation-test row at the alpha nearest the audit's."""
    rows = [row for row in calibration.get("false_positive", []) if row["test"] == "permutation"]
    return min(rows, key=lambda row: abs(row["alpha"] - alpha)) if rows else None


def summary_markdown(calibrated: StepRecord, searched: StepRecord, audited: StepRecord, result: dict[str, Any],
                     calibration: dict[str, Any], alpha: float) -> str:
    comparison = "<" if result["verdict"] == "used" else ">="
    lines = [f"# Owner audit: {result['verdict']} (p = {result['p_value']:.3g} {comparison} alpha = {result['alpha']})",
             "", "| step | run | what it found |", "|---|---|---|"]
    row = _false_positive(calibration, alpha)
    data = calibrated.outputs
    fpr = (f"false-positive rate {row['rate']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}] at alpha "
           f"{row['alpha']} over {row['n_audits']} null audits" if row else "no permutation null audits")
    lines.append(f"| calibrate | `{calibrated.run_id}` | reference model `{data['reference_model']}` "
                 f"(known members `{data['members']}`): {fpr} |")
    chosen, objective = searched.outputs, searched.outputs.get("objective", {})
    lines.append(f"| search | `{searched.run_id}` | {len(chosen['features'])} features "
                 f"{', '.join(chosen['features'])}; "
                 f"C {chosen['C']:.3g}, penalty {chosen['penalty']}, folds {chosen['folds']}; mean -log10 p "
                 f"{objective.get('value', float('nan')):.3g}, power {objective.get('power', float('nan')):.2f} on the "
                 "calibration data |")
    lines.append(f"| audit | `{audited.run_id}` | {result['verdict']}, p = {result['p_value']:.3g}, "
                 f"{result['n_suspect']} suspect vs {result['n_control']} control images, test {result['test']}; "
                 f"its `report.html` |")
    warnings = list(result.get("warnings", []))
    if row and row["ci_low"] > row["alpha"]:
        warnings.append(f"on the reference model the false-positive rate's 95 % interval lies above alpha "
                        f"{row['alpha']}: the test is not calibrated on such data; do not rely on a 'used' verdict")
    if warnings:
        lines += ["", "## Warnings", "", *(f"- {warning}" for warning in warnings)]
    return "\n".join(lines) + "\n"


def _artifact_text(pipeline: Pipeline, run_id: str, artifact: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        return pipeline.download(run_id, artifact, tmp).read_text()


# -- command line ------------------------------------------------------------------------------------------------


def _folders(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _fraction(text: str) -> float | None:
    return None if text in ("", "auto") else float(text)


def build_parser() -> argparse.ArgumentParser:
    from cdi.cli import Parser
    from cdi.options import count as _count
    from cdi.options import positive_int as _positive_int

    parser = Parser(prog="python -m pipelines.owner_audit", description=__doc__.split("\n")[0])
    sets = parser.add_argument_group("model and sets (all, or none for the bundled demo)")
    sets.add_argument("--model", type=optional_text, default=None,
                      help="the suspect model (diffusers pipeline directory)")
    sets.add_argument("--suspect", type=optional_text, default=None, help="P: the published images")
    sets.add_argument("--control", type=optional_text, default=None, help="U: unpublished images, same distribution")
    sets.add_argument("--reference-model", type=optional_text, default=None,
                      help="a model whose training set is known (same recipe as the suspect model)")
    sets.add_argument("--members", type=optional_text, default=None, help="images the reference model was trained on")
    sets.add_argument("--nonmembers", type=_folders, default=[],
                      help="comma-separated folders of images the reference model was not trained on")
    search = parser.add_argument_group("calibrate and search")
    search.add_argument("--space", type=optional_text, default=None,
                        help="search space YAML (default: built in, --access)")
    search.add_argument("--access", choices=("gray", "white"), default="white", help="built-in space (default white)")
    search.add_argument("--n-trials", type=_positive_int, default=40, help="search trials (default 40)")
    search.add_argument("--n", type=_positive_int, default=40,
                        help="images per side in each search resample (default 40)")
    search.add_argument("--member-fraction", type=_fraction, default=None,
                        help="share of members on the suspect side of each search resample (default 1; demo 0.25)")
    search.add_argument("--search-resamples", type=_positive_int, default=10, help="resamples per trial (default 10)")
    search.add_argument("--null-audits", type=_positive_int, default=100, help="calibration null audits (default 100)")
    search.add_argument("--calibration-resamples", type=_positive_int, default=20,
                        help="calibration resamples per power point (default 20)")
    search.add_argument("--calibration-permutations", type=_positive_int, default=199,
                        help="permutations per simulated permutation test (default 199)")
    audit = parser.add_argument_group("audit")
    audit.add_argument("--alpha", type=float, default=0.01, help="significance level (default 0.01)")
    audit.add_argument("--permutations", type=_positive_int, default=1000, help="permutations (default 1000)")
    audit.add_argument("--power-resamples", type=_count, default=100, help="power-curve resamples (default 100)")
    audit.add_argument("--seed", type=_count, default=0, help="seed of calibration and search, hence of the audit")
    audit.add_argument("--report", type=optional_path, default=None, help="also write the audit's report.html here")
    audit.add_argument("--output", type=optional_path, default=None, help="also write the result JSON here")
    add_run_options(parser, work="folders the pipeline makes")
    return parser


def _run(args: argparse.Namespace) -> int:
    from cdi.cli import check_output_path, set_threads, write_output

    for path in (args.report, args.output):
        check_output_path(path)
    set_threads(args.threads)
    outcome = owner_audit(
        args.model, args.suspect, args.control, args.reference_model, args.members, args.nonmembers,
        space=args.space, access=args.access, n_trials=args.n_trials, n=args.n, member_fraction=args.member_fraction,
        search_resamples=args.search_resamples, null_audits=args.null_audits,
        calibration_resamples=args.calibration_resamples, calibration_permutations=args.calibration_permutations,
        alpha=args.alpha, permutations=args.permutations, power_resamples=args.power_resamples, seed=args.seed,
        run=RunOptions.from_args(args),
    )
    result = outcome.result
    comparison = "<" if result["verdict"] == "used" else ">="
    print(f"verdict: {result['verdict']} (p = {result['p_value']:.3g} {comparison} alpha = {result['alpha']})")
    for warning in result.get("warnings", []):
        print(f"WARNING: {warning}")
    report_run = outcome.steps[-1].run_id
    print(f"pipeline run: {outcome.parent_run_id} (tracking URI {tracking.redact_uri(outcome.tracking_uri)}); "
          f"report: runs:/{report_run}/{REPORT_ARTIFACT}")
    if args.report is not None:
        with tempfile.TemporaryDirectory() as tmp:
            page = download_artifact(report_run, REPORT_ARTIFACT, tmp, outcome.tracking_uri)
            write_output(args.report, page.read_text(), result["run_id"])
        print(f"report: {args.report}")
    if args.output is not None:
        write_pipeline_result(args.output, result, outcome)
        print(f"result: {args.output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("owner_audit", args.verbose, lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
