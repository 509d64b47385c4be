"""The audit report: verdict, warnings, escaping, embedded figures, and that a real browser renders it."""

from __future__ import annotations

import base64
import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cdi.errors import CDIError
from cdi.report import render_report, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FEATURES = ["DL", "SecMI", "PIA", "GM_0"]
HOSTILE_PATH = "/data/<script>alert('x')</script>/model & co"
IMG_DATA = re.compile(r'<img[^>]*class="figure"[^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
CHROMIUM = "/usr/bin/chromium"


def _table(n: int = 20) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    table = pd.DataFrame(
        {
            "file_name": [f"img{i}.png" for i in range(2 * n)],
            "path": [f"/images/<b>{i}</b>.png" for i in range(2 * n)],
            "sha256": [f"{i:064x}" for i in range(2 * n)],
            "set": ["suspect"] * n + ["control"] * n,
        }
    )
    for name in FEATURES:
        table[name] = rng.normal(size=2 * n)
    table["oof_score"] = np.r_[rng.uniform(0.4, 1.0, n), rng.uniform(0.0, 0.6, n)]
    return table


def _minimal_result() -> dict:
    """Only the keys every result has."""
    return {
        "p_value": 0.0004,
        "verdict": "used",
        "alpha": 0.01,
        "n_suspect": 20,
        "n_control": 20,
        "test": "permutation",
        "statistic": 4.2,
        "access": "white",
        "features": list(FEATURES),
        "model_fingerprint": "f00dfeed",
        "model_path": HOSTILE_PATH,
        "run_id": "0123abcd",
        "seed": 7,
        "folds": 5,
        "auc": 0.83,
    }


def _full_result() -> dict:
    return {
        **_minimal_result(),
        "welch_p_value": 0.0002,
        "null_check": {"p_value": 0.41, "flagged": False, "skipped": False, "reason": ""},
        "shift_check": {"auc": 0.91, "p_value": 0.002, "flagged": True, "skipped": False, "reason": None},
        "effect_size": {"value": 1.23, "ci_low": 0.61, "ci_high": 1.92},
        "power_curve": [
            {"n": 10, "median_p": 0.12, "power": 0.3},
            {"n": 15, "median_p": 0.01, "power": 0.6},
            {"n": 20, "median_p": 0.0004, "power": 0.9},
        ],
        "recommended_n": 20,
        "feature_auc": {"DL": 0.71, "SecMI": 0.62, "PIA": 0.31, "GM_0": 0.52},
        "coefficients": {"DL": 1.1, "SecMI": 0.2, "PIA": -0.5, "GM_0": 0.01},
        "warnings": ["Only 20 images per side: <few> images make the test weak."],
        "created": "2025-01-01T00:00:00+00:00",
        "cdi_version": "0.1.0",
    }


@pytest.fixture(scope="module")
def full_page() -> str:
    return render_report(_full_result(), _table())


def _pngs(page: str) -> list[bytes]:
    return [base64.b64decode(data, validate=True) for data in IMG_DATA.findall(page)]


# -- the HTML text ------------------------------------------------------------------------------


def test_verdict_banner_states_verdict_p_and_alpha(full_page):
    banner = re.search(r'<section class="verdict" data-verdict="([^"]+)">(.*?)</section>', full_page, re.S)
    assert banner is not None and banner.group(1) == "used"
    text = banner.group(2)
    assert "Verdict: used" in text
    assert "p-value = 0.0004" in text and "alpha = 0.01" in text and "permutation" in text


def test_not_detected_says_it_is_not_proof_of_non_use():
    result = {**_minimal_result(), "verdict": "not_detected", "p_value": 0.37}
    page = render_report(result, _table())
    assert 'data-verdict="not_detected"' in page
    assert "Verdict: not detected" in page and "p = 0.37" in page
    assert "not proof" in page


def test_flagged_checks_are_prominent_warnings(full_page):
    warnings = re.findall(r'<div class="warning"[^>]*>(.*?)</div>', full_page, re.S)
    # The result's own warning (escaped) and one derived from the flagged shift guard.
    assert any("&lt;few&gt; images make the test weak" in w for w in warnings)
    assert any("distribution shift" in w and "rather than training" in w for w in warnings)
    assert "flagged" in full_page
    # Warnings come right after the banner, before the key facts.
    assert full_page.index('class="warning"') < full_page.index('id="facts"')

    null_flagged = {**_minimal_result(), "null_check": {"p_value": 0.003, "flagged": True, "skipped": False}}
    page = render_report(null_flagged, _table())
    assert re.search(r'class="warning"[^>]*>.*miscalibrated', page)


def test_a_warning_the_result_already_gives_is_not_repeated():
    result = _full_result()
    result["warnings"] = ["P and U differ (shift guard AUC 0.91): a 'used' verdict may reflect this shift."]
    page = render_report(result, _table())
    assert page.count('class="warning"') == 1


def test_every_figure_is_an_embedded_png(full_page):
    images = re.findall(r"<img[^>]*>", full_page)
    assert len(images) == 3  # score histogram, power curve, per-feature AUC
    for tag in images:
        assert 'class="figure"' in tag
        assert re.search(r'alt="[^"]{10,}"', tag)
    pngs = _pngs(full_page)
    assert len(pngs) == 3
    for png in pngs:
        assert png.startswith(PNG_MAGIC)
        assert png.rstrip(b"\x00").endswith(b"IEND\xaeB`\x82")


def test_page_is_self_contained(full_page):
    assert "<script" not in full_page
    assert not re.search(r'(src|href)="(?!data:)', full_page)
    assert "http://" not in full_page and "https://" not in full_page


def test_user_strings_are_escaped(full_page):
    assert "<script>alert" not in full_page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;/model &amp; co" in full_page


def test_key_facts_and_feature_table(full_page):
    facts = re.search(r'<table class="facts">(.*?)</table>', full_page, re.S).group(1)
    for value in ("f00dfeed", "0123abcd", "white-box", ">7<", ">5<", ">20<", "4 (DL, SecMI, PIA, GM_0)"):
        assert value in facts
    features = re.search(r'<table class="features">(.*?)</table>', full_page, re.S).group(1)
    assert re.search(r"<code>PIA</code></td><td[^>]*>0\.310</td><td[^>]*>-0\.500</td>", features)
    assert "Hedges&#x27; g" in full_page or "Hedges' g" in full_page
    assert "1.23" in full_page and "0.61 to 1.92" in full_page


def test_absent_optional_keys_render_not_computed():
    page = render_report(_minimal_result(), _table())
    for section in ("checks", "effect", "power"):
        body = re.search(rf'<section id="{section}">(.*?)</section>', page, re.S).group(1)
        assert "not computed" in body, section
    assert "Power curve: <span class=\"missing\">not computed" in page
    assert "Per-feature AUC chart: <span class=\"missing\">not computed" in page
    assert len(_pngs(page)) == 1  # only the score histogram can be drawn from the table
    # None is the same as absent.
    nones = {**_minimal_result(), "effect_size": None, "null_check": None, "power_curve": None, "warnings": None}
    assert render_report(nones, _table()) == page


def test_missing_required_key_is_a_clear_error():
    result = _minimal_result()
    del result["p_value"]
    with pytest.raises(CDIError, match="p_value"):
        render_report(result, _table())


def test_write_report_writes_the_rendered_page(tmp_path):
    out = write_report(_full_result(), _table(), tmp_path / "report.html")
    assert out == tmp_path / "report.html"
    assert out.read_text(encoding="utf-8") == render_report(_full_result(), _table())


def test_report_does_not_import_heavy_layers():
    code = "import sys, cdi.report; bad = {'torch', 'mlflow', 'cdi.audit', 'cdi.tracking'} & set(sys.modules); print(sorted(bad))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_rendering_leaves_input_unchanged():
    result, table = _full_result(), _table()
    before_result, before_table = copy.deepcopy(result), table.copy()
    render_report(result, table)
    assert result == before_result
    pd.testing.assert_frame_equal(table, before_table)


# -- a real browser -----------------------------------------------------------------------------

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]

