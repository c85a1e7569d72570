"""The report's matched-KL section and learning-curves figure, from a run's dose curves (study/steps/dose.py).

`dose_section` reads every finished optimal trial's dose.json at its location's chosen grid point, builds the
dose curves on the primary metric (per question where the evaluation wrote per-question scores: the gain of a
question is its score minus the unedited model's), runs study/matched_kl.py at the KL budget and draws the gain
vs KL figure (study/figures_dose.py). Without any dose curve it returns None and the report is unchanged.
`training_section` draws the validation curves of edits trained with early stopping and tells how each edit's
training ended: a plateau or the step cap (study/figures_training.py).
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from locaudit.study.frames import candidates, for_candidate, grid_label, higher_is_better, load_per_question
from locaudit.study.matched_kl import DoseCurve, choose_budget, matched_kl, summary_line

NOTE = ("Each optimal edit's training path (optimal.dose_steps) is scored: the primary metric and the KL on generic "
        "text at each snapshot and at the trained edit, from the unedited model at (0, 0). A location's gain at the KL "
        "budget is interpolated (linear in sqrt(KL)) on the first segment of its path that reaches the budget (a path that never "
        "does keeps its last gain: reached = False); per-question gains interpolate with the same weights. Intervals: "
        "t-intervals with the paired question bootstrap's standard error (questions resampled jointly for every "
        "edit). The candidate vs the random draws at the budget: the rank test and the hierarchical t-test of the "
        "difference, both at alpha (p_combined = max), 'suggestive' at the design's floor; 'evidence against' is a "
        "t TOST within +-margin of full alignment's gain at the same budget. A secondary comparison, outside the "
        "headline family (docs/verdict.md, 'Matched collateral damage').")


@dataclass
class DoseSection:
    result: dict
    line: str | None
    table: pd.DataFrame
    figures: dict[str, Path] = field(default_factory=dict)

    def html(self, table: Callable[[pd.DataFrame], str]) -> str:
        """The section, with the report's table renderer."""
        r = self.result
        # the decision columns only (the line above names the budget's source; matched_kl.csv and verdict.json
        # hold the rest), so the table fits a narrow page
        head = {k: r.get(k) for k in ("outcome", "budget", "candidate_gain", "random_mean_gain", "diff", "ci_low",
                                      "ci_high", "p_rank", "p_floor", "p_mean", "tost_p")}
        return ("<h2>Matched collateral damage</h2>" + (f"<p>{html.escape(self.line)}</p>" if self.line else "")
                + "<p class='muted'>" + html.escape(NOTE) + "</p>" + table(pd.DataFrame([head]))
                + "<details><summary>Every location at the KL budget</summary>" + table(self.table) + "</details>")


def _chosen_trials(res: pd.DataFrame, selected: pd.DataFrame) -> set[str]:
    """Keys of the optimal trials at each location's chosen grid point(s) (every trial where nothing was chosen)."""
    opt = res[res["kind"] == "optimal"]
    if opt.empty:
        return set()
    sel = {}
    if not selected.empty and {"method", "localizer", "grid"} <= set(selected.columns):
        s = selected[selected["method"] == "optimal"]
        sel = dict(zip(s["localizer"], s["grid"]))
    labels = opt.apply(grid_label, axis=1)
    # cross-fit chooses a point per half of the questions ("A | B"): the trials of both are averaged, as seeds
    keep = [k for k, loc, g in zip(opt["key"], opt["localizer"], labels)
            if not sel.get(loc) or g in str(sel[loc]).split(" | ")]
    return set(keep)


