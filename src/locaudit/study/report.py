"""The study report, rebuilt from the ledger at any time (also mid-run, from a half-finished study).

`build_report(run_dir)` writes into RUN/report/:
  index.html        self-contained: verdict, tables and every figure embedded as base64 PNG
  *.png             the figures
  trials.csv/.parquet   every ledger row (status, timings, grid values, metrics)
  results.csv       finished evaluations only
  comparisons.csv   top-K vs random draws per method, metric and scope (stats.compare)
  singles.csv       single heads vs full alignment
  timing.csv        trials, wall and CPU seconds per trial kind
  verdict.json      the verdict, its lines and its numbers
"""

from __future__ import annotations

import base64
import html
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from locaudit.io import atomic_path, write_json_atomic, write_text_atomic
from locaudit.study import figures as F
from locaudit.study.analysis import (METHODS, comparisons, metric_columns, primary_metric, results_frame,
                                     singles_table, trials_frame, verdict)
from locaudit.study.ledger import Ledger

STATS_NOTE = (
    "Each location is represented by its best grid point (alpha for ITI; tau x learning rate for optimal edits) on "
    "the primary metric, and every metric is read at that point. The candidate (the probe's top-K heads) is one value "
    "(or one per training seed); the control is the distribution over random K-head draws. With one candidate value "
    "the t-test is Crawford & Howell's (one case vs a control sample, n-1 df); Mann-Whitney U and the permutation "
    "test then reduce to the rank test, whose p-value cannot go below 1/(n+1). With several candidate values they "
    "are Welch's t-test, Mann-Whitney U and a permutation test of the difference of means. All tests are one-sided "
    "toward 'the candidate is better'; z = (candidate - mean) / sd of the draws; the CI is a percentile bootstrap "
    "of the difference (draws resampled). 'pooled' rows put every grid point together and are descriptive only."
)


@dataclass
class Report:
    out_dir: Path
    index: Path
    figures: dict[str, Path] = field(default_factory=dict)
    tables: dict[str, Path] = field(default_factory=dict)
    verdict: dict = field(default_factory=dict)


def _write_df(df: pd.DataFrame, path: Path) -> Path:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return path


