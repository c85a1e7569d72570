"""docs/results.md from finished studies' reports: the figures and tables are generated, never typed.

    python scripts/results_doc.py --study "SmolLM2-135M-Instruct=runs/answer-smollm2" \
        [--judge "SmolLM2-135M-Instruct=runs/answer-smollm2/report-gemma"] [--hase "SmolLM2-135M-Instruct=runs/hase_smollm2"]
        [--planned "Gemma 3 270M=docs/plans/answer_gemma3.json"]
        [--out docs/results.md] [--check]

Each `--study NAME=RUN` reads RUN/report (built by `locaudit run` / `locaudit report`): verdict.json (the headline
table, and the comparison at matched KL where the study has dose curves), comparisons.csv (the secondary metrics:
True*Info, True, Info, MC1), singles.csv (single heads vs full alignment), timing.csv (trial costs) and the figures,
which are copied to docs/results/NAME-SLUG/. Each `--judge NAME=REPORT` adds a report of the same run re-scored by
another judge (`locaudit report RUN --judge SPEC`): its comparisons on the judged metrics beside the study's own,
and the agreement of the two judges over every finished edit (Spearman correlation of the edits' True*Info, the share of
edits whose True*Info differ by under 0.05). Each `--planned NAME=DRYRUN` is a study designed but not run yet,
from its dry-run's JSON (results_doc_planned.py): its design checks and measured cost, and the line that runs it.
`--check` exits 1 when the file on disk differs from what the reports give (the docs test runs it on the committed
reports).

The page is one section per study (`## ` heading); a run renders the sections of the studies it is given and keeps
every other section of the existing page as it was (`--fresh`: only the given ones), so studies finished at
different times, on different machines, share the page without re-running each other.

What the page says in plain words is derived from the outcomes by fixed rules (`plain_words`), so a changed
result changes the words too.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_doc_hase import render_hase  # noqa: E402
from results_doc_planned import render_planned  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIGURES = ("hist_{m}.png", "single_vs_full_{m}.png", "dose_kl.png", "learning_curves.png")  # {m}: an edit method
FIGURE_TITLES = {"hist": "{m}: random draws (histogram) with the candidate and full alignment marked",
                 "single_vs_full": "{m}: single heads vs full alignment", "dose_kl": "Gain vs KL on generic text (dose curves)",
                 "learning_curves": "Validation IPO loss while training (early stopping)"}
JUDGED = ("true_info", "true", "info", "true_info_prob")
SECONDARY = ("true_info", "true", "info", "mc1")  # secondary metrics the page shows, where the study has them


@dataclass
class Study:
    name: str
    report: Path
    verdict: dict
    table: pd.DataFrame
    singles: pd.DataFrame | None
    timing: pd.DataFrame | None
    results: pd.DataFrame | None
    comparisons: pd.DataFrame | None = None


def _csv(path: Path) -> pd.DataFrame | None:
    """A report table, or None where the report wrote none (or an empty one)."""
    if not path.is_file():
        return None
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return None


def load_report(name: str, report: Path) -> Study:
    """A built report folder (RUN/report or a re-judged one); a clear error names what is missing."""
    vpath = report / "verdict.json"
    if not vpath.is_file():
        raise SystemExit(f"results_doc: {vpath} not found: build the report first (`locaudit report RUN`)")
    verdict = json.loads(vpath.read_text(encoding="utf-8"))
    table = pd.DataFrame(verdict.get("table") or [])
    return Study(name, report, verdict, table, _csv(report / "singles.csv"),
                 _csv(report / "timing.csv"), _csv(report / "results.csv"), _csv(report / "comparisons.csv"))


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "study"


def _f(x, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, (int, float)):
        return f"{x:.{nd}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{nd}f}"
    return str(x)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def verdict_table(t: pd.DataFrame, empty: str = "_No headline comparison: the study has no finished comparison of "
                                                "the candidate with random draws._") -> str:
    """The headline table: one row per edit method on its metric (verdict.csv's columns, rounded); comparisons.csv
    rows render alike (same columns)."""
    if t.empty:
        return empty
    rows = []
    for _, r in t.iterrows():
        rows.append([str(r["method"]), str(r["metric"]), f"**{r['outcome']}**", _f(r.get("candidate_mean")),
                     f"{_f(r.get('random_mean'))} ± {_f(r.get('random_sd'))} ({int(r.get('n_random', 0))})",
                     _f(r.get("p_rank")), _f(r.get("p_combined_adj") if pd.notna(r.get("p_combined_adj"))
                                             else r.get("p_combined")),
                     f"{_f(r.get('diff'))} [{_f(r.get('ci_low'))}, {_f(r.get('ci_high'))}]",
                     f"{_f(r.get('unedited'))} → {_f(r.get('full_alignment'))}",
                     _f(r.get("candidate_gain_fraction"), 2), _f(r.get("tost_p_adj") if pd.notna(r.get("tost_p_adj"))
                                                               else r.get("tost_p"))])
    return _md_table(["method", "metric", "outcome", "candidate", "random mean ± sd (draws)", "rank p",
                      "combined p (adjusted)", "difference [CI]", "unedited → full alignment",
                      "candidate / full gain", "TOST p"], rows)


def singles_summary(s: pd.DataFrame | None, metric: str | None) -> str | None:
    """How many single heads reach >= 90% of full alignment's gain, by their lower bound."""
    if s is None or s.empty:
        return None
    if metric is not None and "metric" in s:
        s = s[s["metric"] == metric]
    if s.empty:
        return None
    n = len(s)
    by_lcb = int((s["gain_fraction_lcb"] >= 0.9).sum()) if "gain_fraction_lcb" in s else 0
    matched = int(s["matches_full"].astype(bool).sum()) if "matches_full" in s else 0
    best = s.sort_values("gain_fraction", ascending=False).iloc[0]
    return (f"{n} single heads on {metric or 'the primary metric'}: {by_lcb} reach 90% of full alignment's gain by "
            f"their lower bound, {matched} match it by the corrected test; the best, {best['head']} "
            f"({best['localizer']}), reaches {_f(best['gain_fraction'], 2)} of the gain (lower bound "
            f"{_f(best['gain_fraction_lcb'], 2)}).")


def secondary_rows(st: Study, metrics: tuple[str, ...] = SECONDARY) -> pd.DataFrame:
    """The candidate-vs-draws comparisons of the secondary metrics (comparisons.csv, at each location's selected
    grid point; their own family, not the headline's), in the order of `metrics`; empty where there are none."""
    c = st.comparisons
    if c is None or c.empty or not {"metric", "scope", "family"} <= set(c.columns):
        return pd.DataFrame()
    rows = c[(c["scope"] == "selected") & (c["family"] == "secondary") & c["metric"].isin(metrics)]
    return rows.sort_values("metric", key=lambda m: m.map(metrics.index), kind="stable")


def matched_table(v: dict) -> str | None:
    """The comparison at matched KL (verdict.json's matched_kl): the budget, the candidate's and the draws' gains
    there and how many reached it, the difference with its interval and the tests; every location's gain at the
    budget stays in the report (matched_kl.csv)."""
    m = v.get("matched_kl") or {}
    if not m or m.get("budget") is None:
        return None
    n = m.get("n_random")
    reached = m.get("candidate_reached")
    row = [f"**{m.get('outcome', 'n/a')}**", f"{_f(m.get('budget'))} ({m.get('budget_source', 'n/a')})",
           f"{_f(m.get('candidate_gain'))} "
           f"({'reached' if reached else 'not reached' if reached is not None else 'n/a'})",
           f"{_f(m.get('random_mean_gain'))} ± {_f(m.get('random_sd_gain'))} ({m.get('random_reached', 'n/a')} of "
           f"{n if n is not None else 'n/a'} reached)",
           f"{_f(m.get('diff'))} [{_f(m.get('ci_low'))}, {_f(m.get('ci_high'))}]", _f(m.get("p_rank")),
           _f(m.get("p_mean")), _f(m.get("full_gain")), _f(m.get("tost_p"))]
    table = _md_table(["outcome", "KL budget", "candidate gain", "random mean ± sd gain", "difference [CI]", "rank p",
                       "t-test p", "full alignment's gain", "TOST p"], [row])
    return (f"The gain in {m.get('metric', 'the primary metric')} over the unedited model at one KL on generic text "
            "(each edit's training path interpolated; a path that never reaches the budget keeps its trained gain); "
            "a secondary comparison, outside the headline family (docs/verdict.md).\n\n" + table)


def cost_line(st: Study) -> str | None:
    t = st.timing
    if t is None or "kind" not in t:
        return None
    tot = t[t["kind"] == "total"]
    if tot.empty:
        return None
    parts = ", ".join(f"{r.kind} {int(r.trials)} x {_f(r.mean_wall_s / 60, 1)} min" for r in t.itertuples()
                      if r.kind != "total" and r.trials > 0)
    row = tot.iloc[0]
    cpu = row.get("cpu_s")
    cpu = _f(cpu / 3600, 2) if isinstance(cpu, (int, float)) and math.isfinite(cpu) else "n/a"
    earlier = float(row.get("earlier_attempts_s", 0) or 0)
    unknown = int(row.get("unknown_attempts", 0) or 0)
    if earlier > 0 or unknown > 0:  # interrupted attempts (a resumed pass goes on from its checkpoint): CPU not known
        when = (f", {_f(earlier / 3600, 2)} h of it in earlier attempts that were interrupted"
                + (f" (and {unknown} more of unknown length: a lower bound)" if unknown else "")
                + f"; {cpu} CPU-h in the attempts that finished")
    else:
        when = f" ({cpu} CPU-h)"
    return f"{int(row['trials'])} trials, {_f(row['wall_s'] / 3600, 2)} h of trial wall time{when}: {parts}."


def judge_agreement(a: Study, b: Study, metric: str = "true_info") -> str | None:
    """Two judges over the same finished edits: Spearman correlation of the edits' metric and the share within
    0.05 (from each report's results.csv, matched by trial key)."""
    if a.results is None or b.results is None or metric not in a.results or metric not in b.results:
        return None
    m = a.results[["key", metric]].merge(b.results[["key", metric]], on="key", suffixes=("_a", "_b")).dropna()
    if len(m) < 3:
        return None
    rho = m[f"{metric}_a"].rank().corr(m[f"{metric}_b"].rank())
    close = float(((m[f"{metric}_a"] - m[f"{metric}_b"]).abs() < 0.05).mean())
    return (f"Over {len(m)} edits the two judges' {metric} have Spearman correlation {_f(rho, 2)}; "
            f"{close:.0%} differ by under 0.05.")


def plain_words(st: Study) -> str:
    """What the outcome says about the paper's claim (editing success at a location is weak evidence that the
    behaviour is localized there), by fixed rules on the headline row of the optimal edit."""
    t = st.table
    row = t[t["method"] == "optimal"].iloc[0] if not t.empty and (t["method"] == "optimal").any() else None
    if row is None:
        return "No optimal-edit comparison finished: nothing can be said about the paper's claim yet."
    o, metric = str(row["outcome"]), str(row["metric"])
    head = f"On {metric}, the optimal edit at the candidate heads vs random head sets of the same size: {o}. "
    if o == "evidence for":
        return head + ("Editing at the conjectured location beats random locations by more than chance here: on this "
                       "model and behaviour the edit does carry evidence for localization, against the paper's "
                       "general claim.")
    if o == "evidence against":
        return head + ("Random locations are as effective as the candidate within the margin of full alignment's "
                       "gain: an edit's success at the candidate is no evidence that the behaviour is localized "
                       "there, as the paper argues.")
    if o == "suggestive":
        return head + ("The candidate ranks above the random draws but only at the design's floor p-value: suggestive, "
                       "not a decision either way.")
    return head + ("The design neither separates the candidate from random locations nor shows them equivalent: "
                   "no conclusion about the paper's claim (absence of a difference is not equivalence).")


HEADER = ("# Results\n\n<!-- generated by scripts/results_doc.py from the studies' report folders: do not edit by "
          "hand -->\n")
STUDY_HEADING = "## Does editing provide evidence for localization? (Wang & Veitch 2025) — {name}"


def split_sections(text: str) -> list[tuple[str, str]]:
    """A page's sections as (heading line, whole block), in order: each begins at a `## ` line."""
    out: list[tuple[str, str]] = []
    for line in text.splitlines():
        if line.startswith("## "):
            out.append((line, ""))
        if out:
            out[-1] = (out[-1][0], out[-1][1] + line + "\n")
    return out


def merge(existing: str | None, sections: list[tuple[str, str]]) -> str:
    """The page with `sections` (heading, block) rendered now, and every section of `existing` that none of them
    replaces kept as it was, in place: studies finished at different times share one page, and re-rendering one
    leaves the others alone. New sections follow the kept ones, in the order given; then the paper's question
    (Wang & Veitch's sections) leads, ahead of every other kind of section, each kind keeping that order."""
    new = dict(sections)
    kept = split_sections(existing) if existing else []
    blocks = [(h, new.pop(h, b)) for h, b in kept] + [(h, new.pop(h)) for h, _ in sections if h in new]
    lead = STUDY_HEADING.split("{", 1)[0]
    blocks.sort(key=lambda hb: not hb[0].startswith(lead))  # stable: each kind keeps its order
    return "\n".join([HEADER] + [b.rstrip() + "\n" for _, b in blocks])


def render_study(st: Study, others: list[Study], fig_root: Path, out: Path, copy: bool) -> tuple[str, str]:
    """One study's section of the page: (its heading, its block)."""
    heading = STUDY_HEADING.format(name=st.name)
    lines = [heading, "",
             "The study edits TruthfulQA truthfulness at a candidate set of heads (the probe's top heads), at random "
             "head sets of the same size, at single heads and at all heads (full alignment), and compares them as "
             "docs/verdict.md describes.", ""]
    v, m = st.verdict, st.verdict.get("primary_metric") or (st.table["metric"].iloc[0] if not st.table.empty else None)
    prec = v.get("precision") or {}
    lines += [f"Report built {v.get('built', 'n/a')}; judge `{(v.get('judge') or {}).get('judge', 'n/a')}`; "
              f"precision {prec.get('precision', 'n/a')} on {prec.get('device', 'n/a')} "
              f"({prec.get('cpu_capability') or prec.get('capability') or 'n/a'}); trials "
              + ", ".join(f"{k} {n}" for k, n in (v.get("counts") or {}).items()) + ".", ""]
    c = cost_line(st)
    if c:
        lines += [f"Cost: {c}", ""]
    lines += ["### Verdict", "", f"**{v.get('headline', '')}**", "", verdict_table(st.table), ""]
    lines += ["In plain words: " + plain_words(st), ""]
    sec = secondary_rows(st)
    if not sec.empty:
        lines += ["Secondary metrics (their own family, not adjusted with the headline):", "", verdict_table(sec), ""]
    s = singles_summary(st.singles, m)
    if s:
        lines += ["### Single heads", "", s, ""]
    mt = matched_table(v)
    if mt:
        lines += ["### Matched collateral damage", "", mt, ""]
    tr = (v.get("training") or {}).get("line")
    if tr:
        lines += ["### Training", "", tr, ""]
    for other in others:
        jn = (other.verdict.get("judge") or {}).get("judge", other.report.name)
        lines += [f"### Under another judge: `{jn}`", "",
                  verdict_table(secondary_rows(other, JUDGED), "_No judged comparison in this report._"), ""]
        ag = judge_agreement(st, other)
        if ag:
            lines += [ag, ""]
    dest = fig_root / slug(st.name)
    methods = list(dict.fromkeys(st.table["method"])) if not st.table.empty else []
    names = list(dict.fromkeys(pat.format(m=meth) for pat in FIGURES for meth in (methods or [""])))
    for name in names:
        src = st.report / name
        if not src.is_file():
            continue
        if copy:
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest / name)
        stem = name.rsplit(".", 1)[0]
        kind = next(k for k in FIGURE_TITLES if stem == k or stem.startswith(k + "_"))
        title = FIGURE_TITLES[kind].format(m=stem[len(kind) + 1:])
        lines += [f"![{title}]({(dest / name).relative_to(out.parent).as_posix()})", ""]
    return heading, "\n".join(lines).rstrip() + "\n"


