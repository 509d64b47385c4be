"""Steps of a pipeline: each an MLflow run under the pipeline's parent run, reused when it already ran.

A step's reuse key is the sha256 of
- its name;
- the digests of its inputs: a model directory by `cdi.models.loading.fingerprint` (every weight and
  config file), an image folder by `images_digest` (every image's path in the folder, sha256, label and
  caption, and the folder's metadata.jsonl), a file by its sha256;
- its parameters: what it computes; how (batch size, device, threads, cache folder) is left out, since
  features do not depend on it;
- the run ids of the steps it consumes, so a step that re-runs re-runs every step after it;
- the code version (`code_version`): the git commit, plus a digest of the sources where they differ from it.
`Pipeline.step` looks among the FINISHED runs of the pipeline's experiment for one tagged with that key
that recorded its outputs; found, the step is reused: its outputs are returned and no run is created.

MLflow layout:
- the parent run, one per invocation (run name: the pipeline; under `mlflow run`, the project's run):
  tags `cdi.pipeline.name`, `cdi.pipeline.role = parent`, and per step `cdi.pipeline.run.<step>` (the run
  id it used, new or reused) and `cdi.pipeline.reused.<step>`; params: the pipeline's parameters;
  artifact `pipeline.json` (every step in order: run id, reused, outputs);
- one run per step that ran, in the parent's experiment (run name: the step): tags `mlflow.parentRunId`,
  `cdi.pipeline.name`, `cdi.pipeline.role = step`, `cdi.pipeline.step`, `cdi.pipeline.step_index`,
  `cdi.pipeline.key`, `cdi.pipeline.code_version`, and as JSON `cdi.pipeline.inputs`,
  `cdi.pipeline.params`, `cdi.pipeline.upstream` and `cdi.pipeline.outputs` (set last: a run without it is
  never reused). The step's own record (an audit's params, metrics, report) is logged into the run by the
  library, which runs with MLFLOW_RUN_ID set to it, as under `mlflow run`.
A reused step keeps its first parent (`mlflow.parentRunId`); a later parent names it in its tags.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import cdi
from cdi import tracking
from cdi.errors import CDIError, Interrupted, OptionError
from cdi.hashing import sha256_file, sha256_text

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_EXPERIMENT = "cdi-pipelines"
PARENT_RUN_TAG = "mlflow.parentRunId"
PREFIX = "cdi.pipeline."
NAME_TAG, ROLE_TAG, STEP_TAG, INDEX_TAG = (f"{PREFIX}{k}" for k in ("name", "role", "step", "step_index"))
KEY_TAG, CODE_TAG = f"{PREFIX}key", f"{PREFIX}code_version"
INPUTS_TAG, PARAMS_TAG, UPSTREAM_TAG, OUTPUTS_TAG = (f"{PREFIX}{k}"
                                                      for k in ("inputs", "params", "upstream", "outputs"))
PIPELINE_ARTIFACT = "pipeline.json"
NOTE_TAG = "mlflow.note.content"
#: MLflow stores tag values of up to 8000 characters; outputs are run ids, paths and a few numbers.
MAX_OUTPUTS = 8000


def default_work_dir() -> Path:
    """Where pipelines keep the folders they make (the demo's sets, trained models): $CDI_PIPELINE_DIR,
    else ~/.cache/cdi/pipelines. A cache: what a step made is also in its run's artifacts."""
    return Path(os.environ.get("CDI_PIPELINE_DIR") or Path.home() / ".cache" / "cdi" / "pipelines")


@dataclass(frozen=True)
class RunOptions:
    """Where a pipeline keeps its runs and folders and how its model passes run. None of it is part of a
    step's reuse key: features do not depend on it."""

    batch_size: int = 50
    device: str = "auto"
    cache_dir: str | Path | None = None
    work_dir: str | Path | None = None
    experiment: str = DEFAULT_EXPERIMENT
    tracking_uri: str | None = None
    progress: bool = False
    echo: Callable[[str], None] | None = None

    @property
    def work(self) -> Path:
        return Path(self.work_dir) if self.work_dir else default_work_dir()

    def compute(self) -> dict[str, Any]:
        """The keyword arguments `cdi.calibrate.run_calibration` and `cdi.search.run_search` take for these."""
        return dict(batch_size=self.batch_size, device=self.device, cache_dir=self.cache_dir, progress=self.progress)

    def extraction(self) -> Any:
        """These as `cdi.audit.audit`'s `extraction`."""
        from cdi.features.extraction import ExtractionOptions

        return ExtractionOptions(**self.compute())

    @classmethod
    def from_args(cls, args: Any) -> RunOptions:
        """From the options `add_run_options` adds; progress lines of the steps are printed."""
        return cls(batch_size=args.batch_size, device=args.device, cache_dir=args.cache_dir, work_dir=args.work_dir,
                   experiment=args.experiment, tracking_uri=args.tracking_uri, progress=not args.no_progress,
                   echo=lambda line: print(line, flush=True))


def add_run_options(parser: Any, *, work: str) -> None:
    """The pipelines' "compute and tracking" options (`RunOptions`); `work`: what the work folder holds."""
    from cdi.cli.common import add_compute_options

    group = parser.add_argument_group("compute and tracking (not part of any reuse key)")
    add_compute_options(group, batch_size=RunOptions.batch_size)
    group.add_argument("--cache-dir", type=optional_text, default=None, help="feature cache (default as for cdi audit)")
    group.add_argument("--work-dir", type=optional_text, default=None,
                       help=f"{work} (default $CDI_PIPELINE_DIR, else ~/.cache/cdi/pipelines)")
    group.add_argument("--experiment", default=DEFAULT_EXPERIMENT,
                       help=f"MLflow experiment (default {DEFAULT_EXPERIMENT}; under `mlflow run`, the project run's)")
    group.add_argument("--tracking-uri", type=optional_text, default=None,
                       help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    group.add_argument("--no-progress", action="store_true")
    group.add_argument("-v", "--verbose", action="store_true")


# -- input digests -------------------------------------------------------------------------------------------


def model_digest(path: str | Path) -> str:
    """The model's fingerprint: sha256 over every weight and config file (`cdi.models.loading.fingerprint`)."""
    from cdi.models.loading import fingerprint, read_model_index

    root = Path(path)
    read_model_index(root)  # not a pipeline directory: a ModelError naming it, before anything runs
    return fingerprint(root)[0]


def images_digest(folder: str | Path, option: str) -> str:
    """sha256 over each image's path in `folder`, sha256, label and caption (`cdi.manifest.image_entries`)
    and the folder's metadata.jsonl: the same images under the same names, wherever the folder lies."""
    from cdi.data import discover_images
    from cdi.manifest import image_entries, metadata_digest

    records = discover_images(folder, "suspect", option)
    entries = [{key: value for key, value in entry.items() if key != "set"} for entry in image_entries(records, folder)]
    return sha256_text(json.dumps({"images": entries, "metadata": metadata_digest(folder)}, sort_keys=True))


def file_digest(path: str | Path) -> str:
    return sha256_file(path)


# -- code version --------------------------------------------------------------------------------------------


def _git(folder: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def sources_digest(roots: Sequence[Path]) -> str:
    """sha256 over the Python sources under each root (a folder, or one file), by path below the root's parent."""
    rows = []
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)
        rows += [f"{p.relative_to(root.parent).as_posix()}\t{sha256_file(p)}" for p in files]
    return sha256_text("\n".join(rows))


def code_version(extra: Sequence[str | Path] = ()) -> str:
    """`git <commit>` when the cdi package, the pipelines and `extra` (e.g. a training script) are committed
    as they are; else the commit (or cdi's version, outside a git checkout) plus a digest of their sources."""
    roots = [Path(cdi.__file__).resolve().parent, Path(__file__).resolve().parent, *(Path(p).resolve() for p in extra)]
    top = _git(REPO, "rev-parse", "--show-toplevel")
    commit = _git(Path(top), "rev-parse", "HEAD") if top else None
    if commit:
        paths = [str(root) for root in roots]
        # Every root must hold committed files (an installed copy of cdi outside the checkout does not) and
        # have no change, staged, unstaged or untracked.
        committed = all(_git(Path(top), "ls-files", "--", path) for path in paths)
        if committed and _git(Path(top), "status", "--porcelain", "--", *paths) == "":
            return f"git {commit}"
    digest = sources_digest(roots)[:16]
    return f"git {commit} + sources {digest}" if commit else f"cdi {cdi.__version__} + sources {digest}"


def git_commit(version: str) -> str | None:
    """The commit a code version names, if any."""
    return version.split()[1] if version.startswith("git ") else None


def step_key(name: str, inputs: Mapping[str, Any], params: Mapping[str, Any], upstream: Mapping[str, str],
             code: str) -> str:
    return sha256_text(_json({"step": name, "inputs": inputs, "params": params, "upstream": upstream, "code": code}))


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


# -- the parent run and its steps ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepRecord:
    """One step of a pipeline invocation: the run that holds its outputs, and whether it was reused."""

    name: str
    run_id: str
    outputs: dict[str, Any]
    reused: bool
    seconds: float = 0.0


@dataclass(frozen=True)
class StepContext:
    """What a step's body gets: its run (MLFLOW_RUN_ID is set to it while the body runs) and its key."""

    run_id: str
    key: str
    tracking_uri: str


@dataclass
class Pipeline:
    """The parent run of one invocation; `step` runs or reuses each step in turn."""

    name: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    code: str
    echo: Callable[[str], None] | None = None
    records: list[StepRecord] = field(default_factory=list)

    @cached_property
    def client(self) -> Any:
        return _client(self.tracking_uri)

    def step(self, name: str, *, inputs: Mapping[str, Any], params: Mapping[str, Any],
             execute: Callable[[StepContext], dict[str, Any]], upstream: Sequence[StepRecord] = ()) -> StepRecord:
        """The finished run of this step with the same key, else a new run of `execute` (a child of the parent)."""
        inputs, params = dict(inputs), dict(params)
        consumed = {record.name: record.run_id for record in upstream}
        key = step_key(name, inputs, params, consumed, self.code)
        found = self.finished(key)
        if found is not None:
            record = StepRecord(name, found.info.run_id, json.loads(found.data.tags[OUTPUTS_TAG]), reused=True)
            self._say(f"{name}: reused run {record.run_id}")
        else:
            record = self._run(name, key, inputs, params, consumed, execute)
            self._say(f"{name}: ran run {record.run_id} ({record.seconds:.1f} s)")
        self.records.append(record)
        self._link(record)
        return record

    def finished(self, key: str) -> Any:
        """The newest FINISHED run of the experiment with reuse key `key` and recorded outputs, or None."""
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{KEY_TAG}` = '{key}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"], max_results=20)
        return next((run for run in runs if OUTPUTS_TAG in run.data.tags), None)

    def _run(self, name: str, key: str, inputs: dict, params: dict, consumed: dict,
             execute: Callable[[StepContext], dict[str, Any]]) -> StepRecord:
        client = self.client
        tags = {PARENT_RUN_TAG: self.parent_run_id, NAME_TAG: self.name, ROLE_TAG: "step", STEP_TAG: name,
                INDEX_TAG: str(len(self.records) + 1), KEY_TAG: key, CODE_TAG: self.code,
                INPUTS_TAG: _json(inputs), PARAMS_TAG: _json(params), UPSTREAM_TAG: _json(consumed)}
        commit = git_commit(self.code)
        if commit:
            tags["mlflow.source.git.commit"] = commit
        run_id = client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
        self._say(f"{name}: running (run {run_id})")
        started = time.perf_counter()
        try:
            with _current_run(run_id):
                outputs = execute(StepContext(run_id=run_id, key=key, tracking_uri=self.tracking_uri))
            text = _json(outputs)
            if len(text) > MAX_OUTPUTS:
                raise ValueError(f"step {name}: outputs of {len(text)} characters do not fit a tag; log them as an "
                                 "artifact and return its name")
            client.set_tag(run_id, OUTPUTS_TAG, text)
        except BaseException as exc:
            _end_if_running(client, run_id, "KILLED" if isinstance(exc, (Interrupted, KeyboardInterrupt)) else "FAILED")
            raise
        status = client.get_run(run_id).info.status
        if status == "RUNNING":  # a body that logs through the client leaves its run open
            client.set_terminated(run_id, "FINISHED")
        elif status != "FINISHED":
            raise RuntimeError(f"step {name}: run {run_id} ended {status} although its body returned")
        return StepRecord(name, run_id, json.loads(text), reused=False, seconds=time.perf_counter() - started)

    def _link(self, record: StepRecord) -> None:
        """Name the step's run on the parent, as soon as the step is done (a later failure keeps the link)."""
        from mlflow.entities import RunTag

        self.client.log_batch(self.parent_run_id, tags=[
            RunTag(f"{PREFIX}run.{record.name}", record.run_id),
            RunTag(f"{PREFIX}reused.{record.name}", str(record.reused).lower())])

    def _say(self, line: str) -> None:
        log.info("%s: %s", self.name, line)
        if self.echo is not None:
            self.echo(line)

    def download(self, run_id: str, artifact: str, folder: str | Path) -> Path:
        return download_artifact(run_id, artifact, folder, self.tracking_uri)

    def describe(self, markdown: str) -> None:
        """The parent run's description in `mlflow ui`."""
        self.client.set_tag(self.parent_run_id, NOTE_TAG, tracking.redact_text(markdown, self.tracking_uri))

    def summary(self) -> list[dict[str, Any]]:
        return [{"step": r.name, "run_id": r.run_id, "reused": r.reused, "outputs": r.outputs} for r in self.records]


def download_artifact(run_id: str, artifact: str, folder: str | Path, tracking_uri: str) -> Path:
    """An artifact (file or folder) of `run_id` downloaded into `folder`, without MLflow's progress bar."""
    import mlflow

    with _no_progress_bars():
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=str(folder),
                                                        tracking_uri=tracking_uri))


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    previous = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = previous


@contextmanager
def _current_run(run_id: str) -> Iterator[None]:
    """MLFLOW_RUN_ID = `run_id` while a step's body runs: the library's `tracking.audit_run` (and a script's
    `mlflow.start_run()`) then log into the step's run, as under `mlflow run`."""
    previous = os.environ.get("MLFLOW_RUN_ID")
    os.environ["MLFLOW_RUN_ID"] = run_id
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_RUN_ID", None)
        else:
            os.environ["MLFLOW_RUN_ID"] = previous


def _end_if_running(client: Any, run_id: str, status: str) -> None:
    try:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status)
    except Exception as exc:  # the store is gone: the error that got us here is the one to show
        log.debug("could not end run %s: %s", run_id, exc)


@contextmanager
def pipeline_run(name: str, *, tracking_uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT,
                 params: Mapping[str, Any] | None = None, code_extra: Sequence[str | Path] = (),
                 echo: Callable[[str], None] | None = None) -> Iterator[Pipeline]:
    """The parent run of one invocation: the `mlflow run` project run when MLFLOW_RUN_ID names one (its
    experiment then holds the steps), else a new run in `experiment`. Ended FINISHED, FAILED or KILLED
    (a project run is ended by `mlflow run`)."""
    from mlflow.entities import Param

    uri = tracking.resolve_tracking_uri(tracking_uri)
    experiment_id = tracking.connect(uri, experiment)  # an unusable store fails here, on one line
    pipeline_client = _client(uri)
    adopted = os.environ.get("MLFLOW_RUN_ID")
    tags = {NAME_TAG: name, ROLE_TAG: "parent"}
    if adopted:
        status = pipeline_client.get_run(adopted).info.status
        if status != "RUNNING":
            raise OptionError(f"MLFLOW_RUN_ID {adopted}: that run is {status}, not a running project run; unset "
                              "MLFLOW_RUN_ID to start a new pipeline run")
        parent_run_id = adopted
        for key, value in tags.items():
            pipeline_client.set_tag(parent_run_id, key, value)
    else:
        parent_run_id = pipeline_client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    code = code_version(code_extra)
    pipeline_client.set_tag(parent_run_id, CODE_TAG, code)
    existing = pipeline_client.get_run(parent_run_id).data.params  # `mlflow run` logged its -P values already
    given = {key: value for key, value in (params or {}).items() if key not in existing and value is not None}
    if given:
        pipeline_client.log_batch(parent_run_id, params=[Param(key, _param(value, uri))
                                                          for key, value in given.items()])
    pipeline = Pipeline(name=name, tracking_uri=uri, experiment_id=experiment_id, parent_run_id=parent_run_id,
                        code=code, echo=echo)
    try:
        with _no_progress_bars():  # steps read many small artifacts; MLflow would draw a bar for each
            yield pipeline
    except BaseException as exc:
        try:
            _link_steps(pipeline)
        except Exception as again:  # the store is gone: the first error is the one to show
            log.debug("could not write %s: %s", PIPELINE_ARTIFACT, again)
        if not adopted:
            _end_if_running(pipeline_client, parent_run_id,
                            "KILLED" if isinstance(exc, (Interrupted, KeyboardInterrupt)) else "FAILED")
        raise
    _link_steps(pipeline)
    if not adopted:
        pipeline_client.set_terminated(parent_run_id, "FINISHED")


def _link_steps(pipeline: Pipeline) -> None:
    """`pipeline.json` on the parent run: every step done, in order."""
    text = json.dumps(pipeline.summary(), indent=2, sort_keys=True)
    pipeline.client.log_text(pipeline.parent_run_id, tracking.redact_text(text, pipeline.tracking_uri),
                             PIPELINE_ARTIFACT)


def _client(uri: str) -> Any:
    import mlflow

    return mlflow.MlflowClient(uri)


def _param(value: Any, uri: str) -> str:
    text = ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
    return tracking.redact_text(text, uri)


# -- command line ------------------------------------------------------------------------------------------------


def optional_text(text: str) -> str | None:
    """An option MLflow passes as '' when its string parameter is unset."""
    return text or None


def optional_path(text: str) -> Path | None:
    return Path(text) if text else None


def run_command(prog: str, verbose: bool, body: Callable[[], int]) -> int:
    """Run a pipeline command as `cdi` runs its subcommands: quiet libraries unless --verbose, a user's
    mistake on one line with exit code 2, SIGINT/SIGTERM ending the running step's run KILLED."""
    from cdi.cli import quiet_libraries, signals_raise_interrupted

    quiet_libraries(verbose)
    try:
        with signals_raise_interrupted():
            return body()
    except CDIError as exc:
        sys.stderr.write(f"{prog}: error: {exc}\n")
        return exc.exit_code
    except (Interrupted, KeyboardInterrupt) as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        sys.stderr.write(f"{prog}: interrupted by {signal.Signals(signum).name}; finished steps are kept: rerun the "
                         "same command to reuse them\n")
        return 128 + signum


def publish(folder: Path, target: Path) -> Path:
    """Move the finished `folder` to `target` in one rename (a crash leaves no half folder under the name);
    if another process got there first, keep its folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(folder, target)
    except OSError:
        if not target.is_dir():
            raise
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    return target


def scratch_folder(work_dir: Path, name: str) -> Path:
    """A new, empty folder beside where `name` will be published (same file system, so `publish` is a rename)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{name}.", dir=work_dir))


__all__ = ["DEFAULT_EXPERIMENT", "Pipeline", "StepContext", "StepRecord", "code_version", "default_work_dir",
           "download_artifact", "file_digest", "images_digest", "model_digest", "optional_path", "optional_text",
           "pipeline_run", "publish", "run_command", "scratch_folder", "sources_digest", "step_key"]


def write_pipeline_result(path: Path, result: dict, outcome: Any, **extra: Any) -> None:
    """`--output` of a pipeline: the final audit's result with the parent run, the steps (reused or not) and
    `extra`, without the tracking URI's secrets, written atomically."""
    import json

    from cdi import tracking
    from cdi.cli import write_output

    record = {**result, "pipeline_run_id": outcome.parent_run_id, **extra,
              "steps": [{"step": s.name, "run_id": s.run_id, "reused": s.reused} for s in outcome.steps]}
    record = tracking.redact_value(record, outcome.tracking_uri)
    write_output(path, json.dumps(record, indent=2, sort_keys=True) + "\n", result["run_id"])
