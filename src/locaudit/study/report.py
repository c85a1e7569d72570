"""The study report, rebuilt from the ledger at any time (also mid-run, from a half-finished study).

`build_report(run_dir)` writes into RUN/report/:
  index.html        self-contained: verdict, tables and every figure embedded as base64 PNG
  *.png             the figures
  trials.csv/.parquet   every ledger row (status, timings, grid values, metrics)
  results.csv       finished evaluations only
  comparisons.csv   top-K vs random draws per method, metric and scope (analysis.analyze)
  verdict.csv       the headline table: one row per method on the primary metric, with its outcome
  singles.csv       single heads vs full alignment (gain fraction, lower bound, corrected match)
  selected.csv      every location at the grid point chosen for it (not on the reported data)
  flags.csv         random draws that coincide with, overlap or duplicate other locations
  timing.csv        trials, wall and CPU seconds per trial kind
  localizers.csv, agreement.csv, localizer_stability.csv   with causal localizers: each one's verdict, their
                    agreement, and each one's top-K stability between disjoint halves of its pairs
  verdict.json      the verdict, its lines and its numbers (strict JSON: NaN is null)
The outcomes (evidence for / suggestive / evidence against / inconclusive / no signal) are defined in
docs/verdict.md; verdict.json also carries the pre-registered settings and any deviation from them.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from locaudit.io import (atomic_path, follow_umask, replace_path, staging_dir, write_json_atomic,
                         write_text_atomic)
from locaudit.study import figures as F
from locaudit.study.analysis import (METHODS, SELECTION_LABEL, analyze, for_candidate, load_per_question, metric_columns,
                                     results_frame, trials_frame, verdict)
from locaudit.study.candidates import STABILITY_KEY, agreement_rows, rankings_of_run, side_by_side, stability_rows
from locaudit.study.dose_report import CAPTIONS as DOSE_CAPTIONS, dose_section, insert_section, training_section
from locaudit.study.ledger import LEDGER_FILE, Ledger
from locaudit.study.preregistration import FIELDS, KEY as PREREG_KEY, deviations, judge_record
from locaudit.study.spec import ProbeSpec, RandomSpec, StudySpec, VerdictSpec, spec_of_run

log = logging.getLogger(__name__)

STATS_NOTE = (
    "Each location is one unit: training seeds are averaged per location on both sides, and the grid point "
    "(alpha for ITI; tau x learning rate for optimal edits) is chosen per location on the primary metric, on data "
    "other than what is reported (validation split, else cross-fitting on halves of the test questions); every "
    "metric is read at that point. Two tests decide 'evidence for', both at the family's level (an "
    "intersection-union test: p_combined = max of the two): the candidate's rank among the random draws, p_rank = "
    "(1 + #draws at least as good) / (n + 1) (exact, ties counted as at least as good; its floor 1/(n+1) says how "
    "many draws a claim needs), and a hierarchical t-test of the difference, p_mean, whose standard error adds the "
    "draws' spread, the paired question bootstrap (test questions resampled jointly for every edit) and, with several "
    "seeds, the candidate's training noise, with Satterthwaite degrees of freedom. A claim that only the floor "
    "carries (one more draw at least as good would undo it) is 'suggestive'. ci_low/ci_high: the t-interval of the "
    "difference; ci_boot_*: the bootstrap percentile interval; rank_stability: the share of question resamples in "
    "which the candidate still ranks first. Equivalence is a TOST on the difference as a fraction of full "
    "alignment's gain over the unedited model. Secondary columns, each a different question: ch_p (Crawford-Howell: "
    "is the candidate an outlier of a normal distribution of locations), welch_seeds_p (the candidate's training "
    "seeds vs the draws: training noise, not locations), t_tost_p (one-sample t TOST of the draws' mean around the "
    "candidate, locations only). Scopes other than 'selected' are descriptive; 'best_on_test' chooses grid points on "
    "the reported data and is optimistic."
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


def trial_wall_s(df: pd.DataFrame) -> pd.Series:
    """Each trial's wall seconds: its finishing attempt's (`duration_s`) plus its earlier attempts' (`lost_s`)."""
    lost = df["lost_s"].fillna(0.0) if "lost_s" in df else 0.0
    return df["duration_s"].fillna(0.0) + lost


