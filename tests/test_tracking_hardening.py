"""Tracking stores that leak, race, stall or cannot store artifacts; runs that must not be resumed; interrupts.

Real components only: SQLite stores, `mlflow server` processes on 127.0.0.1, a stalling HTTP server in a
thread, boto3 against a closed port. Every process and thread started here is ended here.
"""

from __future__ import annotations

import json

import http.server
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest

from cdi import tracking
from cdi.tracking import audit as audit_layout
from cdi.errors import Interrupted, TrackingError

from builders import free_port

USER, PASSWORD = "alice", "s3cret-Passw0rd"
SETTINGS = {"model_fingerprint": "a" * 64, "images_sha256": "b" * 64, "n_suspect": 12, "n_control": 12,
            "features": ["DL", "SecMI"], "seed": 0, "alpha": 0.01, "precision": "32-true", "batch_size": 16,
            "model_path": "/models/one", "version.cdi": "0.1.0"}


@pytest.fixture
def default_network_settings(monkeypatch):
    """The variables cdi fills in when unset: unset here, restored afterwards (setenv records the original)."""
    names = [*tracking.HTTP_RETRY_DEFAULTS, *tracking.S3_RETRY_DEFAULTS, "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"]
    for name in names:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)


@contextmanager
def _mlflow_server(root: Path, artifacts_destination: Path):
    """A real `mlflow server` (SQLite, proxied artifacts), without the job runner's eight processes, and its URL.

    Unlike builders.start_mlflow_server, a /health that is slow to answer on loaded cores is waited for,
    and the process group is ended whatever happens.
    """
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "OMP_NUM_THREADS": "1"}
    with open(root / "server.log", "a") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination",
             str(artifacts_destination)], stdout=subprocess.DEVNULL, stderr=log, env=env, cwd=root,
            start_new_session=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 180
        while not _answers(f"{url}/health"):
            assert proc.poll() is None and time.monotonic() < deadline, (root / "server.log").read_text()[-2000:]
            time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def _answers(url: str) -> bool:
    import requests

    try:
        return requests.get(url, timeout=5).ok
    except requests.RequestException:
        return False


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    with _mlflow_server(root, root / "artifacts") as url:
        yield url, root


class _TinyServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    mode = "stall"  # "stall": sleep on every API call; "refuse": HTTP 401
    released: threading.Event


class _Handler(http.server.BaseHTTPRequestHandler):
    def _answer(self) -> None:
        if self.path.startswith("/health"):
            self._send(200, b"OK")
        elif self.server.mode == "refuse":
            self._send(401, b"You are not authenticated.")
        else:
            self.server.released.wait(120)

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def tiny_server():
    """A server that answers /health and stalls (or refuses) everything else; set `.mode` before use."""
    server = _TinyServer(("127.0.0.1", 0), _Handler)
    server.released = threading.Event()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.released.set()
    server.shutdown()
    server.server_close()
    thread.join(10)


def _with_login(url: str) -> str:
    return url.replace("http://", f"http://{USER}:{PASSWORD}@", 1)


def _new_experiment(tracking_uri: str, **kwargs) -> str:
    import mlflow

    name = f"hardening-{uuid.uuid4().hex[:8]}"
    mlflow.MlflowClient(tracking_uri).create_experiment(name, **kwargs)
    return name


def _only_run(tracking_uri: str, experiment: str):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    [run] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


# 1. Secrets


