"""The report's layout at 800 and 1400 px, measured in a real browser (headless Chromium), and the formatting
rules behind it (tables with their decision columns first, numbers rounded to their precision, figures sized for
the page, axes inside a metric's range).

The browser test renders the report of a tiny synthetic study, runs a small script after the page has loaded
that measures the layout and writes it into a data attribute, and reads it back from `--dump-dom`. It checks:
no horizontal overflow of the page; every key table fits its box (no sideways scrolling: its outcome and p-value
columns are on screen); every figure lies inside its container and is shown at 0.7 of its size or more (its
10 pt tick labels, 16.7 px at 120 dpi, stay at least 11.7 px tall); the verdict box opens the page; user text
stays inert. Where no Chromium is installed it skips, saying so (`make test` installs it under CI=true).
Screenshots of both widths are written to $LOCAUDIT_SCREENSHOTS when that is set.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from locaudit.study import figures as F
from locaudit.study.report import _key_table, _num, _table, build_report
from locaudit.study.runner import run_study
from locaudit.study.spec import parse_study
from test_study_report import STUDY, paper_like

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
WIDTHS = (800, 1400)
MIN_SCALE = 0.7  # a figure is shown at 0.7 of its pixel size or more
XSS = '<img data-xss="1" src="x" onerror="document.body.dataset.pwned=1">'

MEASURE = """
<script>
window.addEventListener('load', () => {
  const de = document.documentElement, vw = de.clientWidth;
  const section = el => { let e = el; while (e && e.previousElementSibling) { e = e.previousElementSibling;
    if (e.tagName === 'H2') return e.textContent; } return e && e.parentElement ? section(e.parentElement) : ''; };
  const out = {vw, sw: de.scrollWidth, tables: [], imgs: []};
  document.querySelectorAll('table.key').forEach(t => {
    const r = t.getBoundingClientRect();
    out.tables.push({section: section(t), sw: t.scrollWidth, cw: t.clientWidth, right: r.right,
      heads: [...t.querySelectorAll('thead th')].map(th => [th.textContent, th.getBoundingClientRect().right])});
  });
  document.querySelectorAll('figure img').forEach(i => {
    const r = i.getBoundingClientRect(), f = i.closest('figure').getBoundingClientRect();
    out.imgs.push({alt: i.alt, nw: i.naturalWidth, w: r.width, left: r.left, right: r.right, fleft: f.left,
                   fright: f.right});
  });
  const v = document.querySelector('.verdict').getBoundingClientRect();
  out.verdict = {top: v.top, left: v.left, right: v.right};
  out.injected = document.querySelectorAll('[data-xss]').length + (document.body.dataset.pwned ? 1 : 0);
  document.body.setAttribute('data-layout', JSON.stringify(out));
});
</script>
"""


def chromium() -> str:
    """The headless browser: $LOCAUDIT_CHROMIUM, else the first of BROWSERS on PATH; skip (saying why) if none."""
    path = os.environ.get("LOCAUDIT_CHROMIUM") or next((p for p in map(shutil.which, BROWSERS) if p), None)
    if not path:
        pytest.skip("no headless browser for the report layout test: install chromium (Debian: apt-get install "
                    "chromium; `make test` does so under CI=true) or set LOCAUDIT_CHROMIUM")
    return path


def run_browser(browser: str, profile: Path, width: int, url: str, *action: str) -> str:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           f"--user-data-dir={profile}", f"--window-size={width},2000", "--virtual-time-budget=10000", *action, url]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr[-2000:]}"
    return res.stdout


@pytest.fixture(scope="module")
def browser() -> str:
    return chromium()  # first, so that a machine without a browser skips before building reports


def _build(tmp: Path, study: dict, fn) -> object:
    (tmp / "pairs.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    spec = parse_study({**study, "description": "A tiny study " + XSS}, tmp, "study.yaml")
    run_study(spec, tmp / "run", fn=fn, progress=False)
    return build_report(tmp / "run", n_resamples=199)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The report of a tiny synthetic study (test_study_report's paper-like metrics), its description hostile."""
    return _build(tmp_path_factory.mktemp("layout"), STUDY, paper_like)