def timing_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per trial kind: trials done, wall seconds (sum and mean; a trial's wall time is its finishing attempt's
    plus what its earlier attempts ran without finishing, `lost_s`, of which `lost_unknown` attempts ran for an
    unknown time) and CPU seconds of the finishing attempts."""
    if df.empty:
        return pd.DataFrame()
    d = df[df["status"] == "done"]
    if d.empty:
        return pd.DataFrame()
    d = d.assign(wall=trial_wall_s(d))
    g = d.groupby("kind", sort=False)
    out = pd.DataFrame({"trials": g.size(), "wall_s": g["wall"].sum(), "mean_wall_s": g["wall"].mean()})
    if "lost_s" in d:
        out["earlier_attempts_s"] = g["lost_s"].sum()
        out["unknown_attempts"] = g["lost_unknown"].sum().astype(int)
    if "cpu_s" in d and d["cpu_s"].notna().any():
        out["cpu_s"] = g["cpu_s"].sum()
    out = out.reset_index()
    total = {"kind": "total", "trials": int(out["trials"].sum()), "wall_s": float(out["wall_s"].sum()),
             "mean_wall_s": None}
    if "lost_s" in d:
        total["earlier_attempts_s"] = float(out["earlier_attempts_s"].sum())
        total["unknown_attempts"] = int(out["unknown_attempts"].sum())
    if "cpu_s" in out:
        total["cpu_s"] = float(out["cpu_s"].sum())
    return pd.concat([out, pd.DataFrame([total])], ignore_index=True)


def _probe(run_dir: Path, rows: list[dict], notes: list[str] | None = None):
    """The study's probe result, or None; a damaged probe folder is named in `notes` (the report says so)."""
    for r in rows:
        if r["kind"] == "probe" and r["status"] == "done" and r["artifacts"].get("probe"):
            path = run_dir / r["artifacts"]["probe"]
            try:
                from locaudit.localize.probe import ProbeResult

                return ProbeResult.load(path)
            except Exception as e:  # a report never fails on a missing or damaged artifact, but says so
                msg = f"no probe heatmap: the probe folder {path} is unreadable ({type(e).__name__}: {str(e)[:200]})"
                log.warning(msg)
                if notes is not None:
                    notes.append(msg + "; `locaudit run` re-runs a probe trial whose files fail their checksums")
                return None
    return None


def _png_size(data: bytes) -> tuple[int, int] | None:
    """A PNG's width and height in pixels from its IHDR chunk (None if it is not a PNG)."""
    if len(data) >= 24 and data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return None


WIDE_FIGURE_PX = 700  # a figure wider than this gets a row of its own (class "wide")


def _img(path: Path) -> str:
    raw = path.read_bytes()
    data = base64.b64encode(raw).decode("ascii")
    size = _png_size(raw)
    wh = f' width="{size[0]}" height="{size[1]}"' if size else ""  # the layout is known before decoding
    return f'<img alt="{html.escape(path.stem)}"{wh} src="data:image/png;base64,{data}">'


# columns in the compared metric's units: printed to 4 significant digits of the row's scale (the larger of its
# means), so float noise such as a constant spread of 2.8e-17 prints 0
SCALED = ("candidate_mean", "random_mean", "random_sd", "diff", "ci_low", "ci_high", "ci_boot_low", "ci_boot_high",
          "se_diff", "se_locations", "se_questions", "se_seeds", "full_alignment", "unedited", "gain", "gain_lcb",
          "margin_abs", "value", "optimistic_candidate", "optimistic_random_mean", "tost_low_abs", "tost_high_abs")
SCALE_FROM = ("candidate_mean", "random_mean", "full_alignment", "unedited", "value", "optimistic_candidate")


def _is_p(col: str) -> bool:
    """A p-value column (p_rank, p_combined_adj, tost_p, ch_p, welch_seeds_p, p_jaccard, ...)."""
    c = str(col)
    return c.startswith("p_") or c.endswith("_p") or "_p_" in c


def _row_scale(r) -> float | None:
    vals = []
    for c in SCALE_FROM:
        try:
            v = r[c]
        except (KeyError, IndexError):
            continue
        if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)) \
                and math.isfinite(float(v)):
            vals.append(abs(float(v)))
    return max(vals) if vals else None


