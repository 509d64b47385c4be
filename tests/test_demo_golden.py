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
#: The guarded audit's permutations.
N_PERMUTATIONS = 1000
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
    how = dict(batch_size=20, progress=False, use_cache=False, threads=1)
    try:
        from cdi.features import ExtractionOptions
    except ImportError:  # recording the guard on a commit from before ExtractionOptions: the flat keywords
        compute = how
    else:
        compute = {"extraction": ExtractionOptions(**how)}
    result = audit(DEMO / "model", suspect, control, access="white", power_resamples=20,
                   n_permutations=N_PERMUTATIONS, tracking_uri=tracking_uri, experiment="golden", **compute)
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
#: GM_t's mask is the top 20 % of |gradient|: where two entries nearly tie, another CPU's last bits can swap
#: one pixel in or out of one image's mask. Measured 2026-12-04 on an AMD EPYC (AVX2) against tests/golden:
#: one image's GM_500 moved by 4.9e-3 relative (every other value of all 26 features within 4e-5), which moved
#: the residualised GM_500 of every image by up to 1.6e-2 of its range, the coefficients by up to 3 %, and the
#: permutation p-value by one count in 1001. When such a flip is seen, what is computed from the features is
#: held to these looser bounds instead; the raw features stay at CROSS_CPU_RTOL.
MASK_TIE_RTOL = 1e-2
MAX_MASK_TIES = 2
DERIVED_RTOL = 0.1
P_VALUE_COUNTS = 3


def mask_ties(expected: str, actual: str) -> list[str]:
    """The (column, row) of raw GM_t values outside CROSS_CPU_RTOL but within MASK_TIE_RTOL."""
    import numpy as np
    import pandas as pd

    want, got = pd.read_csv(io.StringIO(expected)), pd.read_csv(io.StringIO(actual))
    ties = []
    for column in (c for c in want.columns if c.startswith("GM_") and "." not in c):
        relative = np.abs(got[column] - want[column]) / np.abs(want[column]).clip(lower=1e-12)
        ties += [f"{column}[{row}]" for row in np.flatnonzero((relative > CROSS_CPU_RTOL)
                                                              & (relative <= MASK_TIE_RTOL))]
    return ties


def compare_across_cpus(expected: tuple[dict, str], actual: tuple[dict, str]) -> list[str]:
    """`compare` at CROSS_CPU_RTOL; where GM_t mask ties flipped (at most MAX_MASK_TIES), the raw features
    at CROSS_CPU_RTOL except those values, and what depends on the features (residualised columns, scores,
    the result's floats) at DERIVED_RTOL of each quantity's scale, the p-value within P_VALUE_COUNTS
    permutation counts, everything else exactly."""
    import numpy as np
    import pandas as pd

    ties = mask_ties(expected[1], actual[1])
    if not ties:
        return compare(expected, actual, rtol=CROSS_CPU_RTOL)
    if len(ties) > MAX_MASK_TIES:
        return [f"{len(ties)} GM_t values moved by more than {CROSS_CPU_RTOL:g}: {', '.join(ties)}"]
    problems: list[str] = []
    want, got = pd.read_csv(io.StringIO(expected[1])), pd.read_csv(io.StringIO(actual[1]))
    tied = {tie.split("[")[0]: int(tie.split("[")[1].rstrip("]")) for tie in ties}
    for column in want.columns:
        if want[column].dtype.kind != "f":
            if want[column].tolist() != got[column].tolist():
                problems.append(f"features.csv[{column}]: differs")
            continue
        w, g = want[column].to_numpy(), got[column].to_numpy()
        if "." in column or column == "oof_score":  # computed from every image's features
            scale = np.abs(w).max()
            if np.abs(g - w).max() > DERIVED_RTOL * scale:
                problems.append(f"features.csv[{column}]: moved by {np.abs(g - w).max():.3g} of range {scale:.3g}")
            continue
        keep = np.ones(len(w), dtype=bool)
        if column in tied:
            keep[tied[column]] = False
        bad = np.flatnonzero(keep & ~np.isclose(g, w, rtol=CROSS_CPU_RTOL, atol=CROSS_CPU_RTOL * 1e-3))
        problems += [f"features.csv[{column}][{row}]: {g[row]!r} != {w[row]!r}" for row in bad]
    result_want, result_got = expected[0], actual[0]
    step = P_VALUE_COUNTS / (N_PERMUTATIONS + 1)
    if abs(result_got["p_value"] - result_want["p_value"]) > step + 1e-12:
        problems.append(f"result.p_value: {result_got['p_value']} vs {result_want['p_value']}")
    if result_got["verdict"] != result_want["verdict"]:
        problems.append(f"result.verdict: {result_got['verdict']} != {result_want['verdict']}")
    loose: list[str] = []
    _close(_without(result_want), _without(result_got), "result", DERIVED_RTOL, loose)
    return problems + loose


def _without(result: dict) -> dict:
    """The result but its p-values (compared in counts) and the power curve's per-size medians of them."""
    out = {key: value for key, value in result.items() if key not in ("p_value", "power_curve")}
    out["power_curve"] = [{k: v for k, v in row.items() if k != "median_p"} for row in result.get("power_curve", [])]
    return out


def test_demo_audit_matches_the_recorded_result_and_features(tmp_path, tracking_uri):
    problems = compare_across_cpus(_golden(), demo_audit(tmp_path, tracking_uri))
    assert not problems, "\n".join(problems[:20])


def test_a_mask_tie_is_told_apart_from_a_changed_feature():
    """The looser comparison applies to one flipped GM_t value only: a change anywhere else still fails."""
    import pandas as pd

    result, table = _golden()
    frame = pd.read_csv(io.StringIO(table))
    tie = frame.copy()
    tie.loc[3, "GM_500"] *= 1.004
    assert mask_ties(table, tie.to_csv(index=False)) == ["GM_500[3]"]
    assert compare_across_cpus((result, table), (result, tie.to_csv(index=False))) == []
    changed = tie.copy()
    changed.loc[5, "DL"] *= 1.004
    assert compare_across_cpus((result, table), (result, changed.to_csv(index=False))) == [
        f"features.csv[DL][5]: {changed.loc[5, 'DL']!r} != {frame.loc[5, 'DL']!r}"]
    moved = dict(result, p_value=result["p_value"] + 5 / (N_PERMUTATIONS + 1))
    assert compare_across_cpus((result, table), (moved, tie.to_csv(index=False)))[0].startswith("result.p_value")


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
