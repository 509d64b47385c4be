"""Generated bad inputs, many at once (issue 14, "done when"): images, model files, metadata, configs, options.

Every case damages one copy of a good audit's inputs in one way and runs the real CLI against the real
tracking store and feature cache that a finished audit already used. Each must end with exit code 2 and
one line on stderr, no traceback, no FINISHED run; and the finished audit's run and its cached features
must be exactly as they were (bad input never costs completed work).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from pathlib import Path
from typing import Callable

import mlflow
import numpy as np
import pytest
import yaml
from PIL import Image

from cdi.cli import main

from builders import png_header_only, save_pipeline, tiny_unet, write_images

FAST = ("--access", "gray", "--features", "DL", "--permutations", "100", "--power-resamples", "0",
        "--batch-size", "12", "--no-progress")


class Case:
    """One bad input: `damage(inputs)` edits the copies and returns the extra CLI arguments."""

    def __init__(self, name: str, damage: Callable[["Inputs"], list[str]]) -> None:
        self.name, self.damage = name, damage

    def __repr__(self) -> str:
        return self.name


class Inputs:
    def __init__(self, root: Path, model: Path, suspect: Path, control: Path) -> None:
        self.root = root
        self.model = Path(shutil.copytree(model, root / "model"))
        self.suspect = Path(shutil.copytree(suspect, root / "p"))
        self.control = Path(shutil.copytree(control, root / "u"))

    def first(self, folder: Path | None = None) -> Path:
        return sorted((folder or self.suspect).glob("*.png"))[0]

    def weights(self) -> Path:
        return next((self.model / "unet").glob("*.safetensors"))

    def config(self, **changes) -> list[str]:
        data = {"features": ["DL"], "C": 1.0, "penalty": "l2", "folds": 5, "access": "gray", "seed": 0, **changes}
        path = self.root / "best_config.yaml"
        path.write_text(yaml.safe_dump(data))
        return ["--config", str(path)]


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def _metadata(folder: Path, text: bytes) -> None:
    (folder / "metadata.jsonl").write_bytes(text)


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _random_bytes(seed: int, n: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _image_cases() -> list[Case]:
    cases = [
        Case("truncated-png", lambda i: _write(i.first(), i.first().read_bytes()[:60]) or []),
        Case("zero-byte-png", lambda i: _write(i.first(), b"") or []),
        Case("text-named-jpg", lambda i: _write(i.suspect / "notes.jpg", b"not an image at all\n") or []),
        Case("garbage-webp", lambda i: _write(i.suspect / "x.webp", _random_bytes(3, 500)) or []),
        Case("garbage-bmp", lambda i: _write(i.control / "x.bmp", b"BM" + _random_bytes(4, 200)) or []),
        Case("bomb-header", lambda i: png_header_only(i.suspect / "bomb.png", 30000, 30000) and []),
        Case("one-by-five-million", lambda i: Image.new("L", (1, 5_000_000), 128).save(i.suspect / "line.png") or []),
        Case("png-with-bad-crc", lambda i: _write(i.first(), _flip(i.first().read_bytes(), 40)) or []),
        Case("empty-suspect", lambda i: [p.unlink() for p in i.suspect.glob("*.png")] and []),
        Case("too-few-control", lambda i: [p.unlink() for p in sorted(i.control.glob("*.png"))[3:]] and []),
        Case("same-image-both-sets", lambda i: shutil.copy(i.first(), i.control / "copy.png") and []),
        Case("duplicate-within-suspect", lambda i: shutil.copy(i.first(), i.suspect / "again.png") and []),
        Case("re-encoded-duplicate", lambda i: Image.open(i.first()).save(i.suspect / "again.jpg", quality=90) or []),
        Case("resized-duplicate-across", lambda i: Image.open(i.first()).resize((16, 16)).save(i.control / "big.png")
             or []),
        Case("suspect-is-a-file", lambda i: ["--suspect", str(i.first())]),
        Case("control-missing", lambda i: ["--control", str(i.root / "nowhere")]),
    ]
    return cases


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0xFF]) + data[index + 1:]


def _metadata_cases() -> list[Case]:
    return [
        Case("metadata-not-json", lambda i: _metadata(i.suspect, b"{not json\n") or []),
        Case("metadata-latin1", lambda i: _metadata(i.suspect, json.dumps({"file_name": i.first().name}).encode()
                                                    + b"\n" + '{"file_name": "x.png", "text": "caf\u00e9"}'.encode("latin-1")
                                                    + b"\n") or []),
        Case("metadata-no-file-name", lambda i: _metadata(i.suspect, b'{"label": 1}\n') or []),
        Case("metadata-array", lambda i: _metadata(i.control, b"[1, 2, 3]\n") or []),
        Case("metadata-label-list", lambda i: _metadata(i.suspect, json.dumps(
            {"file_name": i.first().name, "label": [1, 2]}).encode() + b"\n") or []),
    ]


def _model_cases() -> list[Case]:
    return [
        Case("no-model-index", lambda i: (i.model / "model_index.json").unlink() or []),
        Case("model-index-garbage", lambda i: _write(i.model / "model_index.json", b"\x00\x01garbage") or []),
        Case("model-index-list", lambda i: _write(i.model / "model_index.json", b"[]") or []),
        Case("unsupported-pipeline", lambda i: _edit_json(i.model / "model_index.json", _class_name="FluxPipeline")
             or []),
        Case("weights-truncated", lambda i: _write(i.weights(), i.weights().read_bytes()[:100]) or []),
        Case("weights-garbage", lambda i: _write(i.weights(), _random_bytes(5, 4000)) or []),
        Case("weights-missing", lambda i: i.weights().unlink() or []),
        Case("unet-config-broken", lambda i: _write(i.model / "unet" / "config.json", b"{broken") or []),
        Case("sample-size-huge", lambda i: _edit_json(i.model / "unet" / "config.json", sample_size=100000) or []),
        Case("sample-size-text", lambda i: _edit_json(i.model / "unet" / "config.json", sample_size="big") or []),
        Case("scheduler-config-broken", lambda i: _write(i.model / "scheduler" / "scheduler_config.json", b"[")
             or []),
        Case("scheduler-zero-steps", lambda i: _edit_json(i.model / "scheduler" / "scheduler_config.json",
                                                          num_train_timesteps=0) or []),
        Case("model-is-missing", lambda i: ["--model", str(i.root / "nowhere")]),
        Case("reference-is-target", lambda i: ["--reference-model", str(i.model)]),
        Case("reference-missing", lambda i: ["--reference-model", str(i.root / "nowhere")]),
        Case("lora-missing", lambda i: ["--lora", str(i.root / "nowhere.safetensors")]),
        Case("lora-garbage", lambda i: _write(i.root / "l.safetensors", _random_bytes(6, 300))
             or ["--lora", str(i.root / "l.safetensors")]),
    ]


def _config_cases() -> list[Case]:
    return [
        Case("config-C-text", lambda i: i.config(C="abc")),
        Case("config-C-negative", lambda i: i.config(C=-1)),
        Case("config-dl-t", lambda i: i.config(feature_settings={"dl_t": 5000})),
        Case("config-mask-ratio", lambda i: i.config(feature_settings={"gm_mask_ratio": 5})),
        Case("config-alpha", lambda i: i.config(alpha=0.5)),
        Case("config-unknown-feature", lambda i: i.config(features=["QQ"])),
        Case("config-folds-text", lambda i: i.config(folds="five")),
        Case("config-not-yaml", lambda i: _write(i.root / "c.yaml", b"a: [unclosed") or ["--config", str(i.root / "c.yaml")]),
        Case("config-missing-file", lambda i: ["--config", str(i.root / "none.yaml")]),
    ]


def _option_cases() -> list[Case]:
    options = [
        ["--alpha", "0"], ["--alpha", "1.5"], ["--alpha", "nan"], ["--alpha", "x"],
        ["--permutations", "0"], ["--permutations", "99"], ["--permutations", "1000000000"],
        ["--folds", "1"], ["--folds", "50"], ["--seed", "-1"], ["--seed", str(2**64)], ["--seed", "1.5"],
        ["--features", "DL,XYZ"], ["--features", ","], ["--features", "GM_100"],
        ["--threads", "-1"], ["--batch-size", "0"], ["--power-resamples", "-1"], ["--power-resamples", "1000000"],
        ["--representation", "odd"], ["--device", "tpu"], ["--test", "z"], ["--resume", "no-such-run"],
    ]
    cases = [Case("option" + "".join(o).replace("-", "_"), lambda i, o=o: list(o)) for o in options]
    cases.append(Case("cache-dir-is-a-file", lambda i: _write(i.root / "f", b"") or ["--cache-dir", str(i.root / "f")]))
    cases.append(Case("output-is-a-folder", lambda i: ["--output", str(i.root)]))
    return cases


CASES = [*_image_cases(), *_metadata_cases(), *_model_cases(), *_config_cases(), *_option_cases()]


def test_there_are_at_least_fifty_cases():
    assert len(CASES) >= 50
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, _tracking_db):
    """One good audit: its model, image sets, cache folder, and its finished run's id and result."""
    root = tmp_path_factory.mktemp("fuzz")
    model = save_pipeline(root / "model", tiny_unet())
    suspect = write_images(root / "p", 12, seed=11, prefix="p")
    control = write_images(root / "u", 12, seed=12, prefix="u")
    cache = root / "cache"
    experiment = f"fuzz-{uuid.uuid4().hex[:8]}"
    mlflow.set_tracking_uri(_tracking_db)
    output = root / "result.json"
    argv = ["audit", "--model", str(model), "--suspect", str(suspect), "--control", str(control),
            "--cache-dir", str(cache), "--experiment", experiment, "--tracking-uri", _tracking_db,
            "--output", str(output), *FAST]
    assert main(argv) == 0
    result = json.loads(output.read_text())
    return {"model": model, "suspect": suspect, "control": control, "cache": cache, "experiment": experiment,
            "run_id": result["run_id"], "result": result, "uri": _tracking_db}


