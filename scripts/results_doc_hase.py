"""The Hase et al. section of docs/results.md (scripts/results_doc.py --hase NAME=RUN), from RUN/report (built by
`locaudit hase run` / `locaudit hase report`) and RUN/ledger.sqlite (the trials' costs): every figure is read from
those files, never typed.

What it shows per (editing problem, editor): Hase's R^2 table on the rewrite score (tracing, layer, both,
layer*tracing and what tracing adds to the layer, with its bootstrap interval and the F-test), the verdict of the
tracing-argmax layer against the null that keeps each layer's mean, ||dW|| / ||W||; tracing's split-half
reliability (the ceiling of tracing's R^2); the cost; the figures.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

WORDS = {
    "evidence for": "tracing's peak layer edits this fact better than that layer does for the other facts: here "
                    "localization does inform editing",
    "evidence against": "tracing's peak layer edits no better than that layer's mean over facts, within the stated "
                        "margin: here localization does not inform editing, as Hase et al. found",
    "inconclusive": "tracing's peak layer is neither shown better than its layer's mean nor shown equivalent: no "
                    "conclusion (absence of a difference is not equivalence)",
    "no signal": "the edits' success has no fact-level variation for tracing to explain",
}
FIGURES = ["success_by_layer.png", "tracing_by_layer.png"]


def _f(x, nd: int = 3) -> str:
    return "n/a" if x is None else f"{float(x):.{nd}f}"


def _p(x) -> str:
    return "n/a" if x is None else (f"{float(x):.3g}" if float(x) >= 0.001 else "< 0.001")


def costs(run: Path) -> str | None:
    """Trials, compute seconds by kind and the wall time from the first start to the last finish (ledger)."""
    db = run / "ledger.sqlite"
    if not db.is_file():
        return None
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT kind, COUNT(*), SUM(duration_s), MIN(started), MAX(finished) FROM trials "
                           "WHERE status = 'done' GROUP BY kind ORDER BY MIN(started)").fetchall()
    finally:
        con.close()
    if not rows:
        return None
    parts = [f"{k.replace('hase_', '')} {n} trial(s) {s / 60:.1f} min" for k, n, s, _, _ in rows]
    wall = (max(r[4] for r in rows) - min(r[3] for r in rows)) / 60
    return f"{'; '.join(parts)}; {wall:.1f} min from the first trial's start to the last one's end."


def _r2_rows(v: dict) -> list[str]:
    head = ("| problem | editor | R² tracing | R² layer | R² both | R² layer×tracing | layer×tracing adds to layer "
            "(95% CI) | its F-test p | verdict | ‖dW‖/‖W‖ (median) |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    verdicts = {(x["problem"], x["method"]): x for x in v.get("verdicts", [])}
    norms = {(x["problem"], x["method"]): x for x in v.get("edit_norms", [])}
    for r in v.get("r2_by_measure", []):
        if r.get("measure") != "rewrite_score":
            continue
        key = (r["problem"], r["method"])
        vd, nm = verdicts.get(key, {}), norms.get(key, {})
        rows.append(f"| {r['problem']} | {r['method']} | {_f(r.get('r2_tracing'))} | {_f(r.get('r2_layer'))} | "
                    f"{_f(r.get('r2_both'))} | {_f(r.get('r2_interaction'))} | {_f(r.get('added_interaction'))} "
                    f"[{_f(r.get('added_ci_low'))}, {_f(r.get('added_ci_high'))}] | {_p(r.get('F_p_interaction'))} | "
                    f"**{vd.get('outcome', 'n/a')}** | {_f(nm.get('median'), 4) if nm else 'n/a'} |")
    return rows


def _verdict_lines(v: dict) -> list[str]:
    out = []
    for x in v.get("verdicts", []):
        out.append(f"- {x['problem']} / {x['method']}: **{x['outcome']}**: {WORDS.get(x['outcome'], '')}. "
                   f"Mean rewrite score at tracing's peak layer {_f(x.get('mean_success_argmax'))} against "
                   f"{_f(x.get('mean_success_permuted'))} with tracing curves permuted across facts (p = "
                   f"{_p(x.get('p_perm'))}; layer-mean-removed contrast p = {_p(x.get('p_contrast'))}; equivalence "
                   f"within {100 * float(x.get('margin') or 0):g}% of the oracle gain: TOST p = {_p(x.get('tost_p'))}); a random layer "
                   f"{_f(x.get('mean_success_random'))}; the best fixed layer, chosen on the other facts, "
                   f"{_f(x.get('mean_success_best_fixed'))}.")
    return out


def overall(v: dict) -> str | None:
    """One sentence from the verdicts by fixed rules: how many (problem, editor) pairs say what, and in how many
    the best fixed layer (chosen on the other facts) edits better than tracing's peak layer (95% CI below 0)."""
    vs = v.get("verdicts") or []
    if not vs:
        return None
    counts: dict[str, int] = {}
    for x in vs:
        counts[x["outcome"]] = counts.get(x["outcome"], 0) + 1
    worse = [f"{x['problem']} / {x['method']}" for x in vs
             if (x.get("diff_vs_best_fixed_ci") or [None, None])[1] is not None and x["diff_vs_best_fixed_ci"][1] < 0]
    text = (f"Of {len(vs)} (problem, editor) pairs, " + ", ".join(f"{n} {o}" for o, n in counts.items()) + ". ")
    if counts.get("evidence for"):
        text += "Where the verdict is 'evidence for', tracing carries fact-level information about where to edit. "
    if len(counts) == 1 and "inconclusive" in counts:
        text += "No pair decides the question either way on this many facts. "
    if worse:
        text += (f"In {len(worse)} of {len(vs)} ({'; '.join(worse)}) one fixed layer, chosen on the other facts, edits "
                 "measurably better than the layer where each fact's tracing peaks (95% interval of the difference "
                 "below zero): for choosing where to edit, tracing did worse than ignoring it.")
    return text.strip()


