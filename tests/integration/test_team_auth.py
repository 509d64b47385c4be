"""`cdi server --app-name basic-auth`, set up as README "Running cdi for a team" says, with live audits."""

from __future__ import annotations

import json
import secrets

import pytest
import requests

from cdi.cli import main
from cdi.features import extraction


@pytest.fixture
def auth_server(cdi_server, client_env, tmp_path):
    """A basic-auth `cdi server` (SQLite runs, local artifacts) with the README's auth.ini and an admin."""
    pytest.importorskip("flask_wtf", reason="MLflow's auth extra is needed: pip install \"cdi[auth]\"")
    pytest.importorskip("mlflow.server.auth", reason="MLflow's auth extra is needed: pip install \"cdi[auth]\"")
    root = tmp_path / "srv"
    root.mkdir()
    (root / "auth.ini").write_text(
        "[mlflow]\n"
        "default_permission = EDIT\n"
        f"database_uri = sqlite:///{root / 'basic_auth.db'}\n"
        "admin_username = admin\n"
    )
    admin_password = secrets.token_urlsafe(18)
    env = client_env(MLFLOW_AUTH_CONFIG_PATH=str(root / "auth.ini"), MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(32),
                     MLFLOW_AUTH_ADMIN_PASSWORD=admin_password)
    server = cdi_server(["--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination",
                         str(root / "artifacts"), "--workers", "1", "--app-name", "basic-auth"], env, name="auth-server")
    return server, ("admin", admin_password)


def _audit_args(model, image_sets, url, cache):
    return ["audit", "--model", str(model), "--suspect", str(image_sets[0]), "--control", str(image_sets[1]),
            "--tracking-uri", url, "--access", "gray", "--power-resamples", "0", "--no-progress",
            "--cache-dir", str(cache)]


def test_basic_auth_server_refuses_audits_without_a_valid_login_and_takes_a_members_audit(
        auth_server, client_env, tiny_model, image_sets, tmp_path, monkeypatch, capsys):
    import mlflow

    server, admin = auth_server
    api = f"{server.url}/api/2.0/mlflow"
    # The shared experiment exists already (an admin made it): a member must be able to write to it.
    made = requests.post(f"{api}/experiments/create", json={"name": "cdi-audits"}, auth=admin, timeout=30)
    assert made.status_code == 200, made.text
    # The admin creates a member's account as the README says (its curl, here through requests).
    password = secrets.token_urlsafe(18)
    created = requests.post(f"{api}/users/create", json={"username": "alice", "password": password}, auth=admin,
                            timeout=30)
    assert created.status_code == 200, created.text
    cache = tmp_path / "cache"

    # No credentials (the environment of client_env, no ~/.mlflow/credentials): one line naming the problem
    # and the fix, exit code 2, before any model pass.
    for name in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME",
                 "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.mlflow/credentials
    real_predict = extraction._predict

    def no_model_pass(*args, **kwargs):
        raise AssertionError("a model pass ran before the login was checked")

    monkeypatch.setattr(extraction, "_predict", no_model_pass)
    capsys.readouterr()
    assert main([*_audit_args(tiny_model, image_sets, server.url, cache), "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"cdi: error: --tracking-uri {server.url}: the tracking server requires a login (HTTP 401)")
    assert "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in err
    assert not cache.exists() or not any(path.is_file() for path in cache.rglob("*"))  # no model pass ran

    # Wrong password: refused before any model pass.
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password + "x")
    assert main(_audit_args(tiny_model, image_sets, server.url, cache)) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"cdi: error: --tracking-uri {server.url}: the tracking server refused the login of user 'alice' "
                   "(HTTP 401); check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")

    # The member's own credentials: the audit finishes in the admin's experiment and the run is visible.
    monkeypatch.setattr(extraction, "_predict", real_predict)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    out = tmp_path / "result.json"
    assert main([*_audit_args(tiny_model, image_sets, server.url, cache), "--output", str(out)]) == 0, \
        capsys.readouterr().err
    result = json.loads(out.read_text())
    run = mlflow.MlflowClient(server.url).get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["stats.p_value"] == result["p_value"]
    assert run.info.experiment_id == made.json()["experiment_id"]
    assert "result.json" in {f.path for f in mlflow.MlflowClient(server.url).list_artifacts(result["run_id"])}
    # ... and only to logged-in users.
    assert requests.get(f"{api}/runs/get", params={"run_id": result["run_id"]}, timeout=30).status_code == 401