def _pairs(values: list[str], flag: str) -> list[tuple[str, Path]]:
    out = []
    for v in values:
        if "=" not in v:
            raise SystemExit(f"results_doc: {flag} {v!r}: expected NAME=PATH")
        name, path = v.split("=", 1)
        out.append((name.strip(), Path(path)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--study", action="append", default=[], help="NAME=RUN (the report is RUN/report)")
    ap.add_argument("--judge", action="append", default=[], help="NAME=REPORT: the same run re-scored by another judge")
    ap.add_argument("--hase", action="append", default=[], help="NAME=RUN: a Hase study (locaudit hase run/report)")
    ap.add_argument("--planned", action="append", default=[],
                    help="NAME=DRYRUN: a study not run yet, from `locaudit run STUDY --dry-run --measure --json > "
                         "DRYRUN` (a later --study NAME=RUN replaces its section)")
    ap.add_argument("--out", default=str(REPO / "docs" / "results.md"))
    ap.add_argument("--check", action="store_true", help="exit 1 if the file differs from what the reports give")
    ap.add_argument("--fresh", action="store_true",
                    help="write only the sections given here (by default the page's other sections are kept)")
    args = ap.parse_args(argv)
    if not args.study and not args.hase and not args.planned:
        ap.error("at least one --study NAME=RUN, --hase NAME=RUN or --planned NAME=DRYRUN")
    out = Path(args.out)
    studies = [load_report(n, p / "report") for n, p in _pairs(args.study, "--study")]
    names = {s.name for s in studies}
    judges: dict[str, list[Study]] = {}
    for n, p in _pairs(args.judge, "--judge"):
        if n not in names:
            raise SystemExit(f"results_doc: --judge {n}: no --study of that name (have {sorted(names)})")
        judges.setdefault(n, []).append(load_report(n, p))
    sections = [render_study(st, judges.get(st.name, []), out.parent / "results", out, copy=not args.check)
                for st in studies]
    for n, p in _pairs(args.planned, "--planned"):
        if n in names:
            raise SystemExit(f"results_doc: --planned {n}: also given as --study (a finished study replaces its plan)")
        lines = render_planned(p, STUDY_HEADING.format(name=n))
        sections.append((lines[0], "\n".join(lines).rstrip() + "\n"))
    for n, p in _pairs(args.hase, "--hase"):
        lines = render_hase(n, p, out.parent / "results", out, not args.check)
        sections.append((lines[0], "\n".join(lines).rstrip() + "\n"))
    existing = out.read_text(encoding="utf-8") if out.is_file() and not args.fresh else None
    text = merge(existing, sections)
    if args.check:
        same = out.is_file() and out.read_text(encoding="utf-8") == text
        print(f"{out}: {'up to date' if same else 'differs from the reports: run scripts/results_doc.py'}")
        return 0 if same else 1
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
