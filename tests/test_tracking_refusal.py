"""A tracking server that refuses the login (HTTP 401) or the user (HTTP 403): one line with the fix, exit code 2.

The live basic-auth server is in tests/integration/test_team_auth.py; here MLflow's client raises the
exceptions it raises for those answers, so the cases the live server does not reach are covered too.
"""

from __future__ import annotations

import pytest

from cdi import tracking
from cdi.cli import main
from cdi.errors import TrackingError
from cdi.features import extraction


def _refused(status: int, endpoint: str):
    """What MLflow's REST client raises for a non-JSON error answer (e.g. the auth app's)."""
    from mlflow.exceptions import MlflowException, get_error_code

    body = "Permission denied" if status == 403 else "You are not authenticated."
    return MlflowException(f"API request to endpoint {endpoint} failed with error code {status} != 200. "
                           f"Response body: '{body}'", error_code=get_error_code(status))


@pytest.fixture
def no_login(monkeypatch, tmp_path):
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.mlflow/credentials


def test_a_user_who_may_not_write_to_the_experiment_is_told_before_any_model_pass(
        tracking_uri, no_login, tiny_model, image_sets, monkeypatch, capsys):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")

    def start_run(*args, **kwargs):
        raise _refused(403, "/api/2.0/mlflow/runs/create")

    def no_model_pass(*args, **kwargs):
        raise AssertionError("a model pass ran before the permission was checked")

    monkeypatch.setattr(mlflow, "start_run", start_run)
    monkeypatch.setattr(extraction, "_predict", no_model_pass)
    code = main(["audit", "--model", str(tiny_model), "--suspect", str(image_sets[0]), "--control",
                 str(image_sets[1]), "--access", "gray", "--no-progress", "--experiment", "team-audits"])
    assert code == 2
    assert capsys.readouterr().err == (
        f"cdi: error: --tracking-uri {tracking_uri}: user 'bob' lacks permission on experiment 'team-audits' "
        "(HTTP 403); ask an admin of the server for EDIT permission on it, or pass --experiment with a new name\n")


def test_resuming_a_run_the_user_may_not_read(tracking_uri, no_login, monkeypatch):
    import mlflow

    monkeypatch.setattr(mlflow, "get_run", lambda run_id: (_ for _ in ()).throw(_refused(403, "/runs/get")))
    with pytest.raises(TrackingError) as caught:
        with tracking.audit_run(tracking_uri, "cdi-audits", resume_run_id="abc123"):
            pytest.fail("the run was opened")
    assert str(caught.value) == (f"--tracking-uri {tracking_uri}: this login lacks permission on the run's experiment "
                                 "(HTTP 403); ask an admin of the server for EDIT permission on it")


@pytest.mark.parametrize(("environment", "expected"), [
    ({}, "the tracking server requires a login (HTTP 401); "
         "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to your account on it"),
    ({"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "wrong"},
     "the tracking server refused the login of user 'alice' (HTTP 401); "
     "check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"),
    ({"MLFLOW_TRACKING_TOKEN": "stale"},
     "the tracking server refused the token in MLFLOW_TRACKING_TOKEN (HTTP 401); "
     "check the token, or set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD instead"),
])
def test_a_refused_login_names_the_variables_to_set(tracking_uri, no_login, monkeypatch, environment, expected):
    import mlflow

    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(mlflow, "get_experiment_by_name",
                        lambda name: (_ for _ in ()).throw(_refused(401, "/experiments/get-by-name")))
    with pytest.raises(TrackingError) as caught:
        tracking.connect(tracking_uri, "cdi-audits")
    assert str(caught.value) == f"--tracking-uri {tracking_uri}: {expected}"


def test_other_store_errors_keep_the_unreachable_message(tracking_uri, no_login, monkeypatch):
    import mlflow

    monkeypatch.setattr(mlflow, "get_experiment_by_name",
                        lambda name: (_ for _ in ()).throw(_refused(500, "/experiments/get-by-name")))
    with pytest.raises(TrackingError, match="cannot use the tracking store .*; start the server or pass a reachable URI"):
        tracking.connect(tracking_uri, "cdi-audits")
