"""The demo's chain: train the demo target, then audit it.

    python -m pipelines.demo_chain                      # the bundled demo's recipe (about 6 min of training on 2 cores)
    python -m pipelines.demo_chain --steps 300          # quicker; a weaker target that may go undetected
    mlflow run pipelines -e demo_chain --env-manager local -P steps=300

1. train: `mlflow_projects/demo_target/train.py` (the script that made demo/), run in its own process into the
   step's run (MLFLOW_RUN_ID), writing model/, members/, heldout/, heldout2/ and split.json into a new
   folder; the folder is logged as the run's artifact `demo_target/` and published in the work folder as
   `demo-target-<key>` (the step's reuse key: its parameters and the script). A reused step whose folder is
   gone or changed gets it back from the artifact, without training;
2. audit: `cdi.audit.audit` of the trained model on members/ (P) against heldout/ (U).

Each step is a run under one parent run, reused when it already ran (`pipelines.steps`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from cdi import tracking
from cdi.errors import OptionError
from pipelines.steps import (
    write_pipeline_result,
    REPO, Pipeline, RunOptions, StepContext, StepRecord, add_run_options, download_artifact, file_digest,
    images_digest, model_digest, optional_path, pipeline_run, publish, run_command, scratch_folder,
)

NAME = "demo_chain"
TRAIN_SCRIPT = REPO / "mlflow_projects" / "demo_target" / "train.py"
TARGET_ARTIFACT = "demo_target"
#: sklearn's digits hold at least 174 images of each class; train.py deals the three folders round-robin.
DIGITS_PER_CLASS = 174


@dataclass
class DemoChainOutcome:
    parent_run_id: str
    tracking_uri: str
    steps: list[StepRecord]
    result: dict[str, Any]  # the audit's result.json
    folder: Path  # the trained target: model/, members/, heldout/, heldout2/, split.json


def _check(n_members: int, n_heldout: int, steps: int, batch_size: int, lr: float) -> None:
    from cdi.data import MIN_SET_SIZE

    if n_members < MIN_SET_SIZE or n_heldout < MIN_SET_SIZE:
        raise OptionError(f"--n-members {n_members} / --n-heldout {n_heldout}: the audit needs at least "
                          f"{MIN_SET_SIZE} images per set")
    per_class = -(-n_members // 10) + 2 * -(-n_heldout // 10)
    if per_class > DIGITS_PER_CLASS:
        raise OptionError(f"--n-members {n_members} with --n-heldout {n_heldout}: needs {per_class} digits of each "
                          f"class, sklearn's digits have {DIGITS_PER_CLASS}; ask for fewer")
    if steps < 1 or batch_size < 1 or not lr > 0:
        raise OptionError("--steps and --train-batch-size must be positive integers, --lr a positive number")


def demo_chain(
    *,
    n_members: int = 100,
    n_heldout: int = 100,
    steps: int = 2500,
    train_batch_size: int = 50,
    lr: float = 1e-3,
    train_seed: int = 0,
    access: str = "white",
    alpha: float = 0.01,
    permutations: int = 1000,
    power_resamples: int = 100,
    seed: int = 0,
    run: RunOptions = RunOptions(),
) -> DemoChainOutcome:
    """Train (or reuse) the demo target with train.py's parameters, then audit it (or reuse the audit).

    Defaults: the bundled demo's recipe (demo/README.md) and `cdi audit`'s settings. `run`: where the runs
    and folders go and how the model passes run.
    """
    from cdi.audit import check_permutations

    _check(n_members, n_heldout, steps, train_batch_size, lr)
    check_permutations(permutations, alpha, "permutation")
    work = run.work
    training = {"n_members": n_members, "n_heldout": n_heldout, "steps": steps, "batch_size": train_batch_size,
                "lr": lr, "seed": train_seed}
    auditing = {"access": access, "alpha": alpha, "permutations": permutations, "power_resamples": power_resamples,
                "seed": seed}
    recorded = {**{f"train.{k}": v for k, v in training.items()}, **{f"audit.{k}": v for k, v in auditing.items()}}
    with pipeline_run(NAME, tracking_uri=run.tracking_uri, experiment=run.experiment, params=recorded,
                      code_extra=[TRAIN_SCRIPT], echo=run.echo) as pipeline:
        trained = _train(pipeline, training, work)
        folder = target_folder(pipeline, trained, work)
        audited = _audit(pipeline, trained, folder, auditing, run)
        result = tracking.download_json(audited.run_id, "result.json", pipeline.tracking_uri)
        pipeline.client.set_tag(pipeline.parent_run_id, "cdi.verdict", result["verdict"])
        pipeline.client.log_metric(pipeline.parent_run_id, "p_value", float(result["p_value"]))
    return DemoChainOutcome(parent_run_id=pipeline.parent_run_id, tracking_uri=pipeline.tracking_uri,
                            steps=list(pipeline.records), result=result, folder=folder)


def _train(pipeline: Pipeline, training: dict[str, Any], work: Path) -> StepRecord:
    def execute(step: StepContext) -> dict[str, Any]:
        name = f"demo-target-{step.key[:16]}"
        scratch = scratch_folder(work, name)
        command = [sys.executable, str(TRAIN_SCRIPT), "--output", str(scratch),
                   *(part for key, value in training.items() for part in (f"--{key.replace('_', '-')}", str(value)))]
        # The script's `mlflow.start_run()` takes MLFLOW_RUN_ID (set by the step) and logs into this step's run.
        env = {**os.environ, "MLFLOW_TRACKING_URI": step.tracking_uri}
        # Its progress lines go to our stdout; its stderr is kept for the message should it fail.
        done = subprocess.run(command, cwd=TRAIN_SCRIPT.parent, env=env, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            shutil.rmtree(scratch, ignore_errors=True)
            tail = "\n".join(done.stderr.strip().splitlines()[-5:])
            raise RuntimeError(f"{TRAIN_SCRIPT} exited with code {done.returncode}:\n{tail}")
        pipeline.client.log_artifacts(step.run_id, str(scratch), TARGET_ARTIFACT)
        fingerprint = model_digest(scratch / "model")
        publish(scratch, work / name)
        return {"folder": name, "artifact": TARGET_ARTIFACT, "model_fingerprint": fingerprint}

    return pipeline.step("train", inputs={"script": file_digest(TRAIN_SCRIPT)}, params=training, execute=execute)


def target_folder(pipeline: Pipeline, trained: StepRecord, work: Path) -> Path:
    """The trained target in the work folder: as published, or downloaded again from the train run's artifact
    when it is missing or its model differs from the one recorded (no training either way)."""
    outputs = trained.outputs
    folder = work / outputs["folder"]
    if folder.is_dir() and _model_matches(folder, outputs["model_fingerprint"]):
        return folder
    scratch = scratch_folder(work, outputs["folder"])
    download_artifact(trained.run_id, outputs["artifact"], scratch, pipeline.tracking_uri)
    downloaded = scratch / outputs["artifact"]
    if not _model_matches(downloaded, outputs["model_fingerprint"]):
        shutil.rmtree(scratch, ignore_errors=True)
        raise OptionError(f"run {trained.run_id}: its artifact {outputs['artifact']}/model does not match the recorded "
                          "fingerprint; delete that run to train again")
    if folder.exists():
        shutil.rmtree(folder)
    publish(downloaded, folder)
    shutil.rmtree(scratch, ignore_errors=True)
    return folder


def _model_matches(folder: Path, fingerprint: str) -> bool:
    from cdi.errors import ModelError

    try:
        return model_digest(folder / "model") == fingerprint
    except ModelError:
        return False


def _audit(pipeline: Pipeline, trained: StepRecord, folder: Path, auditing: dict[str, Any],
           run: RunOptions) -> StepRecord:
    model, suspect, control = folder / "model", folder / "members", folder / "heldout"
    inputs = {"model": model_digest(model), "suspect": images_digest(suspect, "members"),
              "control": images_digest(control, "heldout")}

    def execute(step: StepContext) -> dict[str, Any]:
        from cdi.audit import REPORT_ARTIFACT, audit

        result = audit(model, suspect, control, access=auditing["access"], alpha=auditing["alpha"],
                       n_permutations=auditing["permutations"], power_resamples=auditing["power_resamples"],
                       seed=auditing["seed"], tracking_uri=step.tracking_uri, extraction=run.extraction())
        return {"verdict": result.verdict, "p_value": result.p_value, "result": "result.json",
                "report": REPORT_ARTIFACT}

    return pipeline.step("audit", inputs=inputs, params=auditing, upstream=[trained], execute=execute)


# -- command line ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from cdi.cli import Parser
    from cdi.options import count as _count
    from cdi.options import positive_int as _positive_int

    parser = Parser(prog="python -m pipelines.demo_chain", description=__doc__.split("\n")[0])
    train = parser.add_argument_group("train (mlflow_projects/demo_target/train.py)")
    train.add_argument("--n-members", type=_positive_int, default=100, help="training images (default 100)")
    train.add_argument("--n-heldout", type=_positive_int, default=100, help="images per held-out folder (default 100)")
    train.add_argument("--steps", type=_positive_int, default=2500, help="optimiser steps (default 2500)")
    train.add_argument("--train-batch-size", type=_positive_int, default=50, help="training batch (default 50)")
    train.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 0.001)")
    train.add_argument("--train-seed", type=_count, default=0, help="seed of the split and the training (default 0)")
    audit = parser.add_argument_group("audit (members/ against heldout/)")
    audit.add_argument("--access", choices=("gray", "white"), default="white")
    audit.add_argument("--alpha", type=float, default=0.01)
    audit.add_argument("--permutations", type=_positive_int, default=1000)
    audit.add_argument("--power-resamples", type=_count, default=100)
    audit.add_argument("--seed", type=_count, default=0, help="seed of the audit's noise draws and folds (default 0)")
    audit.add_argument("--output", type=optional_path, default=None, help="also write the result JSON here")
    add_run_options(parser, work="where trained targets go")
    return parser


def _run(args: argparse.Namespace) -> int:
    from cdi.cli import check_output_path, set_threads

    check_output_path(args.output)
    set_threads(args.threads)
    outcome = demo_chain(
        n_members=args.n_members, n_heldout=args.n_heldout, steps=args.steps, train_batch_size=args.train_batch_size,
        lr=args.lr, train_seed=args.train_seed, access=args.access, alpha=args.alpha, permutations=args.permutations,
        power_resamples=args.power_resamples, seed=args.seed, run=RunOptions.from_args(args),
    )
    result = outcome.result
    comparison = "<" if result["verdict"] == "used" else ">="
    print(f"verdict: {result['verdict']} (p = {result['p_value']:.3g} {comparison} alpha = {result['alpha']})")
    for warning in result.get("warnings", []):
        print(f"WARNING: {warning}")
    print(f"trained target: {outcome.folder}")
    print(f"pipeline run: {outcome.parent_run_id} (tracking URI {tracking.redact_uri(outcome.tracking_uri)})")
    if args.output is not None:
        write_pipeline_result(args.output, result, outcome, target_folder=str(outcome.folder))
        print(f"result: {args.output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("demo_chain", args.verbose, lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