@pytest.mark.parametrize(("uri", "expected"), [
    ("http://alice:s3cret@team:5000", "http://alice:***@team:5000"),
    ("https://alice:p@ss:w0rd@team.example/mlflow", "https://alice:***@team.example/mlflow"),
    ("postgresql://bob:hunter2@db:5432/mlflow", "postgresql://bob:***@db:5432/mlflow"),
    ("https://team/?token=abc&experiment=1", "https://team/?token=***&experiment=1"),
    ("https://team/x?access_token=abc&password=def&sig=ghi", "https://team/x?access_token=***&password=***&sig=***"),
    ("s3://bucket/x?X-Amz-Signature=abc&design=1", "s3://bucket/x?X-Amz-Signature=***&design=1"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
    ("http://alice@team:5000", "http://alice@team:5000"),  # a user name alone is not a secret
])
def test_redact_uri_masks_the_password_and_token_like_parameters(uri, expected):
    assert tracking.redact_uri(uri) == expected


def test_redact_text_removes_the_secret_wherever_it_stands_but_leaves_numbers_and_hashes():
    uri = f"http://{USER}:{PASSWORD}@team:5000/?token=abcdefghijkl"
    text = (f"API request to {uri} failed; other store postgresql://bob:hunter2@db/x; "
            f"password was {PASSWORD}; token abcdefghijkl")
    assert tracking.redact_text(text, uri) == (
        "API request to http://alice:***@team:5000/?token=*** failed; other store "
        "postgresql://bob:***@db/x; password was ***; token ***")
    short = "http://bob:1234@team"  # too short to replace everywhere: only where it stands in a URI
    assert tracking.redact_text("p = 0.1234, http://bob:1234@team", short) == "p = 0.1234, http://bob:***@team"
    assert tracking.redact_value({"p": 0.1234, "sha256": "1234" * 16, "store": short}, short) == {
        "p": 0.1234, "sha256": "1234" * 16, "store": "http://bob:***@team"}
    value = {"tracking_uri": uri, "p_value": 0.5, "runs": [uri, 3], "sha256": "1234" * 16}
    assert tracking.redact_value(value, uri) == {"tracking_uri": "http://alice:***@team:5000/?token=***",
                                                 "p_value": 0.5, "runs": ["http://alice:***@team:5000/?token=***", 3],
                                                 "sha256": "1234" * 16}


def test_a_password_in_a_logged_value_is_masked_in_an_sqlite_store(tracking_uri, default_network_settings):
    import mlflow

    experiment = _new_experiment(tracking_uri)
    foreign = f"postgresql://bob:{PASSWORD}@db:5432/mlflow"
    with tracking.audit_run(tracking_uri, experiment) as run_id:
        tracking.log_params({"backend": foreign, "seed": 0})
        tracking.set_tags({"cdi.backend": foreign})
    run = mlflow.MlflowClient(tracking_uri).get_run(run_id)
    assert run.data.params["backend"] == "postgresql://bob:***@db:5432/mlflow"
    assert run.data.tags["cdi.backend"] == "postgresql://bob:***@db:5432/mlflow"


def test_a_password_in_the_tracking_uri_reaches_no_param_tag_artifact_output_or_log(
        mlflow_server, default_network_settings, capfd, caplog):
    import mlflow

    url, root = mlflow_server
    uri = _with_login(url)  # a plain server ignores the login; MLflow still sends it as basic auth
    caplog.set_level("DEBUG")
    with tracking.audit_run(uri, "secrets") as run_id:
        tracking.log_params({"tracking_uri": uri, "note": f"copied {PASSWORD}", "model_fingerprint": "f" * 64})
        tracking.set_tags({"cdi.status": "done", "cdi.where": uri})
        table = pd.DataFrame({"path": [f"/data/{PASSWORD}/a.png"], "DL": [0.125]})
        audit_layout.log_evidence({"tracking_uri": uri, "p_value": 0.5, "runs": [{"uri": uri}]}, table,
                              f"logged to {uri}", {"tracking_uri": uri}, f"<p>{uri}</p>")
    printed = capfd.readouterr()
    assert PASSWORD not in printed.out + printed.err
    assert not [r for r in caplog.records if PASSWORD in r.getMessage()]

    client = mlflow.MlflowClient(url)
    run = client.get_run(run_id)
    masked = _with_login(url).replace(PASSWORD, "***")
    assert run.data.params["tracking_uri"] == masked and run.data.params["note"] == "copied ***"
    assert run.data.tags["cdi.where"] == masked and run.data.tags["mlflow.note.content"] == f"logged to {masked}"
    assert {a.path for a in client.list_artifacts(run_id)} == {  # the store check left nothing behind
        "features.csv", "manifest.json", "report.html", "result.json", "summary.md"}
    assert mlflow.artifacts.load_text(f"{run.info.artifact_uri}/features.csv").splitlines() == [
        "path,DL", "/data/***/a.png,0.125"]
    stored = [path for path in root.rglob("*") if path.is_file()]  # the server's database, artifacts and log
    assert len(stored) > 5 and not [path for path in stored if PASSWORD.encode() in path.read_bytes()]


def test_cdi_audit_with_a_password_in_the_uri_prints_writes_and_stores_it_masked(
        mlflow_server, default_network_settings, tiny_model, image_sets, tmp_path, capfd):
    """The issue's case end to end: `cdi audit --tracking-uri http://user:password@host --output FILE`."""
    import mlflow

    from cdi.cli import main

    url, root = mlflow_server
    output = tmp_path / "result.json"
    code = main(["audit", "--model", str(tiny_model), "--suspect", str(image_sets[0]), "--control",
                 str(image_sets[1]), "--tracking-uri", _with_login(url), "--experiment", "secrets-cli",
                 "--access", "gray", "--features", "DL", "--permutations", "100", "--power-resamples", "0",
                 "--no-progress", "--output", str(output)])
    printed = capfd.readouterr()
    assert code == 0, printed.err
    assert PASSWORD not in printed.out + printed.err + output.read_text()
    result = json.loads(output.read_text())
    assert result["tracking_uri"] == _with_login(url).replace(PASSWORD, "***")
    assert f"{USER}:***@" in printed.out
    stored = mlflow.artifacts.load_text(f"{mlflow.MlflowClient(url).get_run(result['run_id']).info.artifact_uri}/result.json")
    assert PASSWORD not in stored and json.loads(stored)["tracking_uri"] == result["tracking_uri"]
    assert not [path for path in root.rglob("*") if path.is_file() and PASSWORD.encode() in path.read_bytes()]


def test_errors_name_the_tracking_uri_without_its_password(tiny_server, default_network_settings):
    closed = _with_login(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(TrackingError) as caught:
        tracking.connect(closed, "cdi-audits")
    assert str(caught.value) == (f"--tracking-uri {closed.replace(PASSWORD, '***')}: the tracking server does not "
                                 "answer (ConnectionError); start it or pass a reachable URI")

    tiny_server.mode = "refuse"
    refusing = _with_login(f"http://127.0.0.1:{tiny_server.server_address[1]}")
    with pytest.raises(TrackingError) as caught:
        tracking.connect(refusing, "cdi-audits")
    assert str(caught.value) == (f"--tracking-uri {refusing.replace(PASSWORD, '***')}: the tracking server refused "
                                 "the login of user 'alice' (HTTP 401); check the user name and password in "
                                 "--tracking-uri")


# 2. Concurrent first use of a new SQLite store

_CONNECT_ON_GO = """
import sys
import mlflow, sqlalchemy  # imported before the start, so both processes reach connect together
from cdi import tracking
print("ready", flush=True)
for line in sys.stdin:
    try:
        tracking.connect(line.strip(), "cdi-audits")
        print("ok", flush=True)
    except BaseException as exc:
        print("failed:", type(exc).__name__, str(exc).splitlines()[0], flush=True)
"""


def test_two_processes_creating_a_new_sqlite_store_at_once_both_succeed(tmp_path):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(tracking.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    workers = [subprocess.Popen([sys.executable, "-c", _CONNECT_ON_GO], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, env=env, cwd=tmp_path) for _ in range(2)]
    try:
        assert [w.stdout.readline().strip() for w in workers] == ["ready", "ready"]
        for round_ in range(3):  # each round a new database, both processes told to go at the same moment
            uri = f"sqlite:///{tmp_path / f'round{round_}' / 'mlflow.db'}"
            for worker in workers:
                worker.stdin.write(f"{uri}\n")
            for worker in workers:
                worker.stdin.flush()
            assert [w.stdout.readline().strip() for w in workers] == ["ok", "ok"], round_
    finally:
        for worker in workers:
            worker.kill()
            worker.wait(30)


# 3. Bad stores fail fast, in one line


def test_an_sqlite_uri_naming_a_folder_or_another_file_fails_at_once(tmp_path, default_network_settings):
    started = time.monotonic()
    with pytest.raises(TrackingError) as caught:
        tracking.connect(f"sqlite:///{tmp_path}", "cdi-audits")
    assert str(caught.value) == (f"--tracking-uri sqlite:///{tmp_path}: {tmp_path} is a folder, not a database file; "
                                 f"pass a file in it, e.g. sqlite:///{tmp_path / 'mlflow.db'}")
    text = tmp_path / "notes.db"
    text.write_text("not a database\n")
    with pytest.raises(TrackingError, match=r"notes.db is not an SQLite database; pass the right file"):
        tracking.connect(f"sqlite:///{text}", "cdi-audits")
    assert time.monotonic() - started < 10


def test_a_server_that_answers_health_but_stalls_its_api_fails_within_30_s(tiny_server, default_network_settings):
    uri = _with_login(f"http://127.0.0.1:{tiny_server.server_address[1]}")
    started = time.monotonic()
    with pytest.raises(TrackingError) as caught:
        tracking.connect(uri, "cdi-audits")
    assert time.monotonic() - started < 30
    assert str(caught.value) == (f"--tracking-uri {uri.replace(PASSWORD, '***')}: the tracking server answers /health "
                                 f"but not its API (no answer within {tracking.PROBE_TIMEOUT_S} s); check the server "
                                 "and its database, or pass a reachable URI")
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "30" and os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"


def test_user_chosen_http_settings_are_kept(tracking_uri, default_network_settings, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")
    tracking.connect(tracking_uri, "cdi-audits")
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "300" and os.environ["AWS_MAX_ATTEMPTS"] == "3"


def _audit_fails_on_the_artifact_store(tracking_uri: str, experiment: str) -> str:
    body_ran = False
    started = time.monotonic()
    with pytest.raises(TrackingError) as caught:
        with tracking.audit_run(tracking_uri, experiment):
            body_ran = True
    assert not body_ran, "the audit went on with an artifact store that does not work"
    assert time.monotonic() - started < 45
    run = _only_run(tracking_uri, experiment)
    assert (run.info.status, run.data.tags["cdi.status"]) == ("FAILED", "failed")
    message = str(caught.value)
    assert len(message.splitlines()) == 1 and f"run {run.info.run_id} cannot store artifacts at " in message
    return message


def test_an_artifact_location_mlflow_does_not_know_fails_the_run_before_the_audit(tracking_uri,
                                                                                   default_network_settings):
    message = _audit_fails_on_the_artifact_store(tracking_uri, _new_experiment(tracking_uri,
                                                                               artifact_location="nonsense://x"))
    assert "at nonsense://x/" in message
    assert message.endswith("MLflow has no artifact store for nonsense://; fix the experiment's artifact location, "
                            "or pass --experiment with a new name to use the default location")


def test_an_s3_bucket_on_a_closed_port_fails_the_run_in_seconds(tracking_uri, default_network_settings, monkeypatch):
    pytest.importorskip("boto3")
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    message = _audit_fails_on_the_artifact_store(tracking_uri, _new_experiment(
        tracking_uri, artifact_location="s3://cdi-bucket/audits"))
    assert "at s3://cdi-bucket/audits/" in message and "MLFLOW_S3_ENDPOINT_URL" in message


def test_a_server_that_cannot_write_its_artifacts_destination_fails_the_run_in_seconds(mlflow_server,
                                                                                      default_network_settings):
    """The module's server, whose destination folder for this experiment's runs is a file: every artifact
    upload to it fails in the server, as on a server whose --artifacts-destination it cannot write."""
    import mlflow

    url, root = mlflow_server
    experiment = _new_experiment(url)
    location = mlflow.MlflowClient(url).get_experiment_by_name(experiment)
    assert location.artifact_location == f"mlflow-artifacts:/{location.experiment_id}"  # proxied to root/artifacts
    (root / "artifacts").mkdir(exist_ok=True)
    (root / "artifacts" / location.experiment_id).write_text("a file where the server's artifact folder should be\n")
    message = _audit_fails_on_the_artifact_store(url, experiment)
    assert "at mlflow-artifacts:/" in message and "ask its admin to check its --artifacts-destination" in message


def test_a_failed_run_is_never_tagged_done(tracking_uri, default_network_settings):
    experiment = _new_experiment(tracking_uri)
    with pytest.raises(RuntimeError):
        with tracking.audit_run(tracking_uri, experiment):
            tracking.set_tags({"cdi.status": "done"})
            raise RuntimeError("logging the evidence failed")
    run = _only_run(tracking_uri, experiment)
    assert (run.info.status, run.data.tags["cdi.status"]) == ("FAILED", "failed")


# 4. Resume only a matching run; 5. interrupts


def _interrupted_run(tracking_uri: str, experiment: str, params: dict | None = None) -> str:
    with pytest.raises(Interrupted) as caught:
        with tracking.audit_run(tracking_uri, experiment) as run_id:
            if params is not None:
                tracking.log_params(params)
            raise Interrupted(signal.SIGTERM)
    assert caught.value.run_id == run_id
    return run_id


def test_an_interrupt_leaves_a_killed_run_and_carries_its_id(tracking_uri, default_network_settings):
    import mlflow

    experiment = _new_experiment(tracking_uri)
    with pytest.raises(Interrupted) as caught:
        with tracking.audit_run(tracking_uri, experiment) as run_id:
            raise Interrupted(signal.SIGINT)
    assert caught.value.run_id == run_id and caught.value.exit_code == 130
    run = mlflow.MlflowClient(tracking_uri).get_run(run_id)
    assert (run.info.status, run.data.tags["cdi.status"]) == ("KILLED", "interrupted")


def test_resume_refuses_a_run_that_audited_something_else_before_writing_to_it(tracking_uri,
                                                                               default_network_settings):
    import mlflow

    experiment = _new_experiment(tracking_uri)
    run_id = _interrupted_run(tracking_uri, experiment, SETTINGS)
    before = mlflow.MlflowClient(tracking_uri).get_run(run_id)
    other = {**SETTINGS, "model_fingerprint": "c" * 64, "seed": 1, "alpha": 0.05}
    with pytest.raises(TrackingError) as caught:
        with tracking.audit_run(tracking_uri, experiment, resume_run_id=run_id, expected_params=other):
            pytest.fail("the run was resumed")
    assert str(caught.value) == (f"--resume {run_id}: that run audited another model (model_fingerprint "
                                 "aaaaaaaaaaaa... vs cccccccccccc...; 2 more differences); start a new audit or pass "
                                 "the same options")
    with pytest.raises(TrackingError, match=r"that run audited other images \(images_sha256 bbbbbbbbbbbb\.\.\. vs "
                                            r"dddddddddddd\.\.\.\); start a new audit"):
        with tracking.audit_run(tracking_uri, experiment, resume_run_id=run_id,
                                expected_params={**SETTINGS, "images_sha256": "d" * 64}):
            pytest.fail("the run was resumed")
    with pytest.raises(TrackingError, match=r"that run audited other settings \(precision 32-true vs 16-mixed\)"):
        with tracking.audit_run(tracking_uri, experiment, resume_run_id=run_id,
                                expected_params={**SETTINGS, "precision": "16-mixed"}):
            pytest.fail("the run was resumed")
    after = mlflow.MlflowClient(tracking_uri).get_run(run_id)
    assert (after.info.status, after.info.end_time, after.data.tags) == (
        "KILLED", before.info.end_time, before.data.tags)


def test_resume_accepts_the_same_audit_with_other_batch_size_paths_and_versions(tracking_uri,
                                                                                default_network_settings):
    experiment = _new_experiment(tracking_uri)
    run_id = _interrupted_run(tracking_uri, experiment, SETTINGS)
    same = {**SETTINGS, "batch_size": 64, "model_path": "/moved/one", "version.cdi": "0.2.0", "new_param": 1}
    with tracking.audit_run(tracking_uri, experiment, resume_run_id=run_id, expected_params=same) as resumed:
        assert resumed == run_id
    crashed_early = _interrupted_run(tracking_uri, experiment)  # no params at all: resumable
    with tracking.audit_run(tracking_uri, experiment, resume_run_id=crashed_early, expected_params=same) as resumed:
        assert resumed == crashed_early


def test_resume_refuses_a_run_that_is_not_a_cdi_audit(tracking_uri, default_network_settings):
    experiment = _new_experiment(tracking_uri)
    run_id = _interrupted_run(tracking_uri, experiment, {"study_name": "search", "n_trials": 20})
    with pytest.raises(TrackingError) as caught:
        with tracking.audit_run(tracking_uri, experiment, resume_run_id=run_id, expected_params=SETTINGS):
            pytest.fail("the run was resumed")
    assert str(caught.value) == (f"--resume {run_id}: that run is not a cdi audit (it has no model_fingerprint param); "
                                 "pass the run id an interrupted `cdi audit` printed, or start a new audit")
