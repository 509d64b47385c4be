"""`cdi audit` end to end on a tiny model: exit codes, result JSON, the MLflow run; user errors."""

from __future__ import annotations

import json
import subprocess
import sys

import mlflow
import pytest

from cdi.cli import main

REQUIRED_KEYS = {
    "p_value", "verdict", "alpha", "n_suspect", "n_control", "test", "statistic", "access",
    "features", "model_fingerprint", "run_id", "tracking_uri",
}


def audit_args(model, suspect, control, *extra):
    return ["audit", "--model", str(model), "--suspect", str(suspect), "--control", str(control),
            "--no-progress", "--batch-size", "12", *extra]


def test_audit_writes_result_json_and_a_complete_mlflow_run(tiny_model, image_sets, tracking_uri, tmp_path, capsys):
    out = tmp_path / "result.json"
    code = main(audit_args(tiny_model, *image_sets, "--output", str(out), "--experiment", "unit", "--seed", "2"))
    assert code == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert REQUIRED_KEYS <= set(result)
    assert result["verdict"] in ("used", "not_detected")
    assert result["verdict"] == ("used" if result["p_value"] < 0.01 else "not_detected")
    assert (result["n_suspect"], result["n_control"], result["access"]) == (12, 12, "white")
    assert len(result["features"]) == 26 and result["tracking_uri"] == tracking_uri
    assert f"verdict: {result['verdict']}" in printed and result["run_id"] in printed

    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "unit"
    assert run.data.metrics["stats.p_value"] == pytest.approx(result["p_value"])
    assert {"stats.t_statistic", "stats.auc"} <= set(run.data.metrics)
    params = run.data.params
    assert params["model_fingerprint"] == result["model_fingerprint"]
    assert (params["n_suspect"], params["access"], params["seed"], params["alpha"], params["folds"]) == (
        "12", "white", "2", "0.01", "5")
    assert {"version.cdi", "version.torch", "version.diffusers"} <= set(params)
    assert run.data.tags["cdi.verdict"] == result["verdict"]
    assert run.data.tags["cdi.model_fingerprint"] == result["model_fingerprint"]
    assert "Verdict" in run.data.tags["mlflow.note.content"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"features.csv", "result.json", "summary.md", "report.html", "manifest.json"} <= artifacts
    table = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/features.csv").splitlines()
    header = table[0].split(",")
    assert header[:4] == ["file_name", "path", "sha256", "set"] and header[-1] == "oof_score"
    assert "NO_delta" in header and len(table) == 25


def test_gray_access_computes_the_14_gradient_free_features(tiny_model, image_sets, tracking_uri, tmp_path):
    out = tmp_path / "gray.json"
    assert main(audit_args(tiny_model, *image_sets, "--access", "gray", "--output", str(out))) == 0
    features = json.loads(out.read_text())["features"]
    assert len(features) == 14 and not any(f.startswith(("GM_", "NO_")) for f in features)


def test_malformed_option_value_gets_one_line_and_exit_code_2(image_sets, tiny_model, tracking_uri, capsys):
    # Bad files, folders, models and option values have one test each in test_bad_input.py.
    with pytest.raises(SystemExit) as exit_:  # argparse refuses the value before main's handler
        main(audit_args(tiny_model, *image_sets, "--batch-size", "zero", "--experiment", "errors-bad-option"))
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2
    assert "--batch-size" in err and "see cdi audit --help" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    client = mlflow.MlflowClient(tracking_uri)
    assert client.get_experiment_by_name("errors-bad-option") is None


def test_console_script_prints_no_traceback_on_user_error(tmp_path, tracking_uri):
    proc = subprocess.run(
        [sys.executable, "-m", "cdi.cli", "audit", "--model", str(tmp_path), "--suspect", str(tmp_path),
         "--control", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("cdi: error:") and "Traceback" not in proc.stderr


def test_difficulty_calibration_with_pixel_components_runs_end_to_end(tiny_model, image_sets, tracking_uri, tmp_path):
    out = tmp_path / "result.json"
    code = main(audit_args(tiny_model, *image_sets, "--output", str(out), "--access", "gray", "--features", "DL,PIA",
                           "--difficulty-calibration", "image+pca", "--permutations", "100", "--power-resamples", "0"))
    assert code == 0
    calibration = json.loads(out.read_text())["calibration"]
    assert calibration["difficulty_calibration"] == "image+pca"
    assert calibration["difficulty_covariates"][:5] == ["mean", "spread", "ink_fraction", "zlib_bits", "edge_energy"]
    assert calibration["difficulty_covariates"][5:] == ["pca_1", "pca_2"]  # k = 24 images // 10