def render_hase(name: str, run: Path, fig_root: Path, out: Path, copy: bool) -> list[str]:
    report = run / "report"
    v = json.loads((report / "verdict.json").read_text(encoding="utf-8"))
    facts, tr = v.get("facts") or {}, v.get("tracing") or {}
    rel = (tr.get("reliability") or {})
    lines = [f"## Does localization inform editing? (Hase et al. 2023) — {name}", "",
             f"Facts: {facts.get('used', 'n/a')} of ROME's known_1000 ({facts.get('known', 'n/a')} of "
             f"{facts.get('total', 'n/a')} known to the model: the object's first token in its top "
             f"{v.get('known_top_k', 'n/a')}). Trials: " + ", ".join(f"{k} {n}" for k, n in (v.get("trials") or {}).items())
             + ".", ""]
    c = costs(run)
    if c:
        lines += [f"Cost: {c}", ""]
    for kind, r in rel.items():
        lines += [f"Tracing ({kind}: the max over positions of the fraction restored, {tr.get('corruption')} from the "
                  f"{tr.get('noise_from')} tokens, position 0 {'clean' if tr.get('clean_pos0') else 'noised'}): "
                  f"split-half reliability r = {_f(r.get('r'))}, Spearman-Brown {_f(r.get('spearman_brown'))} over "
                  f"{r.get('n_facts')} facts: the ceiling against which tracing's R² is read.", ""]
    lines += ["### R² of the rewrite score, and the verdict", "", *_r2_rows(v), ""]
    lines += _verdict_lines(v) + [""]
    summary = overall(v)
    if summary:
        lines += ["In plain words: " + summary, ""]
    if not v.get("paraphrases"):
        lines += ["No paraphrase score: the facts carry no paraphrase prompts (known_1000 has none), so "
                  "generalisation is not measured.", ""]
    dest = fig_root / ("hase-" + "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-"))
    names = FIGURES + sorted(p.name for p in report.glob("scatter_*.png"))
    for fig in names:
        src = report / fig
        if not src.is_file():
            continue
        if copy:
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest / fig)
        lines += [f"![{fig.rsplit('.', 1)[0].replace('_', ' ')}]({(dest / fig).relative_to(out.parent).as_posix()})", ""]
    return lines
