"""`cdi audit --difficulty-calibration image+pca+wiener`: the covariate's noise is DL's own (common random
numbers), the mode runs end to end on a pixel model and is refused, with one line and exit code 2, on a latent
model."""

from __future__ import annotations

import json

import numpy as np
import torch
from latent_builders import save_sd_pipeline

from cdi.audit import wiener_noise_of
from cdi.cli import main
from cdi.data import discover_images, load_image
from cdi.features import FeatureConfig, extract
from cdi.models import load_model


def _args(model, suspect, control, *extra):
    return ["audit", "--model", str(model), "--suspect", str(suspect), "--control", str(control), "--no-progress",
            "--batch-size", "12", "--permutations", "100", "--power-resamples", "0", *extra]


def test_the_wiener_noise_is_the_noise_dl_draws(tiny_model, image_sets):
    """DL recomputed by hand from `wiener_noise_of`'s draws equals the DL that extraction computes: the covariate
    and the feature see the same noise for every (image, draw)."""
    adapter = load_model(tiny_model)
    records = discover_images(image_sets[0], "suspect")[:4]
    config = FeatureConfig(dl_draws=3)
    noise = wiener_noise_of(records, adapter, config, seed=5)
    assert noise.draws.shape == (4, 3, 3 * 8 * 8)
    assert noise.alpha_bar == float(adapter.alpha_bar(adapter.timestep(config.dl_t)))
    extracted = extract(adapter, records, ["DL"], config=config, seed=5, device="cpu", progress=False).values[:, 0]
    t = adapter.timestep(config.dl_t)
    with torch.no_grad():
        for i, record in enumerate(records):
            z0 = load_image(record.path, 8, 3)[None]
            total = 0.0
            for r in range(3):
                eps = torch.from_numpy(noise.draws[i, r]).reshape(1, 3, 8, 8).float()
                total += float((adapter.eps_hat(adapter.q(z0, t, eps), t, None) - eps).flatten().norm())
            assert np.isclose(extracted[i], total / 3, rtol=1e-5)


def test_wiener_difficulty_calibration_runs_end_to_end(tiny_model, image_sets, tracking_uri, tmp_path):
    out = tmp_path / "result.json"
    code = main(_args(tiny_model, *image_sets, "--output", str(out), "--access", "gray", "--features", "DL,PIA",
                      "--difficulty-calibration", "image+pca+wiener"))
    assert code == 0
    calibration = json.loads(out.read_text())["calibration"]
    assert calibration["difficulty_calibration"] == "image+pca+wiener"
    assert calibration["difficulty_covariates"] == ["mean", "spread", "ink_fraction", "zlib_bits", "edge_energy",
                                                    "pca_1", "pca_2", "wiener_DL"]
    assert calibration["scored_features"] == ["DL.resid", "PIA.resid"]


def test_wiener_difficulty_calibration_is_refused_on_a_latent_model(tmp_path, image_sets, tracking_uri, capsys):
    model = save_sd_pipeline(tmp_path / "sd")
    capsys.readouterr()  # what building the pipeline printed
    code = main(_args(model, *image_sets, "--difficulty-calibration", "image+pca+wiener"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "image+pca+wiener" in err[0] and "choose image+pca" in err[0]
    assert "Traceback" not in err[0]
