"""`cdi calibrate` end to end: false-positive rate and power on known members and non-members, as a run."""

from __future__ import annotations

import json

import mlflow

from cdi.cli import main

from builders import write_images


def test_cdi_calibrate_reports_error_rates_and_logs_them(tiny_model, tracking_uri, tmp_path, capsys):
    members = write_images(tmp_path / "members", 24, seed=21, prefix="m")
    nonmembers = [write_images(tmp_path / "n1", 20, seed=22, prefix="a"), write_images(tmp_path / "n2", 20, seed=23,
                                                                                      prefix="b")]
    output = tmp_path / "calibration.json"
    code = main(["calibrate", "--model", str(tiny_model), "--members", str(members), "--nonmembers",
                 ",".join(map(str, nonmembers)), "--access", "gray", "--null-audits", "20", "--resamples", "5",
                 "--permutations", "100", "--threads", "1", "--no-progress", "--output", str(output)])
    out = capsys.readouterr().out
    assert code == 0
    result = json.loads(output.read_text())
    assert {row["test"] for row in result["false_positive"]} >= {"permutation"}
    for row in result["false_positive"]:
        assert row["n_audits"] == 20 and 0.0 <= row["ci_low"] <= row["rate"] <= row["ci_high"] <= 1.0
    assert result["power_vs_n"] and all(0.0 <= row["power"] <= 1.0 for row in result["power_vs_n"])
    assert "false-positive rate (permutation, alpha 0.01)" in out
    run_id = out.split("run: ")[1].split()[0]
    run = mlflow.MlflowClient(tracking_uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert any(key.startswith("stats.fpr_permutation_0.01") for key in run.data.metrics)
    artifacts = {a.path for a in mlflow.MlflowClient(tracking_uri).list_artifacts(run_id)}
    assert {"calibration.json", "false_positive_rate.csv", "power.csv", "power_vs_n.png"} <= artifacts


def test_cdi_calibrate_with_too_few_nonmembers_is_one_line(tiny_model, tracking_uri, tmp_path, capsys):
    members = write_images(tmp_path / "members", 12, seed=31, prefix="m")
    few = write_images(tmp_path / "few", 8, seed=32, prefix="f")
    code = main(["calibrate", "--model", str(tiny_model), "--members", str(members), "--nonmembers", str(few),
                 "--access", "gray", "--null-audits", "5", "--resamples", "2", "--permutations", "100",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert "--nonmembers: 8 non-member image(s)" in line and "add non-member images" in line
