"""cdi's MLflow layer: the only package that talks to MLflow and names what is logged.

- `cdi.tracking` (this module): the store. Connecting (`connect`), the run of an audit, calibration or
  search (`audit_run`: resume, status on failure or interrupt, artifact-store check), params without
  None values or secrets (`log_params`), tags, downloads, secret redaction.
- `cdi.tracking.audit`: how an audit run is laid out (names of its params, `stats.*` and
  `extraction.*` metrics, tags, datasets, models, artifacts); `cdi.tracking.calibration` and
  `cdi.tracking.search` the same for `cdi calibrate` and `cdi search`. The audit, calibrate and search
  code hand them result objects.

When started by `mlflow run`, a run logs into the project's run (MLFLOW_RUN_ID), which `mlflow run
--experiment-name` placed; a run name MLflow made up is replaced by cdi's (`mlflow.runName` tag).
Runs cdi creates are named after what they are: `audit-<model folder>-<fingerprint[:8]>` in cdi-audits,
`search-<study>` in cdi-search, `calibrate-<model folder>` in cdi-calibration. With psutil installed
the run records MLflow system metrics (`system/cpu_utilization_percentage`, ...) every 2 s.

A bad store fails in seconds, on one line, before any model pass:
- HTTP: unless set by the user, MLFLOW_HTTP_REQUEST_TIMEOUT=30 (seconds per request),
  MLFLOW_HTTP_REQUEST_MAX_RETRIES=3 and MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=1 (waits of about 0, 2, 4 s),
  so one call gives up after about 2 minutes at worst instead of MLflow's 7 retries of 120 s; `connect`
  also probes /health and one API call with a 10 s timeout and no retry;
- S3 (boto3): unless set, AWS_RETRY_MODE=standard and AWS_MAX_ATTEMPTS=3;
- the run's artifact store: `audit_run` writes `cdi-store-check.txt`, lists it back and deletes it right
  after the run starts, within 60 s, and fails the run (cdi.status=failed) if it cannot;
- SQLite: a folder or a file that is not a database is refused at once, and the first use of a new
  database (schema creation, migration, the experiment) is serialised between processes with an
  fcntl lock on `<database>.lock` beside it, so two audits started together do not both migrate it.

Secrets: a password or token in the tracking URI (`http://user:password@host`, `?token=...`) never
appears in an error message, a log line, or a param, tag or artifact this module writes (`redact_uri`,
`redact_text`, `redact_value`); with such a URI, MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT=true (unless set)
stops MLflow printing "View run ... at: URL" with the password in it. MLflow's HTTP client (requests)
does send the URI's user and password as HTTP basic auth, ahead of MLFLOW_TRACKING_USERNAME/PASSWORD.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping
from urllib.parse import unquote, urlsplit

from cdi.errors import Interrupted, TrackingError

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
NOTE_TAG = "mlflow.note.content"
#: The experiment tag MLflow 3's UI reads to choose its view; cdi's experiments are model development.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
STATUS_TAG = "cdi.status"
RUN_NAME_TAG = "mlflow.runName"
SYSTEM_METRICS_INTERVAL_S = 2

HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "30", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
                       "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
S3_RETRY_DEFAULTS = {"AWS_RETRY_MODE": "standard", "AWS_MAX_ATTEMPTS": "3"}
PROBE_TIMEOUT_S = 10
STORE_CHECK_ARTIFACT = "cdi-store-check.txt"
STORE_CHECK_TIMEOUT_S = 60

# Params that may differ between an audit and its --resume: how the features are computed, not what
# (precision is compared: it changes the features), and where the files lie (their content is compared
# through model_fingerprint, lora_sha256, reference_fingerprints and images_sha256).
OPERATIONAL_PARAMS = frozenset({"batch_size", "devices", "num_nodes", "threads", "progress", "model_path",
                                "suspect_path", "control_path", "lora_path", "reference_models"})
OPERATIONAL_PREFIXES = ("version.",)
_MODEL_PARAMS = ("model_fingerprint", "pipeline_class", "lora_sha256", "reference_fingerprints")
_IMAGE_PARAMS = ("images_sha256", "n_suspect", "n_control")

REDACTED = "***"
# A bare secret shorter than this is replaced only where it stands in a URI (user:SECRET@, token=SECRET):
# replacing "1234" everywhere would corrupt hashes and numbers in the evidence.
_MIN_BARE_SECRET = 8
_SECRET_WORDS = frozenset({"token", "password", "passwd", "pwd", "secret", "sig", "signature", "credential",
                           "credentials", "key", "apikey", "auth"})
_SECRET_ENDINGS = ("token", "password", "passwd", "secret", "signature", "apikey")
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s/?#@:'\"<>]*):(?P<secret>[^\s/?#@'\"<>]+)@")
_QUERY_PARAM = re.compile(r"(?P<head>[?&;](?P<name>[A-Za-z0-9_.\-]+)=)(?P<value>[^&;#\s'\"<>]+)")


def _is_secret_name(name: str) -> bool:
    lowered = name.lower()
    return lowered.endswith(_SECRET_ENDINGS) or any(word in _SECRET_WORDS for word in re.split(r"[-_.]", lowered))


def _redact_query_param(match: re.Match) -> str:
    return match["head"] + REDACTED if _is_secret_name(match["name"]) else match[0]


def redact_uri(uri: str) -> str:
    """`uri` with its secrets masked: `user:password@` -> `user:***@`, `?token=...` -> `?token=***`.

    Token-like query parameters: token, access_token, password, sig, X-Amz-Signature, api_key, ...
    """
    try:
        parts = urlsplit(uri)
        password = parts.password
    except ValueError:  # e.g. a malformed IPv6 host: mask what looks like a secret
        return _redact_patterns(uri)
    if password:  # as urlsplit reads it: the host follows the last '@', so a password may hold an '@'
        userinfo, _, host = parts.netloc.rpartition("@")
        uri = uri.replace(parts.netloc, f"{userinfo.split(':', 1)[0]}:{REDACTED}@{host}", 1)
    if parts.query:
        uri = uri.replace(f"?{parts.query}", _QUERY_PARAM.sub(_redact_query_param, f"?{parts.query}"), 1)
    return uri


def redact_text(text: str, uri: str | None) -> str:
    """`text` without the secrets of `uri` (as in `redact_uri`) and without a password in any URI it quotes.

    The secret itself is replaced wherever it appears when it has 8 characters or more; a shorter one
    only where it stands in a URI (`user:SECRET@`, `token=SECRET`).
    """
    for secret in _secrets(uri):
        text = text.replace(f":{secret}@", f":{REDACTED}@")  # also a password holding '@' or '/'
        if len(secret) >= _MIN_BARE_SECRET:
            text = text.replace(secret, REDACTED)
    return _redact_patterns(text)


def redact_value(value: Any, uri: str | None) -> Any:
    """`redact_text` applied to every string in a JSON-like value (dict keys included); numbers stay as they are."""
    if isinstance(value, str):
        return redact_text(value, uri)
    if isinstance(value, Mapping):
        return {redact_value(key, uri): redact_value(item, uri) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_value(item, uri) for item in value]
    return value


def _redact_patterns(text: str) -> str:
    text = _USERINFO.sub(lambda match: f"{match['head']}:{REDACTED}@", text)
    return _QUERY_PARAM.sub(_redact_query_param, text)


def _secrets(uri: str | None) -> list[str]:
    """The password and the token-like query values of `uri`, raw and percent-decoded, longest first."""
    if not uri:
        return []
    try:
        parts = urlsplit(uri)
        found = [parts.password] if parts.password else []
    except ValueError:
        return []
    found += [match["value"] for match in _QUERY_PARAM.finditer(f"?{parts.query}") if _is_secret_name(match["name"])]
    secrets = {variant for secret in found for variant in (secret, unquote(secret))}
    return sorted((s for s in secrets if s and s != REDACTED), key=len, reverse=True)


def _tracking_error(message: str, tracking_uri: str | None) -> TrackingError:
    return TrackingError(redact_text(message, tracking_uri))


def _first_line(exc: BaseException) -> str:
    """The first line of `exc`; of MLflow's "API request to URL failed with exception ... (Caused by X)" only X."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    if "(Caused by " in line:
        line = line.rsplit("(Caused by ", 1)[1]
        while line.endswith(")") and line.count(")") > line.count("("):
            line = line[:-1]
    return line