def export_trials(df: pd.DataFrame, out_dir: Path) -> dict[str, Path]:
    """trials.csv and trials.parquet (pyarrow) of every ledger row."""
    paths = {"trials.csv": _write_df(df, out_dir / "trials.csv")}
    pq = out_dir / "trials.parquet"
    clean = df.copy()
    for c in clean.columns:  # parquet needs one type per column
        if clean[c].dtype == object:
            clean[c] = clean[c].map(lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
    with atomic_path(pq) as tmp:
        clean.to_parquet(tmp, index=False, engine="pyarrow")
    paths["trials.parquet"] = pq
    return paths


def timing_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per trial kind: trials done, wall and CPU seconds (sum and mean)."""
    if df.empty:
        return pd.DataFrame()
    d = df[df["status"] == "done"]
    if d.empty:
        return pd.DataFrame()
    g = d.groupby("kind", sort=False)
    out = pd.DataFrame({"trials": g.size(), "wall_s": g["duration_s"].sum(), "mean_wall_s": g["duration_s"].mean()})
    if "cpu_s" in d and d["cpu_s"].notna().any():
        out["cpu_s"] = g["cpu_s"].sum()
    out = out.reset_index()
    total = {"kind": "total", "trials": int(out["trials"].sum()), "wall_s": float(out["wall_s"].sum()),
             "mean_wall_s": None}
    if "cpu_s" in out:
        total["cpu_s"] = float(out["cpu_s"].sum())
    return pd.concat([out, pd.DataFrame([total])], ignore_index=True)


def _probe(run_dir: Path, rows: list[dict]):
    for r in rows:
        if r["kind"] == "probe" and r["status"] == "done" and r["artifacts"].get("probe"):
            try:
                from locaudit.localize.probe import ProbeResult

                return ProbeResult.load(run_dir / r["artifacts"]["probe"])
            except Exception:  # a report never fails on a missing or damaged artifact
                return None
    return None


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _num(v) -> str:
    if v is None:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(v):
            return ""
        a = abs(v)
        return f"{v:.2e}" if (a and (a < 1e-3 or a >= 1e5)) else f"{v:.4g}"
    return html.escape(str(v))


def _table(df: pd.DataFrame, cols: list[str] | None = None, max_rows: int = 500) -> str:
    if df is None or df.empty:
        return "<p class='muted'>nothing yet</p>"
    cols = [c for c in (cols or list(df.columns)) if c in df.columns]
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = []
    for _, r in df.head(max_rows).iterrows():
        body.append("<tr>" + "".join(f"<td>{_num(r[c])}</td>" for c in cols) + "</tr>")
    more = f"<p class='muted'>{len(df) - max_rows} more rows in the CSV</p>" if len(df) > max_rows else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{more}"


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
.verdict{background:#f4f7fb;border-left:5px solid #1f77b4;padding:.8em 1em;margin:1em 0}
.verdict p.head{font-weight:600;font-size:1.08em;margin:.2em 0 .6em}
table{border-collapse:collapse;font-size:.82em;margin:.5em 0;display:block;overflow-x:auto}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:right;white-space:nowrap}
th{background:#f0f0f0} td:first-child,th:first-child{text-align:left}
.figs{display:flex;flex-wrap:wrap;gap:1em} .figs figure{margin:0;flex:1 1 460px} .figs img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.8em;color:#555} .muted{color:#888} code{background:#f4f4f4;padding:0 .2em}
"""


def _figures(run_dir: Path, out: Path, res: pd.DataFrame, singles: pd.DataFrame, probe, top_k: int) -> dict[str, Path]:
    figs: dict[str, Path] = {}

    def add(name: str, p):
        if p is not None:
            figs[name] = Path(p)

    for m in METHODS:
        add(f"hist_{m}", F.hist_random_vs_top(res, m, out / f"hist_{m}.png", top_k=top_k))
    add("truth_info", F.truth_info_scatter(res, out / "truth_info.png"))
    add("kl_mc", F.kl_mc_scatter(res, out / "kl_mc.png"))
    for m in METHODS:
        add(f"single_vs_full_{m}", F.single_vs_full(res, singles, m, out / f"single_vs_full_{m}.png", top_k=top_k))
    for m in METHODS:
        add(f"grid_{m}", F.grid_curves(res, m, out / f"grid_{m}.png"))
    if probe is not None:
        hi = []
        if not singles.empty and "gain_fraction" in singles:
            for h in singles[(singles["method"] == "optimal") & (singles["gain_fraction"] >= 0.9)]["head"].dropna():
                from locaudit.heads import HeadSet

                hi.extend(HeadSet.parse(h).heads)
        add("probe_heatmap", F.probe_heatmap(probe.val_acc.numpy(), out / "probe_heatmap.png", top_k, hi))
    return figs


CAPTIONS = {
    "hist_iti": "ITI (heuristic) edits: the primary metric over random K-head draws vs the probe's top-K heads.",
    "hist_optimal": "Optimal edits: the same comparison. The paper finds random heads as good as the top-K heads here.",
    "truth_info": "True vs Info of every trial (every grid point).",
    "kl_mc": "KL divergence from the unedited model vs multiple-choice accuracy.",
    "single_vs_full_iti": "ITI at single heads vs all heads.",
    "single_vs_full_optimal": "Optimal edits at single heads vs full alignment (all heads).",
    "grid_iti": "ITI: metric over alpha.",
    "grid_optimal": "Optimal edits: metric over tau (best learning rate).",
    "probe_heatmap": "Per-head probe accuracy; red boxes: the top-K heads; blue circles: single heads whose optimal edit matches full alignment.",
}


def build_report(run_dir: str | Path, out_dir: str | Path | None = None, n_resamples: int = 9999) -> Report:
    """Rebuild RUN/report from the ledger (see the module docstring)."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    with Ledger(run_dir) as ledger:
        spec = ledger.get_meta("spec", {}) or {}
        rows = ledger.rows()
        counts = ledger.counts()
    top_k = int(((spec.get("localizers") or {}).get("probe") or {}).get("top_k", 16))
    all_df = trials_frame(rows)
    res = results_frame(rows)
    tables = export_trials(all_df, out)
    tables["results.csv"] = _write_df(res, out / "results.csv")
    comp = comparisons(res, n_resamples=n_resamples)
    tables["comparisons.csv"] = _write_df(comp, out / "comparisons.csv")
    probe = _probe(run_dir, rows)
    ranking = probe.ranking() if probe is not None else None
    singles = singles_table(res, ranking)
    tables["singles.csv"] = _write_df(singles, out / "singles.csv")
    tables["timing.csv"] = _write_df(timing_table(all_df), out / "timing.csv")
    v = verdict(res, comp, singles, top_k=top_k)
    vd = {"headline": v.headline, "lines": v.lines, "table": v.table, "missing": v.missing, "counts": counts,
          "primary_metric": primary_metric(res), "built": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_json_atomic(out / "verdict.json", vd)
    tables["verdict.json"] = out / "verdict.json"
    figs = _figures(run_dir, out, res, singles, probe, top_k)
    index = out / "index.html"
    write_text_atomic(index, _html(spec, counts, all_df, res, comp, singles, v, figs))
    return Report(out, index, figs, tables, vd)


def _html(spec: dict, counts: dict, all_df: pd.DataFrame, res: pd.DataFrame, comp: pd.DataFrame,
          singles: pd.DataFrame, v, figs: dict[str, Path]) -> str:
    name = html.escape(str(spec.get("name", "study")))
    model = spec.get("model", {}) or {}
    data = spec.get("data", {}) or {}
    total = sum(counts.values())
    status = ", ".join(f"{counts.get(s, 0)} {s}" for s in ("done", "running", "pending", "failed"))
    partial = counts.get("done", 0) < total
    wall = float(all_df["duration_s"].dropna().sum()) if "duration_s" in all_df else 0.0
    cpu = float(all_df["cpu_s"].dropna().sum()) if "cpu_s" in all_df else 0.0
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>locaudit: {name}</title><style>{CSS}</style></head><body>",
             f"<h1>Does editing provide evidence for localization? &mdash; {name}</h1>",
             f"<p>{html.escape(str(spec.get('description', '')))}</p>",
             f"<p>Model <code>{html.escape(str(model.get('name')))}</code> ({html.escape(str(model.get('dtype')))}); "
             f"data <code>{html.escape(str(data.get('spec')))}</code>"
             f"{', ' + str(data.get('max_questions')) + ' questions' if data.get('max_questions') else ''}. "
             f"Trials: {total} ({status}); trial time {wall / 60:.1f} min"
             f"{f' ({cpu / 60:.1f} CPU-min)' if cpu else ''}.</p>"]
    if partial:
        parts.append("<p class='muted'><b>Partial report:</b> the study is not finished; numbers and figures use the "
                     "trials done so far. Rebuild with <code>locaudit report RUN</code>.</p>")
    parts.append("<div class='verdict'><p class='head'>" + html.escape(v.headline) + "</p><ul>"
                 + "".join(f"<li>{html.escape(x)}</li>" for x in v.lines) + "</ul>"
                 + (f"<p class='muted'>Missing: {html.escape(', '.join(v.missing))}</p>" if v.missing else "") + "</div>")
    if v.table:
        parts.append("<h2>Verdict table</h2>" + _table(pd.DataFrame(v.table)))
    if figs:
        parts.append("<h2>Figures</h2><div class='figs'>")
        for k, p in figs.items():
            parts.append(f"<figure>{_img(p)}<figcaption>{html.escape(CAPTIONS.get(k, k))}</figcaption></figure>")
        parts.append("</div>")
    cols = ["method", "metric", "scope", "n_candidate", "n_random", "candidate_mean", "random_mean", "random_sd", "diff",
            "percentile", "z", "t_test", "t", "t_p", "mwu_p", "perm_p", "empirical_p", "ci_low", "ci_high"]
    parts.append("<h2>Candidate vs random draws</h2><p class='muted'>" + html.escape(STATS_NOTE) + "</p>")
    best = comp[comp["scope"] == "best"] if not comp.empty else comp
    parts.append(_table(best, cols))
    if not comp.empty and (comp["scope"] != "best").any():
        parts.append("<details><summary>Per grid point and pooled</summary>"
                     + _table(comp[comp["scope"] != "best"], cols) + "</details>")
    parts.append("<h2>Single heads vs full alignment</h2>" + _table(singles))
    parts.append("<h2>Compute</h2>" + _table(timing_table(all_df)))
    metrics = metric_columns(res)
    parts.append("<h2>Results</h2>" + _table(res, ["kind", "group", "localizer", "alpha", "tau", "lr", "seed", *metrics,
                                                   "duration_s"]))
    failed = all_df[all_df["status"] == "failed"] if not all_df.empty else all_df
    if not failed.empty:
        parts.append("<h2>Failed trials</h2>" + _table(failed, ["key", "kind", "localizer", "attempts", "error"])
                     + "<p class='muted'>Retry with <code>locaudit run STUDY --out RUN --retry-failed</code>.</p>")
    parts.append("<h2>Study spec</h2><details><summary>JSON</summary><pre>" + html.escape(json.dumps(spec, indent=2))
                 + "</pre></details></body></html>")
    return "\n".join(parts)
