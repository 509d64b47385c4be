"""The evidence an audit carries: result fields, manifest and `cdi verify`, the shift guard."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from cdi.cli import main

from builders import write_images

EVIDENCE_KEYS = {
    "null_check", "shift_check", "effect_size", "power_curve", "recommended_n", "report_artifact",
    "manifest_artifact", "welch_p_value",
}


def _audit(tiny_model, p, u, out, *extra):
    return main(["audit", "--model", str(tiny_model), "--suspect", str(p), "--control", str(u), "--access", "gray",
                 "--no-progress", "--output", str(out), "--power-resamples", "20", *extra])


def test_result_carries_checks_and_verify_catches_one_changed_image(tiny_model, tmp_path, tracking_uri, capsys):
    p = write_images(tmp_path / "p", 12, seed=11, prefix="p")
    u = write_images(tmp_path / "u", 12, seed=12, prefix="u")
    out = tmp_path / "r.json"
    assert _audit(tiny_model, p, u, out) == 0
    result = json.loads(out.read_text())
    assert EVIDENCE_KEYS <= set(result)
    assert result["test"] == "permutation" and 1 / 1001 <= result["p_value"] <= 1
    assert set(result["null_check"]) >= {"p_value", "flagged"}
    assert set(result["shift_check"]) >= {"auc", "p_value", "flagged"}
    assert result["effect_size"]["ci_low"] <= result["effect_size"]["value"] <= result["effect_size"]["ci_high"]
    assert [row["n"] for row in result["power_curve"]] == sorted(row["n"] for row in result["power_curve"])
    run_id = result["run_id"]
    capsys.readouterr()

    args = ["verify", run_id, "--model", str(tiny_model), "--suspect", str(p), "--control", str(u)]
    assert main(args) == 0
    assert "verified" in capsys.readouterr().out

    pixels = np.asarray(Image.open(u / "u_004.png")).copy()
    pixels[0, 0] ^= 1  # one pixel, one bit
    Image.fromarray(pixels).save(u / "u_004.png")
    assert main(args) == 1
    printed = capsys.readouterr().out
    assert "control image u_004.png" in printed and printed.count("mismatch:") == 1


def test_shift_guard_warns_when_the_control_set_is_brighter(tiny_model, tmp_path, tracking_uri, capsys):
    rng = np.random.default_rng(0)
    p, u = tmp_path / "p", tmp_path / "u"
    p.mkdir()
    u.mkdir()
    for i in range(30):
        base = rng.integers(40, 200, (8, 8, 3))
        Image.fromarray(base.astype(np.uint8)).save(p / f"p_{i}.png")
        other = rng.integers(40, 200, (8, 8, 3)) + 40  # same texture statistics, brighter
        Image.fromarray(np.clip(other, 0, 255).astype(np.uint8)).save(u / f"u_{i}.png")
    out = tmp_path / "r.json"
    assert _audit(tiny_model, p, u, out) == 0
    result = json.loads(out.read_text())
    assert result["shift_check"]["flagged"] is True and result["shift_check"]["auc"] > 0.9
    assert any("distribution shift" in w for w in result["warnings"])
    assert "WARNING: P and U differ" in capsys.readouterr().out


def test_report_is_logged_and_rebuilt_from_a_past_run(tiny_model, image_sets, tmp_path, tracking_uri, capsys):
    out = tmp_path / "r.json"
    assert _audit(tiny_model, *image_sets, out, "--power-resamples", "0") == 0
    run_id = json.loads(out.read_text())["run_id"]
    rebuilt = tmp_path / "again.html"
    assert main(["report", run_id, "--output", str(rebuilt)]) == 0
    page = rebuilt.read_text()
    assert 'class="verdict"' in page and run_id in page
    assert main(["report", "0" * 32, "--output", str(tmp_path / "x.html")]) == 2  # unknown run: one-line error
    assert "cdi: error: run 000" in capsys.readouterr().err