def _num(v, col: str | None = None, scale: float | None = None) -> str:
    """A table cell: p-values to 2 significant digits; numbers in the metric's units (SCALED, with the row's
    `scale`) to 4 significant digits of that scale; other floats to 4 significant digits; never '-0'."""
    if v is None:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if not math.isfinite(v):
            return "n/a" if col is not None and _is_p(col) else ""  # a test that could not be (or was not) run
        a = abs(v)
        if col is not None and _is_p(col):
            return f"{v:.2g}" if a >= 1e-3 or a == 0 else f"{v:.1e}"
        if col in SCALED and scale is not None:
            s = max(scale, a)
            if s == 0 or a <= 1e-9 * s:
                return "0"
            nd = min(8, max(0, 3 - math.floor(math.log10(s))))
            out = f"{v:.{nd}f}"
            return "0" if float(out) == 0 else out
        if a < 1e-12:
            return "0"
        out = f"{v:.2e}" if (a < 1e-3 or a >= 1e5) else f"{v:.4g}"
        return "0" if out.startswith("-") and float(out) == 0 else out
    return html.escape(str(v))


def _th(c) -> str:
    """A header cell; long names may break after their underscores (p_combined_<wbr>adj)."""
    return "<th>" + html.escape(str(c)).replace("_", "_<wbr>") + "</th>"