@pytest.fixture(scope="module", params=["paper-like", "localizers"])
def reports(request, tmp_path_factory):
    """Two reports and the key tables each must show: the paper-like study (single heads) and
    test_study_candidates' study (three localizers side by side, their agreement, 49 draws)."""
    tables = {"Verdict table", "Candidate vs random draws", "Results"}
    if request.param == "paper-like":
        return request.getfixturevalue("report"), tables | {"Single heads vs full alignment"}
    from test_study_candidates import STUDY as CANDIDATES, fake

    return (_build(tmp_path_factory.mktemp("layout-localizers"), CANDIDATES, fake),
            tables | {"Localizers side by side", "Agreement between localizers"})


@pytest.mark.parametrize("width", WIDTHS)
def test_report_layout_in_a_browser(browser, reports, width: int, tmp_path: Path) -> None:
    report, tables = reports
    page = tmp_path / "measure.html"
    page.write_text(report.index.read_text(encoding="utf-8").replace("</body>", MEASURE + "</body>"), encoding="utf-8")
    dom = run_browser(browser, tmp_path / "profile", width, page.as_uri(), "--dump-dom")
    m = re.search(r'data-layout="([^"]*)"', dom)
    assert m, "the measuring script did not run: " + dom[:500]
    lay = json.loads(html.unescape(m.group(1)))
    vw = lay["vw"]  # the page's width less the vertical scrollbar's
    assert width - 20 <= vw <= width
    assert lay["sw"] <= vw, f"the page scrolls sideways at {width} px: {lay['sw']} px wide"
    assert lay["injected"] == 0, "user text became markup"
    assert lay["verdict"]["top"] < 700 and lay["verdict"]["right"] <= vw  # the verdict opens the page
    assert tables <= {t["section"] for t in lay["tables"]}
    for t in lay["tables"]:
        assert t["sw"] <= t["cw"] + 1 and t["right"] <= vw, f"{t['section']}: key table {t['sw']} px in {t['cw']} px"
        names = [h.replace("\u200b", "") for h, _ in t["heads"]]
        assert all(right <= vw for _, right in t["heads"]), (t["section"], t["heads"])
        if "outcome" in names:  # the decision columns come first: outcome, then the p-values, then the means
            ps = [i for i, n in enumerate(names) if n.startswith("p_")]
            assert names.index("outcome") < min(ps) < names.index("candidate_mean"), names
    assert len(lay["imgs"]) == len(report.figures) >= 2
    for i in lay["imgs"]:
        assert i["fleft"] - 0.5 <= i["left"] and i["right"] <= i["fright"] + 0.5 <= vw + 0.5, i
        scale = i["w"] / i["nw"]
        assert scale >= MIN_SCALE, f"{i['alt']}: {i['nw']} px shown at {i['w']:.0f} px ({scale:.2f}) at {width} px"
        assert scale <= 1.0 + 1e-6, i  # never blown up
    shot = tmp_path / f"report-{report.index.parents[2].name}-{width}.png"
    run_browser(browser, tmp_path / "profile", width, report.index.as_uri(), f"--screenshot={shot}")
    assert shot.stat().st_size > 10_000
    if os.environ.get("LOCAUDIT_SCREENSHOTS"):
        dest = Path(os.environ["LOCAUDIT_SCREENSHOTS"])
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, dest / shot.name)
        (dest / shot.with_suffix(".json").name).write_text(json.dumps(lay, indent=1))


def test_key_tables_put_decisions_first(report) -> None:
    text = report.index.read_text(encoding="utf-8")
    assert XSS not in text and html.escape(XSS) in text
    body = text.split("<h2>Verdict table</h2>", 1)[1]
    first = re.search(r"<table class='key'><thead><tr>(.*?)</tr>", body).group(1)
    names = [html.unescape(re.sub(r"<[^>]+>", "", h)) for h in re.findall(r"<th>(.*?)</th>", first)]
    assert names[:4] == ["method", "outcome", "p_combined_adj", "p_rank"]
    assert "All " in body.split("</table>", 1)[1][:200]  # every column follows, collapsed
    for name in ("ci_boot_low", "welch_seeds_p", "question_noise"):  # details only
        assert name.replace("_", "_<wbr>") not in first