# Injected into a test copy of the report only: records, once the page has loaded, whether each
# figure decoded (naturalWidth > 0) so that --dump-dom shows it. The report itself has no script.
_PROBE = """<script>
window.addEventListener("load", () => {
  for (const img of document.querySelectorAll("img.figure")) {
    img.setAttribute("data-loaded", img.complete && img.naturalWidth > 0 ? "yes" : "no");
    img.setAttribute("data-width", String(img.naturalWidth));
  }
});
</script>"""


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "chromium-profile"
    profile.mkdir(exist_ok=True)
    return subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=90,
    )


needs_chromium = pytest.mark.skipif(
    shutil.which(CHROMIUM) is None,
    reason=f"headless browser check needs {CHROMIUM} (apt-get install -y chromium)",
)


@needs_chromium
def test_browser_renders_verdict_and_loads_every_figure(tmp_path, full_page):
    probed = tmp_path / "probed.html"
    probed.write_text(full_page.replace("</body>", _PROBE + "\n</body>"), encoding="utf-8")
    run = _chromium(tmp_path, "--dump-dom", probed.as_uri())
    assert run.returncode == 0, run.stderr[-2000:]
    dom = run.stdout
    assert re.search(r'<section class="verdict" data-verdict="used">\s*<h1>Verdict: used</h1>', dom)
    figures = re.findall(r"<img[^>]*>", dom)
    assert len(figures) == 3
    for tag in figures:
        assert 'data-loaded="yes"' in tag, tag[:200]
        assert int(re.search(r'data-width="(\d+)"', tag).group(1)) >= 500


@needs_chromium
def test_browser_screenshot_is_not_blank(tmp_path, full_page):
    page = tmp_path / "report.html"
    page.write_text(full_page, encoding="utf-8")
    shot = tmp_path / "shot.png"
    run = _chromium(tmp_path, "--window-size=1000,2400", f"--screenshot={shot}", page.as_uri())
    assert run.returncode == 0, run.stderr[-2000:]
    assert shot.read_bytes().startswith(PNG_MAGIC)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (2400, 1000)
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 50  # text, banner, tables and figures, not an empty page
    # The "used" banner's background (#fdecea) is drawn at the top of the page.
    assert (np.abs(pixels[:200].astype(int) - [0xFD, 0xEC, 0xEA]).sum(axis=-1) <= 3).mean() > 0.05
