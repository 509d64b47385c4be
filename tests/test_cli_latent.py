"""`cdi audit` on tiny Stable Diffusion, SDXL and DiT pipelines saved with save_pretrained."""

from __future__ import annotations

import json
import math

import pytest

from cdi.cli import main

from builders import write_images
from latent_builders import save_dit_pipeline, save_sd_pipeline, save_sdxl_pipeline, write_metadata

pytest.importorskip("transformers")


def _folders(root, size, conditioning):
    p = write_images(root / "p", 10, size=size, seed=1, prefix="p")
    u = write_images(root / "u", 10, size=size, seed=2, prefix="u")
    for folder, prefix in ((p, "p"), (u, "u")):
        entries = {}
        for i in range(10):
            if i == 9:
                continue  # one image without metadata: the fallback option fills it in
            entries[f"{prefix}_{i:03d}.png"] = (
                {"text": f"a photo number {i}"} if conditioning == "text" else {"label": f"class {i % 3}"}
            )
        write_metadata(folder, entries)
    return p, u


@pytest.mark.parametrize("family", ["sd", "sdxl", "dit"])
def test_audit_runs_on_tiny_latent_pipelines(family, tmp_path, tracking_uri, capsys):
    model = {"sd": save_sd_pipeline, "sdxl": save_sdxl_pipeline, "dit": save_dit_pipeline}[family](tmp_path / family)
    from cdi.models import load_model

    info = load_model(model).info
    p, u = _folders(tmp_path, info.image_size, info.conditioning)
    fallback = ["--prompt", "a photo"] if info.conditioning == "text" else ["--class-label", "class 2"]
    out = tmp_path / "result.json"
    code = main(["audit", "--model", str(model), "--suspect", str(p), "--control", str(u), "--no-progress",
                 "--batch-size", "10", "--folds", "2", "--output", str(out), "--experiment", f"latent-{family}",
                 "--power-resamples", "0",  # the power curve is statistics on the feature table, alike for every family
                 *fallback])
    assert code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert math.isfinite(result["p_value"]) and 0 <= result["p_value"] <= 1
    assert len(result["features"]) == 26 and result["n_suspect"] == 10


def test_unknown_class_name_is_a_user_error(tmp_path, tracking_uri, capsys):
    model = save_dit_pipeline(tmp_path / "dit")
    p, u = _folders(tmp_path, 16, "class")
    code = main(["audit", "--model", str(model), "--suspect", str(p), "--control", str(u), "--no-progress",
                 "--class-label", "zebra"])
    err = capsys.readouterr().err
    assert code == 2 and "--class-label" in err and "zebra" in err
