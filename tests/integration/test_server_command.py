"""`cdi server` checks its stores before starting MLflow and prints the command without secrets."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from cdi.cli import main


def _with(url: str, password: str | None = None, database: str | None = None) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc
    if password is not None:
        user, host = netloc.split("@")
        netloc = f"{user.split(':')[0]}:{password}@{host}"
    return urlunsplit(parts._replace(netloc=netloc, path=f"/{database}" if database else parts.path))


def test_dry_run_prints_the_mlflow_command_with_the_password_masked(postgres_url, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_FLASK_SERVER_SECRET_KEY", "test-only")  # basic-auth refuses to start without one
    # The throwaway cluster trusts local connections, so any password connects.
    uri = _with(postgres_url, password="s3cret")
    code = main(["server", "--backend-store-uri", uri, "--artifacts-destination", str(tmp_path / "artifacts"),
                 "--port", "5123", "--workers", "3", "--app-name", "basic-auth", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    assert "s3cret" not in out
    assert f"MLFLOW_BACKEND_STORE_URI='{_with(postgres_url, password='***')}'" in out
    assert "-m mlflow server --serve-artifacts --artifacts-destination" in out
    assert "--host 127.0.0.1 --port 5123 --workers 3 --app-name basic-auth" in out


def test_a_missing_database_is_one_line_naming_the_option(postgres_url, tmp_path, capsys):
    uri = _with(postgres_url, database="no_such_database")
    code = main(["server", "--backend-store-uri", uri, "--artifacts-destination", str(tmp_path), "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("cdi: error: --backend-store-uri ") and "no_such_database" in err
    assert len(err.strip().splitlines()) == 1


def test_a_missing_bucket_is_one_line_naming_the_option(postgres_url, s3_endpoint, capsys, monkeypatch):
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    code = main(["server", "--backend-store-uri", postgres_url, "--artifacts-destination", "s3://no-such-bucket/x",
                 "--s3-endpoint-url", s3_endpoint, "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("cdi: error: --artifacts-destination s3://no-such-bucket/x: bucket no-such-bucket")


def test_a_file_store_is_refused(tmp_path, capsys):
    code = main(["server", "--backend-store-uri", str(tmp_path / "mlruns"), "--artifacts-destination", str(tmp_path),
                 "--dry-run"])
    assert code == 2
    assert "not a database URI" in capsys.readouterr().err