def _cache_state(cache: Path) -> dict[str, str]:
    return {str(p.relative_to(cache)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(cache.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input_is_one_line_exit_2_and_loses_no_work(case, finished, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", finished["uri"])
    before = _cache_state(finished["cache"])
    inputs = Inputs(tmp_path, finished["model"], finished["suspect"], finished["control"])
    extra = case.damage(inputs) or []
    experiment = f"fuzz-case-{uuid.uuid4().hex[:8]}"
    base = {"--model": str(inputs.model), "--suspect": str(inputs.suspect), "--control": str(inputs.control)}
    for option in list(base):
        if option in extra:  # the case replaces this path
            index = extra.index(option)
            base[option] = extra[index + 1]
            del extra[index:index + 2]
    argv = ["audit", *[x for pair in base.items() for x in pair], "--cache-dir", str(finished["cache"]),
            "--experiment", experiment, *FAST, *extra]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse refuses malformed values itself, on one line with code 2
        code = exit_.code
    out, err = capsys.readouterr()
    assert code == 2, (case, code, out, err)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, (case, err)
    assert lines[0].startswith(("cdi: error: ", "cdi audit: error: ")), lines[0]
    client = mlflow.MlflowClient(finished["uri"])
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    assert not [r for r in runs if r.info.status == "FINISHED" or "cdi.verdict" in r.data.tags], case
    # completed work is intact: the finished audit's run and every cached feature file
    run = client.get_run(finished["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["cdi.verdict"] == finished["result"]["verdict"]
    after = _cache_state(finished["cache"])
    assert {k: v for k, v in after.items() if k in before} == before, case