def test_numbers_rounded_to_their_precision() -> None:
    row = {"candidate_mean": 0.5, "random_mean": 0.5, "random_sd": 2.85e-17, "diff": -1.1e-16, "z": float("nan"),
           "p_rank": 0.111111, "p_mean": 3.2e-7, "ci_low": -0.01234567, "percentile": 100.0}
    df = pd.DataFrame([row])
    out = _table(df)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", out)
    got = dict(zip(row, cells))
    assert got["random_sd"] == "0" and got["diff"] == "0"  # float noise of a constant spread
    assert got["z"] == "" and got["p_rank"] == "0.11" and got["p_mean"] == "3.2e-07"
    assert got["ci_low"] == "-0.0123" and got["percentile"] == "100"
    assert _num(-1e-20) == "0" and _num(0.123456) == "0.1235" and _num(12345678.0) == "1.23e+07"
    assert _num("<b>") == "&lt;b&gt;"
    # a key table shows its key columns and puts every column in a collapsed details table
    kt = _key_table(df, ["p_rank", "candidate_mean"])
    assert kt.startswith("<table class='key'>") and "<details><summary>All 9 columns" in kt


def test_identical_draws_have_no_z(tmp_path: Path) -> None:
    from locaudit.study.analysis import comparisons, results_frame
    from locaudit.study.ledger import Ledger

    (tmp_path / "pairs.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    spec = parse_study(STUDY, tmp_path, "synthetic.yaml")

    def flat(trials, spec, run_dir):  # every optimal edit lands on 0.3 up to float rounding (sd about 4e-17)
        for t in trials:
            if t.kind in ("collect", "probe", "judge"):
                yield t.key, {"metrics": {}, "artifacts": {}}
                continue
            n = 3 + int(hashlib.sha256(str(t.localizer).encode()).hexdigest()[:6], 16) % 7  # one per location
            v = sum([0.1] * n) / n * 3 if t.kind == "optimal" else 0.2 + 0.01 * (n % 5)
            yield t.key, {"metrics": {"true": v}, "artifacts": {}}

    run_study(spec, tmp_path / "run", fn=flat, progress=False)
    with Ledger(tmp_path / "run") as led:
        comp = comparisons(results_frame(led.rows()), n_resamples=99)
    opt = comp[(comp["method"] == "optimal") & (comp["metric"] == "true")]
    assert len(opt) and opt["z"].isna().all()


def test_figures_fit_the_page_and_stay_in_range(tmp_path: Path, monkeypatch) -> None:
    # wide inputs: a 32-head probe heatmap and 46 single heads are capped at MAX_WIDTH_IN
    from PIL import Image

    p = F.probe_heatmap(np.random.default_rng(0).random((30, 32)), tmp_path / "h.png", 16)
    assert Image.open(p).size[0] <= F.MAX_WIDTH_IN * F.DPI + 1
    rows = [{"kind": "optimal", "group": "random", "localizer": f"random2@{i}", "seed": 0, "pref_acc": 0.7}
            for i in range(8)]
    rows += [{"kind": "optimal", "group": "top", "localizer": "top2", "seed": 0, "pref_acc": 0.7},
             {"kind": "optimal", "group": "all", "localizer": "all", "seed": 0, "pref_acc": 0.7},
             {"kind": "baseline", "group": "none", "localizer": "baseline", "seed": 0, "pref_acc": 0.7}]
    singles = pd.DataFrame([{"method": "optimal", "metric": "pref_acc", "head": f"L{i // 8}H{i % 8}",
                             "localizer": f"single:{i}", "value": 0.7} for i in range(46)])
    p = F.single_vs_full(pd.DataFrame(rows), singles, "optimal", tmp_path / "s.png", top_k=2)
    assert Image.open(p).size[0] <= F.MAX_WIDTH_IN * F.DPI + 1
    # a share that never moves: its histogram's axis stays inside [0, 1] (was [-0.4, 1.2]-ish from +-0.5)
    seen = {}

    def keep(fig, path, dpi=F.DPI):
        seen["xlim"] = fig.axes[0].get_xlim()
        return Path(path)

    monkeypatch.setattr(F, "save_figure", keep)
    F.hist_random_vs_top(pd.DataFrame(rows), "optimal", tmp_path / "x.png", metric="pref_acc", top_k=2)
    lo, hi = seen["xlim"]
    assert -0.02 <= lo < 0.7 < hi <= 1.02
    assert F.metric_range("pref_acc") == (0.0, 1.0) and F.metric_range("kl") == (0.0, None)
    assert F.metric_range("pref_margin") == (None, None)