def resolve_tracking_uri(option: str | None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory."""
    return option or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _bound_retries() -> None:
    """MLflow's and boto3's retries, bounded (see the module docstring) unless the user chose them."""
    for name, value in {**HTTP_RETRY_DEFAULTS, **S3_RETRY_DEFAULTS}.items():
        os.environ.setdefault(name, value)


def connect(tracking_uri: str, experiment: str) -> str:
    """Point MLflow at `tracking_uri` and make sure it answers; return the experiment id.

    Called before any model pass so an unreachable or unusable store fails fast.
    """
    import mlflow
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    _bound_retries()
    if _secrets(tracking_uri):  # MLflow prints "View run ... at: URL" with the URL's password in it
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    log.debug("tracking store %s, experiment %s", redact_uri(tracking_uri), experiment)
    mlflow.set_tracking_uri(tracking_uri)
    if tracking_uri.startswith(("http://", "https://")):
        _probe_server(tracking_uri, experiment)
    run_id = os.environ.get("MLFLOW_RUN_ID")
    try:
        with _first_use_lock(tracking_uri):
            if run_id:
                return mlflow.get_run(run_id).info.experiment_id
            found = mlflow.get_experiment_by_name(experiment)
            if found is None:  # cdi's own experiments open in the UI as model-training ones, not GenAI
                return mlflow.create_experiment(experiment, artifact_location=local_artifact_location(tracking_uri, experiment),
                                                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
            return found.experiment_id
    except (MlflowException, SQLAlchemyError, OSError, ConnectionError) as exc:
        refused = _refusal(exc, tracking_uri, None if run_id else experiment)
        if refused is not None:
            raise refused from exc
        raise _tracking_error(
            f"--tracking-uri {redact_uri(tracking_uri)}: cannot use the tracking store ({_first_line(exc)}); "
            "start the server or pass a reachable URI", tracking_uri
        ) from exc


def local_artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Where a new experiment of a local SQLite store keeps its artifacts: `mlruns/<experiment>` beside the
    database file, whatever the working directory (MLflow's own default, `./mlruns` of the process that
    creates the experiment, scatters one store's artifacts over the folders cdi happened to run in). None for
    other stores: a server or database decides for itself."""
    if not tracking_uri.startswith("sqlite:///") or tracking_uri.startswith("sqlite:///:memory:"):
        return None
    database = Path(tracking_uri[len("sqlite:///"):].split("?", 1)[0])
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    return (database.resolve().parent / "mlruns" / folder).as_uri()


def _probe_server(tracking_uri: str, experiment: str) -> None:
    """/health, then one API call, each with a short timeout and no retry: a down or stalled server fails in seconds.

    A 401 or 403 passes here: the store's first real call says what to fix (see `_refusal`).
    """
    import requests
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    shown = redact_uri(tracking_uri)
    credentials = get_default_host_creds(tracking_uri)
    try:
        requests.get(f"{tracking_uri.rstrip('/')}/health", timeout=PROBE_TIMEOUT_S, verify=credentials.verify)
    except requests.RequestException as exc:
        raise _tracking_error(
            f"--tracking-uri {shown}: the tracking server does not answer ({type(exc).__name__}); "
            "start it or pass a reachable URI", tracking_uri
        ) from exc
    try:
        response = http_request(credentials, "/api/2.0/mlflow/experiments/get-by-name", "GET",
                                max_retries=0, backoff_factor=0, timeout=PROBE_TIMEOUT_S, raise_on_status=False,
                                params={"experiment_name": experiment})
    except MlflowException as exc:
        cause = exc.__cause__ or exc.__context__
        timed_out = isinstance(cause, requests.Timeout) or "timed out" in str(cause)  # urllib3 read timeout, no retry
        problem = f"no answer within {PROBE_TIMEOUT_S} s" if timed_out else type(cause or exc).__name__
        raise _tracking_error(
            f"--tracking-uri {shown}: the tracking server answers /health but not its API ({problem}); "
            "check the server and its database, or pass a reachable URI", tracking_uri
        ) from exc
    if response.status_code >= 500:
        raise _tracking_error(
            f"--tracking-uri {shown}: the tracking server's API fails (HTTP {response.status_code}); "
            "check the server and its database, or pass a reachable URI", tracking_uri
        )


def _sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of an sqlite:// URI; None for other stores and in-memory databases."""
    if not tracking_uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        database = make_url(tracking_uri).database
    except ArgumentError:
        return None
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


@contextmanager
def _first_use_lock(tracking_uri: str) -> Iterator[None]:
    """For an SQLite store: refuse a path that cannot be a database, and hold an fcntl lock on `<db>.lock`.

    MLflow creates and migrates a new SQLite database on the first connection of each process; two
    processes doing it at once fail with "duplicate column name" or "table ... already exists". The
    lock file stays (removing it would let a third process lock another file of the same name).
    """
    path = _sqlite_path(tracking_uri)
    if path is None:
        yield
        return
    shown = redact_uri(tracking_uri)
    if path.is_dir():
        raise _tracking_error(f"--tracking-uri {shown}: {path} is a folder, not a database file; "
                              f"pass a file in it, e.g. sqlite:///{path / 'mlflow.db'}", tracking_uri)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # as MLflow does
    except OSError as exc:
        raise _tracking_error(f"--tracking-uri {shown}: cannot create the folder {path.parent} "
                              f"({exc.strerror or type(exc).__name__}); pass a database in a folder you can write",
                              tracking_uri) from exc
    try:
        import fcntl
    except ImportError:  # Windows: no lock; concurrent first use stays unsafe there
        fcntl = None
    lock = None
    if fcntl is not None:
        try:
            lock = open(f"{path}.lock", "a")
        except OSError as exc:  # a read-only folder: the check below or MLflow says what is wrong
            log.debug("no lock beside %s: %s", path, exc)
    try:
        if lock is not None:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        _check_sqlite_file(path, tracking_uri)
        yield
    finally:
        if lock is not None:
            lock.close()  # releases the lock


def _check_sqlite_file(path: Path, tracking_uri: str) -> None:
    """Refuse at once what MLflow would retry for minutes: a file that is not SQLite, or one it cannot write."""
    shown = redact_uri(tracking_uri)
    if not path.exists():
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise _tracking_error(f"--tracking-uri {shown}: cannot create {path} (no write permission on "
                                  f"{path.parent}); pass a database in a folder you can write", tracking_uri)
        return
    if not os.access(path, os.R_OK | os.W_OK):
        raise _tracking_error(f"--tracking-uri {shown}: cannot read and write {path}; fix its permissions "
                              "or pass another database file", tracking_uri)
    with open(path, "rb") as database:
        header = database.read(16)
    if header and header != b"SQLite format 3\x00":
        raise _tracking_error(f"--tracking-uri {shown}: {path} is not an SQLite database; pass the right file, "
                              "or a new file name to create one", tracking_uri)


def _refusal(exc: BaseException, tracking_uri: str, experiment: str | None) -> TrackingError | None:
    """The one-line error for a server that refuses the login (HTTP 401) or the user (HTTP 403), else None.

    MLflow sends the user and password of the URI (`http://user:password@host`), else
    MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN), with every request;
    a server started with `cdi server --app-name basic-auth` answers 401 without them or with wrong
    ones, and 403 when the user lacks permission on the experiment.
    """
    from mlflow.exceptions import MlflowException

    if not isinstance(exc, MlflowException):
        return None
    status = exc.get_http_status_code()
    if status not in (401, 403):
        return None
    shown = redact_uri(tracking_uri)
    uri_user = _uri_username(tracking_uri)
    username = uri_user or _username()
    if status == 401:
        if uri_user:
            problem = f"the tracking server refused the login of user {username!r} (HTTP 401)"
            fix = "check the user name and password in --tracking-uri"
        elif username:
            problem = f"the tracking server refused the login of user {username!r} (HTTP 401)"
            fix = "check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
            problem = "the tracking server refused the token in MLFLOW_TRACKING_TOKEN (HTTP 401)"
            fix = "check the token, or set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD instead"
        else:
            problem = "the tracking server requires a login (HTTP 401)"
            fix = "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to your account on it"
        return _tracking_error(f"--tracking-uri {shown}: {problem}; {fix}", tracking_uri)
    who = f"user {username!r}" if username else "this login"
    if experiment is None:  # an existing run (--resume, `mlflow run`): its experiment is fixed
        return _tracking_error(f"--tracking-uri {shown}: {who} lacks permission on the run's experiment "
                               "(HTTP 403); ask an admin of the server for EDIT permission on it", tracking_uri)
    return _tracking_error(
        f"--tracking-uri {shown}: {who} lacks permission on experiment {experiment!r} (HTTP 403); "
        "ask an admin of the server for EDIT permission on it, or pass --experiment with a new name", tracking_uri
    )


def _uri_username(tracking_uri: str) -> str | None:
    """The user of `http://user:password@host` (requests sends it as basic auth, ahead of the variables)."""
    try:
        parts = urlsplit(tracking_uri)
        return unquote(parts.username) if parts.username and parts.password is not None else None
    except ValueError:
        return None


def _username() -> str | None:
    """The user MLflow logs in as: MLFLOW_TRACKING_USERNAME, else ~/.mlflow/credentials."""
    try:
        from mlflow.utils.credentials import read_mlflow_creds

        return read_mlflow_creds().username
    except (ImportError, OSError, ValueError):
        return os.environ.get("MLFLOW_TRACKING_USERNAME")


_LOST_CONNECTION = (ConnectionError, OSError)


@contextmanager
def audit_run(
    tracking_uri: str,
    experiment: str,
    run_name: str | None = None,
    resume_run_id: str | None = None,
    expected_params: Mapping[str, Any] | None = None,
) -> Iterator[str]:
    """Open the audit's run (or the `mlflow run` project's run, or a run to resume) and check its artifact store.

    `expected_params`: the configuration this audit will log; a run to resume must have recorded the
    same values (OPERATIONAL_PARAMS aside), else TrackingError before anything is written to it.
    The run ends FINISHED; FAILED (tag cdi.status=failed) if the block raises; KILLED (cdi.status=
    interrupted) on `Interrupted` or KeyboardInterrupt, whose `run_id` is then set so the CLI can say
    how to resume. If the tracking store stops answering mid-audit, the features are already in the
    cache: the error says how to finish the same run with `--resume RUN_ID`.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    experiment_id = connect(tracking_uri, experiment)
    shown = redact_uri(tracking_uri)
    run_id = resume_run_id or os.environ.get("MLFLOW_RUN_ID")
    if resume_run_id:
        try:
            resumed = mlflow.get_run(resume_run_id)
        except MlflowException as exc:
            raise _refusal(exc, tracking_uri, None) or _tracking_error(
                f"--resume {resume_run_id}: no such run at {shown}; check the run id", tracking_uri) from exc
        if resumed.info.status == "FINISHED":
            raise TrackingError(f"--resume {resume_run_id}: the run is already finished; start a new audit instead")
        if expected_params is not None:
            _check_resumable(resume_run_id, resumed.data.params, expected_params, tracking_uri)
    system_metrics = _system_metrics_available()
    try:
        if run_id:
            active = mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics)
            if run_name and not resume_run_id and is_generated_run_name(active.info.run_name):
                mlflow.set_tag(RUN_NAME_TAG, run_name)  # `mlflow run` created it with a random name
        else:
            active = mlflow.start_run(experiment_id=experiment_id, run_name=run_name,
                                      log_system_metrics=system_metrics)
    except MlflowException as exc:  # e.g. a user who may read the experiment but not write to it (HTTP 403)
        refused = _refusal(exc, tracking_uri, None if run_id else experiment)
        if refused is None:
            raise
        raise refused from exc
    run_id = active.info.run_id
    try:
        check_artifact_store(run_id, tracking_uri)
        yield run_id
    except (Interrupted, KeyboardInterrupt) as exc:
        if isinstance(exc, Interrupted):
            exc.run_id = run_id
        try:
            _close_run("KILLED", "interrupted")
        except Interrupted as again:  # a second signal while closing: the run stays open for --resume
            again.run_id = run_id
            raise
        raise
    except BaseException as exc:
        lost = isinstance(exc, (MlflowException, *_LOST_CONNECTION)) and not isinstance(exc, TrackingError)
        _close_run("FAILED", "failed", tag=not _connection_failure(exc))
        if lost:
            raise _tracking_error(
                f"--tracking-uri {shown}: lost the tracking store mid-audit ({type(exc).__name__}); "
                f"the features are cached: when it is back, rerun the same command with --resume {run_id}",
                tracking_uri,
            ) from exc
        raise
    mlflow.end_run(status="FINISHED")


def is_generated_run_name(name: str | None) -> bool:
    """Whether `name` is one MLflow made up (`<adjective>-<noun>-<number>`, as `mlflow run` without --run-name
    gives): then cdi names the run; a name the user or a pipeline step chose is kept."""
    if not name:
        return True
    parts = name.split("-")
    if len(parts) != 3 or not parts[2].isdigit():
        return False
    try:  # MLflow's word lists are not public API: without them, any "word-word-number" counts as made up
        from mlflow.utils.name_utils import _GENERATOR_NOUNS, _GENERATOR_PREDICATES
    except ImportError:
        return parts[0].isalpha() and parts[1].isalpha()
    return parts[0] in _GENERATOR_PREDICATES and parts[1] in _GENERATOR_NOUNS


def _system_metrics_available() -> bool | None:
    """True (record `system/*` metrics: CPU, memory, disk, GPU) when psutil is importable, sampling every
    SYSTEM_METRICS_INTERVAL_S unless MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL is set; else None (MLflow's default)."""
    try:
        import psutil  # noqa: F401
    except ImportError:
        return None
    os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", str(SYSTEM_METRICS_INTERVAL_S))
    return True


def _close_run(status: str, cdi_status: str, tag: bool = True) -> None:
    """End the active run with `status` and tag cdi.status, as far as the store still answers."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if tag:
        try:
            mlflow.set_tag(STATUS_TAG, cdi_status)
        except (MlflowException, *_LOST_CONNECTION):
            pass
    try:
        mlflow.end_run(status=status)
    except (MlflowException, *_LOST_CONNECTION):
        pass  # the store is gone: the run stays open for --resume


def _connection_failure(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is a lost connection: then the store is not asked again for a tag."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, _LOST_CONNECTION):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _check_resumable(run_id: str, recorded: Mapping[str, str], expected: Mapping[str, Any],
                     tracking_uri: str) -> None:
    """Refuse to resume a run that is not a cdi audit or that recorded other values than `expected`."""
    if recorded and "model_fingerprint" not in recorded:
        raise TrackingError(f"--resume {run_id}: that run is not a cdi audit (it has no model_fingerprint param); "
                            "pass the run id an interrupted `cdi audit` printed, or start a new audit")
    differences = []
    for key, value in expected.items():
        if key not in recorded or key in OPERATIONAL_PARAMS or key.startswith(OPERATIONAL_PREFIXES):
            continue
        now = _stored_param(value, tracking_uri)
        if recorded[key] != now:
            differences.append((key, recorded[key], now))
    if not differences:
        return
    ranking = (*_MODEL_PARAMS, *_IMAGE_PARAMS)
    differences.sort(key=lambda found: ranking.index(found[0]) if found[0] in ranking else len(ranking))
    key, was, now = differences[0]
    what = "another model" if key in _MODEL_PARAMS else "other images" if key in _IMAGE_PARAMS else "other settings"
    others = len(differences) - 1
    more = f"; {others} more difference{'s' if others > 1 else ''}" if others else ""
    raise _tracking_error(
        f"--resume {run_id}: that run audited {what} ({key} {_short(was)} vs {_short(now)}{more}); "
        "start a new audit or pass the same options", tracking_uri)


def _short(value: str) -> str:
    return value if len(value) <= 16 else f"{value[:12]}..."


def check_artifact_store(run_id: str, tracking_uri: str | None = None) -> None:
    """Write `cdi-store-check.txt` to the run's artifact store, list it back, delete it; TrackingError if that fails.

    `audit_run` calls it right after the run starts, so an artifact store that does not work (a scheme
    MLflow does not know, a bucket that does not answer, a server that cannot write its
    --artifacts-destination) fails in seconds, before any model pass, rather than after the audit.
    Bounded by STORE_CHECK_TIMEOUT_S whatever the store does.
    """
    import mlflow

    tracking_uri = tracking_uri or mlflow.get_tracking_uri()
    active = mlflow.active_run()
    artifact_uri = (active.info.artifact_uri if active is not None and active.info.run_id == run_id
                    else mlflow.MlflowClient(tracking_uri).get_run(run_id).info.artifact_uri)
    failures: list[BaseException] = []

    def store_check() -> None:
        try:
            _store_round_trip(artifact_uri, tracking_uri, run_id)
        except Exception as exc:  # whatever the store raises (MlflowException, OSError, botocore's): it fails
            failures.append(exc)

    worker = threading.Thread(target=store_check, name="cdi-store-check", daemon=True)
    worker.start()
    worker.join(STORE_CHECK_TIMEOUT_S)
    if worker.is_alive():
        problem = f"no answer within {STORE_CHECK_TIMEOUT_S} s"
    elif failures:
        problem = _first_line(failures[0])
    else:
        return
    raise _tracking_error(
        f"--tracking-uri {redact_uri(tracking_uri)}: run {run_id} cannot store artifacts at "
        f"{redact_uri(artifact_uri)} ({problem}); {_artifact_store_fix(artifact_uri, tracking_uri)}", tracking_uri)


def _store_round_trip(artifact_uri: str, tracking_uri: str, run_id: str) -> None:
    """Write the check file, find it (name and size) in the store's listing, delete it.

    Read back through the listing rather than a download: MLflow's download prints a progress bar.
    """
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repository = get_artifact_repository(artifact_uri, tracking_uri=tracking_uri)
    text = f"cdi: this run's artifact store answered (run {run_id})\n"
    with tempfile.TemporaryDirectory() as tmp:
        written = Path(tmp) / STORE_CHECK_ARTIFACT
        written.write_text(text)
        repository.log_artifact(str(written))
        size = written.stat().st_size
    listed = {info.path: info.file_size for info in repository.list_artifacts()}
    if STORE_CHECK_ARTIFACT not in listed or listed[STORE_CHECK_ARTIFACT] not in (size, None):
        raise OSError(f"{STORE_CHECK_ARTIFACT} was written but the store does not list it back")
    try:
        repository.delete_artifacts(STORE_CHECK_ARTIFACT)
    except Exception as exc:  # e.g. no delete permission on the bucket: a leftover check file is harmless
        log.debug("could not delete %s: %s", STORE_CHECK_ARTIFACT, redact_text(str(exc), tracking_uri))


def _artifact_store_fix(artifact_uri: str, tracking_uri: str) -> str:
    from mlflow.store.artifact.artifact_repository_registry import get_registered_artifact_repositories

    scheme = urlsplit(artifact_uri).scheme.lower()
    served = tracking_uri.startswith(("http://", "https://"))
    if scheme and scheme not in get_registered_artifact_repositories():
        where = "the server's --default-artifact-root" if served else "the experiment's artifact location"
        return (f"MLflow has no artifact store for {scheme}://; fix {where}, "
                "or pass --experiment with a new name to use the default location")
    if scheme in ("mlflow-artifacts", "http", "https"):
        return ("the tracking server cannot store artifacts: ask its admin to check its --artifacts-destination "
                "and the credentials for it")
    if scheme in ("s3", "gs", "wasbs", "abfss"):
        return ("check that the bucket exists and answers, its endpoint (MLFLOW_S3_ENDPOINT_URL for S3) and your "
                "credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY), or pass --experiment with a new name")
    return "check that the folder exists and can be written, or pass --experiment with a new name"


def experiment_name(run_id: str) -> str:
    import mlflow

    return mlflow.get_experiment(mlflow.get_run(run_id).info.experiment_id).name


def log_params(params: Mapping[str, Any]) -> None:
    """Log params; keys that `mlflow run` already logged from the MLproject keep their value, and a value
    of None (an option not given, a setting that does not apply) is not logged at all.

    Values are stored without the tracking URI's secrets (see `redact_text`).
    """
    import mlflow

    run = mlflow.active_run()
    existing = mlflow.MlflowClient().get_run(run.info.run_id).data.params if run else {}
    uri = mlflow.get_tracking_uri()
    mlflow.log_params({key: _stored_param(value, uri) for key, value in params.items()
                       if key not in existing and value is not None})


def log_metrics(metrics: Mapping[str, float]) -> None:
    import mlflow

    mlflow.log_metrics({key: float(value) for key, value in metrics.items()})


def set_tags(tags: Mapping[str, str]) -> None:
    """Set tags, without the tracking URI's secrets."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    mlflow.set_tags({key: redact_text(str(value), uri) for key, value in tags.items()})


def download_json(run_id: str, artifact: str, tracking_uri: str) -> dict:
    """A JSON artifact of a past run."""
    import mlflow
    from mlflow.exceptions import MlflowException

    _bound_retries()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        return json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/{artifact}"))
    except (MlflowException, OSError, ValueError) as exc:
        raise _tracking_error(f"run {run_id}: cannot read {artifact} ({_first_line(exc)}); "
                              "check the run id and --tracking-uri", tracking_uri) from exc


def download_table(run_id: str, artifact: str, tracking_uri: str) -> "Any":
    import io

    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    _bound_retries()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        return pd.read_csv(io.StringIO(mlflow.artifacts.load_text(f"runs:/{run_id}/{artifact}")))
    except (MlflowException, OSError, ValueError) as exc:
        raise TrackingError(f"run {run_id}: cannot read {artifact}; check the run id and --tracking-uri") from exc


def _param_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _stored_param(value: Any, tracking_uri: str | None) -> str:
    """A param as `log_params` stores it: stringified, the tracking URI's secrets masked."""
    return redact_text(_param_value(value), tracking_uri)
