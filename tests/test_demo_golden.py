"""Before/after guard for refactors (issue 15): a demo audit's result JSON and features.csv are compared
with the values recorded in tests/golden/ before the refactor.

The audit is a null one (40 held-out digits against 40 others, all 26 features, power curve on) so the
p-value, the statistic, the scorer's coefficients and every feature value are sensitive to any change in
seeding, batching, feature formulas or scoring. On the machine that recorded them the values are the
same bits (`python tests/test_demo_golden.py --check` compares exactly). Across CPUs float32 kernels differ
in the last bits (AVX-512 against AVX2 code paths), and noise optimisation's L-BFGS (NO_delta) and the scorer
amplify that: measured 2026-12-02 on an AVX-512/AMX Xeon against the values recorded on the earlier machine,
features differed by up to 1.6e-4 relative and coefficients by 1.7e-4, with the same p-value and verdict.
So the test allows a relative 1e-3 on floats and nothing on the rest (p-values from permutation counts,
verdicts, names, shapes).

To prove a refactor bit-identical on a machine other than the recording one, record the commit before it
there and compare exactly:
`git worktree add /tmp/before BASE && (cd /tmp/before && python tests/test_demo_golden.py --write /tmp/g)`,
then `python tests/test_demo_golden.py --check /tmp/g`.

Regenerate tests/golden only for an intended change of results, and say so in the commit:
`python tests/test_demo_golden.py --write`.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "demo"
GOLDEN = Path(__file__).resolve().parent / "golden"
#: Fields that name this run, this machine or this moment, not the audit's result.
VOLATILE = {"run_id", "tracking_uri", "experiment", "created", "model_path", "cdi_version"}


def _sets(root: Path) -> tuple[Path, Path]:
    out = []
    for name, source in (("p", "heldout2"), ("u", "heldout")):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for path in sorted((DEMO / source).glob("*.png"))[:40]:
            shutil.copy(path, folder / path.name)
        out.append(folder)
    return out[0], out[1]


def demo_audit(root: Path, tracking_uri: str) -> tuple[dict, str]:
    """The guarded audit: its result (volatile fields dropped) and its features.csv text."""
    import mlflow
    import torch

    from cdi.audit import audit

    torch.set_num_threads(1)
    suspect, control = _sets(root)
    result = audit(DEMO / "model", suspect, control, access="white", batch_size=20, progress=False,
                   use_cache=False, power_resamples=20, n_permutations=1000, tracking_uri=tracking_uri,
                   experiment="golden", threads=1)
    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(result.run_id)
    table = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/features.csv")
    data = {k: v for k, v in result.to_dict().items() if k not in VOLATILE}
    return json.loads(json.dumps(data, sort_keys=True)), _drop_path_column(table)


def _drop_path_column(table: str) -> str:
    import pandas as pd

    frame = pd.read_csv(io.StringIO(table), dtype=str, keep_default_na=False)
    return frame.drop(columns=["path"]).to_csv(index=False)


def _close(expected, actual, where: str, rtol: float, problems: list[str]) -> None:
    if isinstance(expected, dict) and isinstance(actual, dict):
        for key in sorted(set(expected) | set(actual)):
            if key not in expected or key not in actual:
                problems.append(f"{where}.{key}: only in {'the golden file' if key in expected else 'this run'}")
            else:
                _close(expected[key], actual[key], f"{where}.{key}", rtol, problems)
    elif isinstance(expected, list) and isinstance(actual, list) and len(expected) == len(actual):
        for k, (e, a) in enumerate(zip(expected, actual)):
            _close(e, a, f"{where}[{k}]", rtol, problems)
    elif isinstance(expected, float) and isinstance(actual, (int, float)) and not isinstance(expected, bool):
        both_nan = math.isnan(expected) and math.isnan(actual)
        if not (both_nan or expected == actual or math.isclose(expected, actual, rel_tol=rtol, abs_tol=rtol * 1e-3)):
            problems.append(f"{where}: {actual!r} != {expected!r}")
    elif expected != actual:
        problems.append(f"{where}: {actual!r} != {expected!r}")


def compare(expected: tuple[dict, str], actual: tuple[dict, str], rtol: float) -> list[str]:
    import pandas as pd

    problems: list[str] = []
    _close(expected[0], actual[0], "result", rtol, problems)
    want = pd.read_csv(io.StringIO(expected[1]))
    got = pd.read_csv(io.StringIO(actual[1]))
    if list(want.columns) != list(got.columns) or len(want) != len(got):
        problems.append(f"features.csv: columns/rows {list(got.columns)}/{len(got)} != {list(want.columns)}/{len(want)}")
        return problems
    for column in want.columns:
        if want[column].dtype.kind == "f":
            _close(want[column].tolist(), got[column].tolist(), f"features.csv[{column}]", rtol, problems)
        elif want[column].tolist() != got[column].tolist():
            problems.append(f"features.csv[{column}]: differs")
    return problems


def _golden(where: Path = GOLDEN) -> tuple[dict, str]:
    return (json.loads((where / "demo-null-result.json").read_text()),
            (where / "demo-null-features.csv").read_text())


#: Cross-CPU tolerance on floats (see the module docstring for the measurement).
CROSS_CPU_RTOL = 1e-3


def test_demo_audit_matches_the_recorded_result_and_features(tmp_path, tracking_uri):
    problems = compare(_golden(), demo_audit(tmp_path, tracking_uri), rtol=CROSS_CPU_RTOL)
    assert not problems, "\n".join(problems[:20])


if __name__ == "__main__":
    import tempfile

    mode = sys.argv[1] if len(sys.argv) > 1 else "--check"
    where = Path(sys.argv[2]) if len(sys.argv) > 2 else GOLDEN
    if mode not in ("--check", "--write"):
        raise SystemExit("usage: python tests/test_demo_golden.py [--check|--write] [DIR (default tests/golden)]")
    with tempfile.TemporaryDirectory() as tmp:
        found = demo_audit(Path(tmp), f"sqlite:///{tmp}/mlflow.db")
    if mode == "--write":
        where.mkdir(parents=True, exist_ok=True)
        (where / "demo-null-result.json").write_text(json.dumps(found[0], indent=2, sort_keys=True) + "\n")
        (where / "demo-null-features.csv").write_text(found[1])
        print(f"wrote {where}")
    else:
        problems = compare(_golden(where), found, rtol=0.0)
        shown = "tests/golden/" if where == GOLDEN else f"{where}/"
        print("\n".join(problems) if problems else f"bit-identical to {shown}")
        raise SystemExit(1 if problems else 0)