def _table(df: pd.DataFrame, cols: list[str] | None = None, max_rows: int = 500, cls: str = "") -> str:
    if df is None or df.empty:
        return "<p class='muted'>nothing yet</p>"
    cols = [c for c in (cols or list(df.columns)) if c in df.columns]
    head = "".join(_th(c) for c in cols)
    body = []
    for _, r in df.head(max_rows).iterrows():
        scale = _row_scale(r)
        cells = []
        for c in cols:
            v = r[c]
            numeric = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
            cells.append(f"<td class='n'>{_num(v, c, scale)}</td>" if numeric else f"<td>{_num(v, c, scale)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    more = f"<p class='muted'>{len(df) - max_rows} more rows in the CSV</p>" if len(df) > max_rows else ""
    klass = f" class='{cls}'" if cls else ""
    return f"<table{klass}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{more}"


def _first(cols: list[str], key: list[str]) -> list[str]:
    """`cols` with the key columns first, in the key's order."""
    return [c for c in key if c in cols] + [c for c in cols if c not in key]


def _key_table(df: pd.DataFrame, key: list[str], every: list[str] | None = None, csv: str | None = None,
               max_rows: int = 500) -> str:
    """The decision columns (outcome and p-values first) in a table that fits an 800 px page (class 'key'),
    then every column (`every`, default the frame's with the key first) in a collapsed details table that may
    scroll sideways."""
    if df is None or df.empty:
        return "<p class='muted'>nothing yet</p>"
    cols = [c for c in (every or _first(list(df.columns), key)) if c in df.columns]
    rest = [c for c in cols if c not in key]
    out = _table(df, key, max_rows, cls="key")
    if rest:
        where = f" (also in {html.escape(csv)})" if csv else ""
        out += (f"<details><summary>All {len(cols)} columns{where}</summary>" + _table(df, cols, max_rows, cls="all")
                + "</details>")
    return out


CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222;
overflow-wrap:break-word}
h1{font-size:1.6em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
.verdict{background:#f4f7fb;border-left:5px solid #1f77b4;padding:.8em 1em;margin:1em 0}
.verdict p.head{font-weight:600;font-size:1.08em;margin:.2em 0 .6em}
table{border-collapse:collapse;font-size:.82em;margin:.5em 0;display:block;max-width:100%;overflow-x:auto}
th,td{border:1px solid #ddd;padding:.25em .35em;text-align:left;vertical-align:top}
td.n{text-align:right;white-space:nowrap} td{overflow-wrap:anywhere;max-width:24em}
th{background:#f0f0f0;font-weight:600}
table.key td{max-width:14em}
details{margin:.3em 0} summary{cursor:pointer;color:#1f4e79}
.figs{display:flex;flex-wrap:wrap;gap:1em} .figs figure{margin:0;flex:1 1 460px;min-width:0}
.figs figure.wide{flex-basis:100%} .figs img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.8em;color:#555} .muted{color:#888} code{background:#f4f4f4;padding:0 .2em;overflow-wrap:anywhere}
pre{white-space:pre-wrap;overflow-wrap:anywhere}
"""


def _figures(run_dir: Path, out: Path, res: pd.DataFrame, selected: pd.DataFrame, singles: pd.DataFrame, probe,
             top_k: int, primary: str | None) -> dict[str, Path]:
    """The report's figures; the histograms and grid curves show `primary`, the metric the verdict rests on."""
    figs: dict[str, Path] = {}

    def add(name: str, p):
        if p is not None:
            figs[name] = Path(p)

    for m in METHODS:
        add(f"hist_{m}", F.hist_random_vs_top(selected, m, out / f"hist_{m}.png", metric=primary, top_k=top_k))
    add("truth_info", F.truth_info_scatter(res, out / "truth_info.png"))
    add("kl_mc", F.kl_mc_scatter(res, out / "kl_mc.png"))
    for m in METHODS:
        add(f"single_vs_full_{m}", F.single_vs_full(selected, singles, m, out / f"single_vs_full_{m}.png", top_k=top_k))
    for m in METHODS:
        add(f"grid_{m}", F.grid_curves(res, m, out / f"grid_{m}.png", metric=primary))
    if probe is None:
        (out / "probe_heatmap.png").unlink(missing_ok=True)  # never show a stale heatmap of an earlier build
    if probe is not None:
        hi = []
        if not singles.empty and "matches_full" in singles:
            for h in singles[(singles["method"] == "optimal") & (singles["matches_full"] == True)]["head"].dropna():  # noqa: E712
                from locaudit.heads import HeadSet

                hi.extend(HeadSet.parse(h).heads)
        add("probe_heatmap", F.probe_heatmap(probe.val_acc.numpy(), out / "probe_heatmap.png", top_k, hi))
    return figs


# the decision columns, first and alone in the tables a reader sees (every column sits below, collapsed)
VERDICT_KEY = ["method", "outcome", "p_combined_adj", "p_rank", "p_floor", "p_mean", "tost_p_adj", "candidate_mean",
               "random_mean", "diff"]
COMPARISON_KEY = ["method", "metric", "outcome", "p_combined_adj", "p_rank", "p_floor", "p_mean", "tost_p_adj",
                  "candidate_mean", "random_mean", "diff"]
LOCALIZER_KEY = ["localizer", "method", "outcome", "p_combined_adj", "p_rank", "p_floor", "p_mean", "tost_p_adj",
                 "candidate_mean", "random_mean", "diff"]
SINGLES_KEY = ["method", "head", "matches_full", "p_match_adj", "gain_fraction", "gain_fraction_lcb", "value",
               "full_alignment", "probe_rank"]
AGREEMENT_KEY = ["a", "b", "k", "jaccard", "p_jaccard", "spearman", "p_spearman"]


CAPTIONS = {
    "hist_iti": "ITI (heuristic) edits: the primary metric over random K-head draws vs the probe's top-K heads.",
    "hist_optimal": "Optimal edits: the same comparison. The paper finds random heads as good as the top-K heads here.",
    "truth_info": "True vs Info of every trial (every grid point).",
    "kl_mc": "KL divergence from the unedited model vs multiple-choice accuracy.",
    "single_vs_full_iti": "ITI at single heads vs all heads.",
    "single_vs_full_optimal": "Optimal edits at single heads vs full alignment (all heads).",
    "grid_iti": "ITI: metric over alpha.",
    "grid_optimal": "Optimal edits: metric over tau (best learning rate).",
    "probe_heatmap": "Per-head probe accuracy; red boxes: the top-K heads; blue circles: single heads whose optimal "
                     "edit matches full alignment (lower confidence bound of the gain fraction above 1 - margin).",
}
CAPTIONS.update(DOSE_CAPTIONS)


def build_report(run_dir: str | Path, out_dir: str | Path | None = None, n_resamples: int = 4999,
                 judge=None) -> Report:
    """Rebuild RUN/report from the ledger (see the module docstring). With `judge` (a Judge), True/Info are
    re-scored by it from the saved answers (study/rejudge.py) and the report goes to RUN/report-<judge>."""
    from locaudit.study.rejudge import judges_used, rejudge_rows, study_questions

    run_dir = Path(run_dir)
    with Ledger(run_dir) as ledger:
        spec = ledger.get_meta("spec", {}) or {}
        pre = ledger.get_meta(PREREG_KEY)
        machine = ledger.get_meta("precision", {}) or {}
        rows = ledger.rows_with_cost()
        counts = ledger.counts()
    notes: list[str] = []
    rejudged = None
    study = spec_of_run(spec, f"{run_dir / LEDGER_FILE}: meta 'spec'") if spec else None
    own_judge = judge_record(study) if study is not None else {"written": None, "resolved": None}
    if judge is not None:
        rows, rejudged = rejudge_rows(run_dir, rows, judge,
                                      questions=(lambda: study_questions(study)) if study is not None else None)
        own = own_judge.get("resolved") or own_judge.get("written")
        notes.append(f"True and Info re-scored by the judge {rejudged['judge']} from the saved answers of "
                     f"{rejudged['trials']} trials ({rejudged['answers']} answers); the run's own judge was {own}. "
                     "MC, KL and CE do not use a judge and are unchanged.")
    used = judges_used(run_dir, rows) if rejudged is None else {rejudged["judge"]: rejudged["trials"]}
    if len(used) > 1:
        own = own_judge.get("resolved") or own_judge.get("written")
        notes.append(f"True and Info come from {len(used)} different judges ("
                     + "; ".join(f"{k}: {n} trial(s)" for k, n in sorted(used.items()))
                     + "): the trials were judged where the judge was trained separately (a run carried across "
                     f"machines trains the default judge on each). `locaudit report {run_dir} --judge {own}` "
                     "re-scores every saved answer with one.")
    default_out = run_dir / (f"report-{rejudged['slug']}" if rejudged else "report")
    final = Path(out_dir) if out_dir is not None else default_out
    # built in a temporary sibling folder and swapped in as one unit once complete (`_put_in_place`): a killed or
    # failed rebuild leaves the previous report whole, never an old index.html beside new tables
    out = staging_dir(final)  # a failed build's folder is removed by the next build (or at exit)
    # a ledger without a recorded spec (none written by locaudit lacks one) is read with the spec's defaults
    top_k = study.top_k_of("probe") if study is not None else ProbeSpec().top_k
    cfg = study.verdict if study is not None else VerdictSpec()
    max_overlap = (study.localizers.random if study is not None else RandomSpec()).max_overlap
    all_df = trials_frame(rows)
    res = results_frame(rows)
    tables = export_trials(all_df, out)
    tables["results.csv"] = _write_df(res, out / "results.csv")
    probe = _probe(run_dir, rows, notes)
    ranking = probe.ranking() if probe is not None else None
    perq = load_per_question(run_dir, rows)
    a = analyze(res, perq, cfg, ranking, n_resamples=n_resamples, max_overlap=max_overlap, top_k=top_k)
    comp, singles = a.comparisons, a.singles
    v = verdict(for_candidate(res, "probe"), comp, singles, cfg, top_k=top_k, flags=a.flags, selection=a.selection)
    used_judge = rejudged["judge"] if rejudged else own_judge.get("resolved")
    devs = deviations(pre, cfg, used_judge, rejudged is not None)
    if devs:
        v.headline = f"Re-analysed: {'; '.join(devs)}. " + v.headline
    dose = dose_section(run_dir, rows, res, a.selected, a.primary, cfg, out, n_resamples)  # None: no dose curves
    if dose is not None and dose.line:
        v.lines.append(dose.line)
    if pre is None:
        notes.append("This run's ledger has no pre-registered verdict settings (runs started before they were "
                     "recorded): nothing to compare the analysis with.")
    rankings = rankings_of_run(run_dir, rows, probe, notes, study)
    side, per_candidate = side_by_side(res, perq, cfg, rankings, n_resamples, max_overlap)
    agree = agreement_rows(rankings) if len(rankings) > 1 else []
    stability = stability_rows(rankings)
    _write_tables(out, tables, all_df, a, v, side, agree, stability)
    training = training_section(run_dir, rows, out)  # edits trained with early stopping (None without)
    vd = {"headline": v.headline, "outcome": v.outcome, "lines": v.lines, "table": v.table, "missing": v.missing,
          "counts": counts, "primary_metric": a.primary, "selection": a.selection, "flags": a.flags,
          "config": cfg.model_dump(), "precision": machine, "built": time.strftime("%Y-%m-%d %H:%M:%S"),
          "localizers": per_candidate, "localizer_table": side, "agreement": agree,
          "localizer_stability": stability,
          "judge": ({**rejudged, "rejudged": True} if rejudged else
                    {"judge": own_judge.get("resolved"), "written": own_judge.get("written"), "rejudged": False}),
          "preregistered": pre, "analysed": {**{k: getattr(cfg, k) for k in FIELDS}, "verdict": cfg.model_dump(),
                                              "judge": used_judge, "primary_metric_used": a.primary},
          "deviations": devs, "judges_used": used}
    if training is not None and not training.per_group.empty:
        vd["training"] = {"line": training.line, "groups": training.per_group.to_dict("records")}
    if dose is not None:  # matched collateral damage (study/dose_report.py)
        vd["matched_kl"] = dose.result
        tables["matched_kl.csv"] = _write_df(dose.table, out / "matched_kl.csv")
    write_json_atomic(out / "verdict.json", vd)
    tables["verdict.json"] = out / "verdict.json"
    figs = _figures(run_dir, out, res, a.selected, singles, probe, top_k, a.primary)
    figs.update(dose.figures if dose is not None else {})
    if training is not None:
        if training.figure is not None:
            figs["learning_curves"] = training.figure
        tables["training.csv"] = _write_df(training.per_edit, out / "training.csv")
    index = out / "index.html"
    page = _html(study, counts, all_df, res, comp, singles, v, figs, a, machine, notes, side, per_candidate, agree,
                 used_judge, stability)
    for section in (dose, training):
        if section is not None:
            page = insert_section(page, section.html(_table))
    write_text_atomic(index, page)
    return _put_in_place(Report(out, index, figs, tables, json.loads((out / "verdict.json").read_text())), final)


def _write_tables(out: Path, tables: dict[str, Path], all_df: pd.DataFrame, a, v, side: list[dict],
                  agree: list[dict], stability: list[dict]) -> None:
    """The analysis's CSV tables written into the report folder `out`, each added to `tables` by file name."""
    if stability:
        tables["localizer_stability.csv"] = _write_df(pd.DataFrame(stability), out / "localizer_stability.csv")
    if side:
        tables["localizers.csv"] = _write_df(pd.DataFrame(side), out / "localizers.csv")
    if agree:
        tables["agreement.csv"] = _write_df(pd.DataFrame(agree), out / "agreement.csv")
    tables["comparisons.csv"] = _write_df(a.comparisons, out / "comparisons.csv")
    tables["verdict.csv"] = _write_df(pd.DataFrame(v.table), out / "verdict.csv")
    tables["singles.csv"] = _write_df(a.singles, out / "singles.csv")
    tables["selected.csv"] = _write_df(a.selected, out / "selected.csv")
    tables["flags.csv"] = _write_df(pd.DataFrame(a.flags, columns=["method", "localizer", "heads", "issue", "overlap"]),
                                    out / "flags.csv")
    tables["timing.csv"] = _write_df(timing_table(all_df), out / "timing.csv")


def _put_in_place(rep: Report, final: Path) -> Report:
    """Swap the finished report folder `rep.out_dir` in place of `final` (io.replace_path: the old report stays
    whole until then) with the umask's modes; the returned Report names the files at their final paths."""
    tmp = rep.out_dir
    follow_umask(tmp)
    replace_path(tmp, final)

    def moved(p):
        try:
            return final / Path(p).relative_to(tmp)
        except (TypeError, ValueError):
            return p
    return Report(final, moved(rep.index), {k: moved(p) for k, p in rep.figures.items()},
                  {k: moved(p) for k, p in rep.tables.items()}, rep.verdict)


def _html_head(spec: StudySpec | None, counts: dict, all_df: pd.DataFrame, judge: str | None,
               machine: dict | None, notes: list[str] | None) -> list[str]:
    """The page's head: title, model, data, trial counts and time, the machine, notes, and whether it is partial."""
    name = html.escape(spec.name if spec is not None else "study")
    model_name, dtype = (spec.model.name, spec.model.dtype) if spec is not None else ("?", "?")
    data = spec.data if spec is not None else None
    total = sum(counts.values())
    status = ", ".join(f"{counts.get(s, 0)} {s}" for s in ("done", "running", "pending", "failed"))
    partial = counts.get("done", 0) < total
    wall = float(trial_wall_s(all_df).sum()) if "duration_s" in all_df else 0.0
    unknown = int(all_df["lost_unknown"].sum()) if "lost_unknown" in all_df else 0
    cpu = float(all_df["cpu_s"].dropna().sum()) if "cpu_s" in all_df else 0.0
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>locaudit: {name}</title><style>{CSS}</style></head><body>",
             f"<h1>Does editing provide evidence for localization? &mdash; {name}</h1>",
             f"<p>{html.escape(spec.description if spec is not None else '')}</p>",
             f"<p>Model <code>{html.escape(model_name)}</code> ({html.escape(dtype)}); "
             f"data <code>{html.escape(str(data.spec if data else None))}</code>"
             f"{', ' + str(data.max_questions) + ' questions' if data and data.max_questions else ''}"
             f"{'; judge <code>' + html.escape(str(judge)) + '</code>' if judge else ''}. "
             f"Trials: {total} ({status}); trial time {wall / 60:.1f} min"
             f"{f' ({cpu / 60:.1f} CPU-min)' if cpu else ''}"
             f"{f', more: {unknown} attempt(s) killed before the ledger kept heartbeats ran for an unknown time' if unknown else ''}.</p>"]
    if machine:
        parts.append("<p class='muted'>" + html.escape(
            f"Precision {machine.get('precision', '?')} (asked: {machine.get('precision_requested', '?')}; "
            f"{machine.get('precision_reason', '')}); device {machine.get('device', '?')}, CPU capability "
            f"{machine.get('cpu_capability', '?')}.") + "</p>")
    for note in notes or []:
        parts.append("<p class='muted'><b>Note:</b> " + html.escape(note) + "</p>")
    if partial:
        parts.append("<p class='muted'><b>Partial report:</b> the study is not finished; numbers and figures use the "
                     "trials done so far. Rebuild with <code>locaudit report RUN</code>.</p>")
    return parts


def _html_verdict(v, a) -> list[str]:
    """The verdict's headline and lines, and its table with the outcomes' definitions."""
    parts: list[str] = []
    parts.append("<div class='verdict'><p class='head'>" + html.escape(v.headline) + "</p><ul>"
                 + "".join(f"<li>{html.escape(x)}</li>" for x in v.lines) + "</ul>"
                 + (f"<p class='muted'>Missing: {html.escape(', '.join(v.missing))}</p>" if v.missing else "") + "</div>")
    if v.table:
        cfg = a.config if a is not None else VerdictSpec()
        parts.append("<h2>Verdict table</h2><p class='muted'>" + html.escape(
            f"Outcomes (docs/verdict.md): evidence for = the rank test and the hierarchical t-test of the difference "
            f"both reject at {cfg.alpha:g} after {cfg.multiplicity} correction; suggestive = the same, but only at the "
            f"design's floor; evidence against = TOST within ±{cfg.margin:.0%} of full alignment's "
            "gain; inconclusive = neither; no signal = the metric does not vary or full alignment has no measurable "
            "gain.") + "</p>" + _key_table(pd.DataFrame(v.table), VERDICT_KEY, csv="verdict.csv"))
    return parts


def _html_localizers(side: list[dict] | None, per_candidate: dict | None, agree: list[dict] | None,
                     stability: list[dict] | None) -> list[str]:
    """The localizers side by side, their agreement and the stability of their top-K (where there are several)."""
    parts: list[str] = []
    if side:
        parts.append("<h2>Localizers side by side</h2><p class='muted'>" + html.escape(
            "Each localizer's top-K heads are edited like the probe's and compared with the same random draws, full "
            "alignment and unedited model. One family across localizers (gatekeeping): the primary localizer (the "
            "probe) is decided first, in its own headline family; only where all of its tests reject are the other "
            "localizers' tests decided, together in one family (p_adj_across_localizers, with the discrete "
            "restriction); otherwise they are at most 'inconclusive'.") + "</p><ul>" + "".join(
            f"<li><b>{html.escape(c)}</b>: {html.escape(d['headline'])}</li>" for c, d in (per_candidate or {}).items())
            + "</ul>" + _key_table(pd.DataFrame(side), LOCALIZER_KEY, csv="localizers.csv"))
    if agree:
        parts.append("<h2>Agreement between localizers</h2><p class='muted'>" + html.escape(
            "Jaccard of the top-K sets and Spearman correlation over all heads, against two random K-sets "
            "(hypergeometric: mean and 95th percentile of the Jaccard, p = P(overlap >= observed)) and two random "
            "rankings (Monte-Carlo 95th percentile of Spearman).") + "</p>"
            + _key_table(pd.DataFrame(agree), AGREEMENT_KEY, csv="agreement.csv"))
    if stability:
        parts.append("<h2>Stability of the localizers' top-K</h2><p class='muted'>" + html.escape(
            "Each causal localizer's pairs split into two disjoint, seeded halves, heads ranked on each: overlap = "
            "the share of the top-K the halves share (chance = K / heads: two random K-sets), Jaccard of the two "
            "top-K sets, Spearman of the halves' scores over all heads. Each half has half the pairs, so this is a "
            "lower bound on the stability of the ranking from all pairs.") + "</p>"
            + _key_table(pd.DataFrame(stability), STABILITY_KEY + ["note"], csv="localizer_stability.csv"))
    return parts


def _html_figures(figs: dict[str, Path]) -> list[str]:
    """The figures, each with its caption; a wide one spans the page."""
    parts: list[str] = []
    if figs:
        parts.append("<h2>Figures</h2><div class='figs'>")
        for k, p in figs.items():
            with open(p, "rb") as fh:
                size = _png_size(fh.read(24))
            wide = " class='wide'" if size and size[0] > WIDE_FIGURE_PX else ""
            parts.append(f"<figure{wide}>{_img(p)}<figcaption>{html.escape(CAPTIONS.get(k, k))}</figcaption></figure>")
        parts.append("</div>")
    return parts


def _html_comparisons(comp: pd.DataFrame, singles: pd.DataFrame, a) -> list[str]:
    """The candidate-vs-random comparisons, the single heads, and the flagged draws and grid selection."""
    parts: list[str] = []
    cols = ["method", "metric", "outcome", "p_combined_adj", "p_rank", "p_floor", "p_mean", "tost_p_adj",
            "candidate_mean", "random_mean", "diff", "scope", "family", "selection", "n_random", "random_sd", "ci_low",
            "ci_high", "percentile", "p_rank_adj", "tost_p", "tost_low", "tost_high", "z", "p_combined",
            "rank_stability", "ci_boot_low", "ci_boot_high", "ch_p", "welch_seeds_p", "t_tost_p", "question_noise",
            "training_noise"]
    parts.append("<h2>Candidate vs random draws</h2><p class='muted'>" + html.escape(STATS_NOTE) + "</p>")
    sel = comp[comp["scope"] == "selected"] if not comp.empty else comp
    parts.append(_key_table(sel, COMPARISON_KEY, cols, "comparisons.csv"))
    if not comp.empty and (comp["scope"] != "selected").any():
        parts.append("<details><summary>Best on test (optimistic), per grid point and pooled (descriptive)</summary>"
                     + _table(comp[comp["scope"] != "selected"], _first(cols, ["method", "metric", "scope"]), cls="all")
                     + "</details>")
    parts.append("<h2>Single heads vs full alignment</h2>" + _key_table(singles, SINGLES_KEY, csv="singles.csv"))
    if a is not None and a.flags:
        parts.append("<h2>Flagged random draws</h2>" + _table(pd.DataFrame(a.flags)))
    if a is not None and a.selection:
        parts.append("<p class='muted'>" + html.escape("; ".join(f"{m}: grid points {SELECTION_LABEL.get(x, x)}"
                                                             for m, x in a.selection.items())) + "</p>")
    return parts


def _html_results(all_df: pd.DataFrame, res: pd.DataFrame, a) -> list[str]:
    """Compute time, every result row (flagged draws marked) and the failed trials."""
    parts: list[str] = []
    parts.append("<h2>Compute</h2>" + _table(timing_table(all_df)))
    metrics = metric_columns(res)
    shown = res
    if a is not None and a.flags and not res.empty:  # duplicate / overlapping random draws, flagged in the table
        flag = {(f["method"], f["localizer"]): f["issue"] for f in a.flags}
        shown = res.assign(flag=[flag.get((k, loc)) for k, loc in zip(res["kind"], res["localizer"])])
    every = ["kind", "group", "localizer", "candidate", "heads", "flag", "alpha", "tau", "lr", "seed", *metrics,
             "duration_s", "edit_dir"]
    parts.append("<h2>Results</h2>" + _key_table(shown, ["kind", "group", "localizer", "flag", "alpha", "tau", "lr",
                                                         "seed", *metrics[:3]], every, "results.csv"))
    failed = all_df[all_df["status"] == "failed"] if not all_df.empty else all_df
    if not failed.empty:
        parts.append("<h2>Failed trials</h2>" + _table(failed, ["key", "kind", "localizer", "attempts", "error"])
                     + "<p class='muted'>Retry with <code>locaudit run STUDY --out RUN --retry-failed</code>.</p>")
    return parts


def _html(spec: StudySpec | None, counts: dict, all_df: pd.DataFrame, res: pd.DataFrame, comp: pd.DataFrame,
          singles: pd.DataFrame, v, figs: dict[str, Path], a=None, machine: dict | None = None,
          notes: list[str] | None = None, side: list[dict] | None = None, per_candidate: dict | None = None,
          agree: list[dict] | None = None, judge: str | None = None, stability: list[dict] | None = None) -> str:
    parts = (_html_head(spec, counts, all_df, judge, machine, notes) + _html_verdict(v, a)
             + _html_localizers(side, per_candidate, agree, stability) + _html_figures(figs)
             + _html_comparisons(comp, singles, a) + _html_results(all_df, res, a))
    shown = spec.to_json() if spec is not None else {}
    parts.append("<h2>Study spec</h2><details><summary>JSON</summary><pre>" + html.escape(json.dumps(shown, indent=2))
                 + "</pre></details></body></html>")
    return "\n".join(parts)