def _curves(run_dir: Path, rows: list[dict], chosen: set[str], res: pd.DataFrame, metric: str
            ) -> list[DoseCurve]:
    by_key = {r["key"]: r for r in rows}
    base = [r for r in rows if r.get("kind") == "baseline" and r.get("status") == "done"]
    if not base or metric not in (base[0].get("metrics") or {}):
        return []
    sgn = 1.0 if higher_is_better(metric) else -1.0
    raw = []  # (name, group, steps, kl [m], aggregate [m], per-question dicts [m])
    info = res.set_index("key")
    for key in sorted(chosen):
        r = by_key.get(key)
        dose = ((r or {}).get("artifacts") or {}).get("dose")
        if not dose:
            continue
        try:
            d = json.loads((run_dir / dose).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        pts = [p for p in d["points"] if metric in p["metrics"] and "kl" in p["metrics"]]
        if not pts:
            continue
        pq = load_per_question(run_dir, [{"key": i, "status": "done", "artifacts": {"eval": p["eval"]}}
                                         for i, p in enumerate(pts)])
        raw.append((str(info.loc[key, "localizer"]), str(info.loc[key, "group"]), [p["step"] for p in pts],
                    [p["metrics"]["kl"] for p in pts], [p["metrics"][metric] for p in pts],
                    [pq.get(i, {}).get(metric) for i in range(len(pts))]))
    if not raw:
        return []
    b = base[0]
    b_q = load_per_question(run_dir, [b]).get(b["key"], {}).get(metric)
    qids = set(b_q or {})
    for *_, per in raw:
        for m in per:
            qids &= set(m or {})
    qids = sorted(qids)
    out = []
    for name, group, steps, kl, agg, per in raw:
        if qids:
            gain = np.array([[sgn * (m[q] - b_q[q]) for q in qids] for m in per])
        else:
            gain = np.array([sgn * (v - b["metrics"][metric]) for v in agg])
        out.append(DoseCurve(name, group, kl, gain, steps))
    return out


def dose_section(run_dir: str | Path, rows: list[dict], res: pd.DataFrame, selected: pd.DataFrame,
                 metric: str | None, cfg, out: Path, n_resamples: int = 1999) -> DoseSection | None:
    """The matched-KL comparison of a run (None without dose curves); writes out/dose_kl.png."""
    from locaudit.study.figures_dose import gain_vs_kl

    if metric is None or res.empty:
        return None
    cands = candidates(res)
    if len(cands) > 1:  # the headline candidate (the probe first), as the verdict
        res = for_candidate(res, cands[0])
    curves = _curves(Path(run_dir), rows, _chosen_trials(res, selected), res, metric)
    if not curves:
        return None
    budget, source = choose_budget(curves, cfg.kl_budget, cfg.kl_budget_fraction)
    r = matched_kl(curves, budget, cfg.alpha, cfg.margin, cfg.level, min(n_resamples, 1999))
    r.update(budget_source=source, metric=metric)
    figs = {}
    p = gain_vs_kl(curves, r, metric, out / "dose_kl.png")
    if p is not None:
        figs["dose_kl"] = p
    return DoseSection(r, summary_line(r, metric), pd.DataFrame(r["locations"]), figs)


@dataclass
class TrainingSection:
    """The learning curves of the edits trained with early stopping, and how their training ended."""

    figure: Path | None
    per_edit: pd.DataFrame
    per_group: pd.DataFrame
    line: str | None

    def html(self, table: Callable[[pd.DataFrame], str]) -> str:
        return ("<h2>How the optimal edits' training ended</h2>" + (f"<p>{html.escape(self.line)}</p>" if self.line else "")
                + table(self.per_group) + "<details><summary>Every edit</summary>" + table(self.per_edit) + "</details>")


def training_section(run_dir: str | Path, rows: list[dict], out: Path) -> TrainingSection | None:
    """The validation curves (out/learning_curves.png) and the training-status tables of the edits trained with
    early stopping (None where no edit was)."""
    from locaudit.study.figures_training import learning_curves, read_curves, status_line, training_status

    curves = [c for c in read_curves(Path(run_dir), rows) if c[2].get("evals")]
    if not curves:
        return None
    per_edit, per_group = training_status(curves)
    return TrainingSection(learning_curves(curves, out / "learning_curves.png"), per_edit, per_group,
                           status_line(per_group))


CAPTIONS = {
    "dose_kl": "Matched collateral damage: each optimal edit's gain on the primary metric vs its KL on generic text "
               "along training (from the unedited model at 0); dashed: the KL budget, dots: each location's gain there.",
    "learning_curves": "Validation loss of each optimal edit during training (early stopping); dot: the state kept.",
}


def insert_section(page: str, section: str, anchors: tuple[str, ...] = ("<h2>Single heads", "<h2>Compute</h2>",
                                                                           "</body>")) -> str:
    """`page` with `section` before the first of `anchors` it has (at the end otherwise)."""
    for a in anchors:
        i = page.find(a)
        if i >= 0:
            return page[:i] + section + page[i:]
    return page + section
