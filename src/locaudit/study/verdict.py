"""The verdict: the plain-language headline and one line per finding, from the comparisons (docs/verdict.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from locaudit.study import stats as S
from locaudit.study.comparisons import Comparison
from locaudit.study.design import draws_to_join, finite_or_none, equivalence_needs
from locaudit.study.frames import METHOD_LABEL, METHODS, SELECTION_LABEL, metric_label, primary_metric
from locaudit.study.spec import VerdictSpec


# ---------------------------------------------------------------------------------------------- verdict
@dataclass
class Verdict:
    """The plain-language answer and the numbers behind it."""

    headline: str
    lines: list[str] = field(default_factory=list)
    table: list[dict] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    outcome: str | None = None

    def text(self) -> str:
        return "\n".join([self.headline, *[f"- {x}" for x in self.lines],
                          *([f"(missing: {', '.join(self.missing)})"] if self.missing else [])])


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _fmt(x: Any, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    out = f"{x:.{nd}f}"
    return out[1:] if out.startswith("-") and float(out) == 0 else out  # float noise prints 0.000, never -0.000


def _p(x: Any) -> str:
    if x is None or not isinstance(x, (int, float)) or not math.isfinite(x):
        return "n/a"
    return f"{x:.2g}"


def _pct(x: Any) -> str:
    x = finite_or_none(x)
    return "n/a" if x is None else f"{x + 0.0 if round(x * 100) else 0.0:.0%}"


def decide_hint(row: Comparison | dict, cfg: VerdictSpec, floors: list[float] | None = None, index: int = 0) -> str:
    """What would decide an inconclusive comparison: draws for the rank test to enter its family and reach
    its threshold, what the hierarchical test of the difference lacks, and draws / questions for equivalence
    at the observed spread (a design figure for a true difference 0, not power computed from the observed
    effect). `floors`: the headline family's rank-test floors, `index`: this row's place in it."""
    row = row if isinstance(row, Comparison) else Comparison.from_row(row)
    n = int(row.n_random)
    floors = list(floors) if floors else [S.rank_floor(n)]
    member = S.discrete_family(floors, cfg.alpha, cfg.multiplicity)
    parts = []
    if not member[index]:
        need = draws_to_join(floors, index, cfg.alpha, cfg.multiplicity)
        f2 = list(floors)
        f2[index] = S.rank_floor(need)
        m = int(S.discrete_family(f2, cfg.alpha, cfg.multiplicity).sum())
        parts.append(f"the rank test cannot go below {_p(S.rank_floor(n))} with {n} draws; it needs at least {need} "
                     f"draws to reach {_p(cfg.alpha / m)} ({cfg.multiplicity + ', ' if m > 1 else ''}family of {m})")
    sd0, seq0 = finite_or_none(row.random_sd), finite_or_none(row.se_questions)
    if member[index] and sd0:  # the design's power (not the observed effect's): the candidate's own noise included
        thr = cfg.alpha / max(1, int(member.sum()))
        ratio = (seq0 or 0.0) / sd0
        shift = S.detectable_shift(n, thr, cfg.power, ratio)
        if math.isfinite(shift):
            parts.append(f"with {n} draws the rank test detects a candidate {shift:.1f} sd of the draws above them "
                         f"({shift * sd0:.3g}) with {cfg.power:.0%} power, its own question noise ({ratio:.2f} sd) "
                         "included")
    p_mean, p_rank = finite_or_none(row.p_mean), finite_or_none(row.p_rank)
    if p_mean is not None and p_mean > cfg.alpha and p_rank is not None and p_rank <= cfg.alpha:
        parts.append(f"the candidate ranks high, but the hierarchical test of the difference does not reject (p = "
                     f"{_p(p_mean)}; standard error {_fmt(row.se_diff)}: locations {_fmt(row.se_locations)}, "
                     f"questions {_fmt(row.se_questions)}): more test questions or draws shrink it")
    mabs = finite_or_none(row.margin_abs)
    sd, se_q = finite_or_none(row.random_sd), finite_or_none(row.se_questions)
    if mabs and sd is not None:
        need = equivalence_needs(sd, int(row.n_random), se_q or 0.0, finite_or_none(row.n_questions), mabs,
                                 cfg.alpha, cfg.power)
        parts.append(f"for equivalence within ±{cfg.margin:.0%} of full alignment's gain (if truly equal; observed "
                     f"spread sd {sd:.3g}, question SE {(se_q or 0.0) if (se_q or 0) > 1e-12 else 0:.3g}): {need['text']}")
    return "; ".join(parts) if parts else "more draws and questions"


def _no_signal_cause(r: Comparison, cfg: VerdictSpec, label: str) -> str:
    """Why a comparison has no signal, in words: the metric is constant, or full alignment gained nothing
    measurable (with its numbers), or full alignment / unedited results are missing."""
    if r.constant:
        return (f"{label} takes the same value ({_fmt(r.candidate_mean)}) at every location edited and in the unedited "
                "model: it does not vary")
    if r.full_alignment is None or r.unedited is None:
        return f"{label} cannot be put on full alignment's scale: full alignment or unedited results are missing"
    return (f"full alignment (the edit at all heads) shows no measurable gain over the unedited model on {label} "
            f"({_fmt(r.full_alignment)} vs {_fmt(r.unedited)}; one-sided {1 - cfg.alpha:.0%} lower bound of the gain "
            f"{_fmt(r.gain_lcb)}), so no location can be measured against it")


def _method_lines(r: Comparison, method: str, cfg: VerdictSpec, label: str, K: str, mult: str, floors: list[float],
                  order: list[str]) -> list[str]:
    """The verdict's lines for one method's headline comparison `r`: its outcome with the numbers behind it,
    and its standing against full alignment."""
    lines: list[str] = []
    oc = r.outcome
    M = _cap(METHOD_LABEL[method])
    qn = str(r.question_noise).startswith(("paired", "per-trial"))
    stat = (f"{label} {_fmt(r.candidate_mean)} at the {K} heads vs {_fmt(r.random_mean)} ± "
            f"{_fmt(r.random_sd)} over {int(r.n_random)} random draws (percentile {r.percentile:.0f}; "
            f"rank p = {_p(r.p_rank)}, floor {_p(r.p_floor)}; hierarchical t-test of the difference p = "
            f"{_p(r.p_mean)}; combined p = {_p(r.p_combined)}, {mult}-adjusted "
            f"{_p(r.p_combined_adj) if r.in_family else 'n/a: cannot reach ' + _p(cfg.alpha) + ' in this family'}; "
            f"difference {_fmt(r.diff)}, {cfg.level:.0%} t-interval [{_fmt(r.ci_low)}, {_fmt(r.ci_high)}]"
            f"{'' if qn else '; question noise not included: no per-question scores or standard errors'}"
            f"{'; the interval omits training noise (one training seed)' if str(r.training_noise).startswith('omitted') else ''}"
            f"{'; ranks first in ' + _pct(r.rank_stability) + ' of question resamples' if finite_or_none(r.rank_stability) is not None else ''})")
    eq = ""
    if r.gain_measurable:
        eq = (f"; as a fraction of full alignment's gain the difference is {_pct(r.diff_gain_fraction)}, "
              f"TOST {1 - 2 * cfg.alpha:.0%} bounds [{_pct(r.tost_low)}, {_pct(r.tost_high)}] vs "
              f"margin ±{cfg.margin:.0%} (p = {_p(r.tost_p)}, adjusted {_p(r.tost_p_adj)})")
    if oc == "no signal":
        lines.append(f"{M}: no signal: {_no_signal_cause(r, cfg, label)}, so this comparison cannot speak to "
                     "localization.")
    elif oc == "evidence for":
        lines.append(f"{M}: evidence for localization: the {K} heads beat random locations by both the rank test "
                     f"and the hierarchical test of the difference: {stat}{eq}.")
    elif oc == "suggestive":
        lines.append(f"{M}: suggestive, not evidence: the {K} heads pass both tests, but only at the design's floor "
                     f"p = {_p(r.p_floor)} (one more draw at least as good would undo it; at least "
                     f"{math.ceil(2 / cfg.alpha - 1 - 1e-9)} draws can say more): {stat}{eq}.")
    elif oc == "evidence against":
        lines.append(f"{M}: evidence against localization: the {K} heads and random locations are equivalent "
                     f"within ±{cfg.margin:.0%} of full alignment's gain: {stat}{eq}.")
    else:
        why = ("" if r.gain_measurable is not None else
               " Equivalence cannot be tested without full alignment and unedited results.")
        lines.append(f"{M}: inconclusive: {stat}{eq}.{why} To decide: {decide_hint(r, cfg, floors, order.index(method))}.")
    if r.gain_measurable and math.isfinite(r.candidate_gain_fraction):
        lines.append(f"{M}: full alignment (the optimal edit at all heads) reaches {label} {_fmt(r.full_alignment)} (unedited "
                     f"{_fmt(r.unedited)}); the {K} heads achieve {_pct(r.candidate_gain_fraction)} of its "
                     f"gain, random draws a median {_pct(r.random_median_gain_fraction)}.")
    return lines


def _family_text(fam_n: int, primary: str, cfg: VerdictSpec, mult: str, note: str | None) -> str:
    """The headline family in words (the headline states it)."""
    rule = "discrete restriction: tests that can never reach the level are left out" + (
        " (Tarone)" if cfg.multiplicity != "bh" else " (floor above alpha, after Gilbert)")
    fam = (f"{mult} over {fam_n} test(s) on {primary}, one per edit method, at {_p(cfg.alpha)}; {rule}" if fam_n else
           f"no test on {primary} here has enough draws to reach {_p(cfg.alpha)}")
    return fam + (f"; {note}" if note else "")


def _headline(outcomes: dict, head: pd.DataFrame, table: list[dict], cfg: VerdictSpec, K: str, label: str,
              floors: list[float], order: list[str]) -> str:
    """The headline from the optimal edit's outcome (the paper's central comparison), ITI as the contrast."""
    opt, iti = outcomes.get("optimal"), outcomes.get("iti")
    if opt is None:
        headline = ("Verdict pending: the optimal-edit comparison (top-K vs random draws) is not finished, and it is "
                    "the one that can show whether editing gives evidence for localization.")
        if iti in ("evidence for", "suggestive"):
            headline += " So far only the heuristic ITI edit makes the candidate heads look special."
    elif opt == "evidence for":
        headline = (f"Edit-based evidence for localization: yes. Under the optimal edit the {K} heads beat random "
                    f"locations on {label}.")
        if any(r.get("n_single_matching_full") for r in table if r.get("method") == "optimal"):
            headline += " But single heads match full alignment, so no location is unique."
    elif opt == "suggestive":
        r = Comparison.from_row(head[head["method"] == "optimal"].iloc[0].to_dict())
        headline = (f"Edit-based evidence for localization: suggestive only. Under the optimal edit the {K} heads beat "
                    f"all {int(r.n_random)} random draws on {label} and the hierarchical test of the difference "
                    f"agrees, but only at the design's floor p = {_p(r.p_floor)}: one more draw at least as good "
                    f"would undo it. At least {math.ceil(2 / cfg.alpha - 1 - 1e-9)} draws can give evidence.")
        if any(r.get("n_single_matching_full") for r in table if r.get("method") == "optimal"):
            headline += " Single heads match full alignment, so no location would be unique."
    elif opt == "evidence against":
        headline = (f"Edit-based evidence for localization: none. Under the optimal edit, random heads are as "
                    f"effective as the {K} heads on {label} (equivalent within ±{cfg.margin:.0%} of full "
                    "alignment's gain)")
        headline += (", although the heuristic ITI edit made the candidate look special: that contrast is an artefact of "
                     "the sub-optimal edit, as in Wang & Veitch (2025)." if iti in ("evidence for", "suggestive") else ".")
    elif opt == "no signal":
        r = Comparison.from_row(head[head["method"] == "optimal"].iloc[0].to_dict())
        headline = (f"Edit-based evidence for localization: no signal. Under the optimal edit, "
                    f"{_no_signal_cause(r, cfg, label)}, so the comparison cannot speak to localization.")
    else:
        r = Comparison.from_row(head[head["method"] == "optimal"].iloc[0].to_dict())
        headline = (f"Edit-based evidence for localization: inconclusive. Under the optimal edit the {K} heads are "
                    f"neither shown better than random locations on {label} nor equivalent to them. To decide: "
                    f"{decide_hint(r, cfg, floors, order.index('optimal'))}.")
    return headline


def verdict(df: pd.DataFrame, comp: pd.DataFrame, singles: pd.DataFrame, config: VerdictSpec | dict | None = None,
            top_k: int | None = None, flags: list[dict] | None = None, selection: dict | None = None,
            family_note: str | None = None) -> Verdict:
    """The headline (from the optimal edit, the paper's central comparison) and one line per finding.
    `family_note`: how this candidate's family sits among several localizers (candidates.side_by_side)."""
    cfg = config if isinstance(config, VerdictSpec) else VerdictSpec.model_validate(config or {})
    primary = primary_metric(df, cfg.primary_metric) if not df.empty else None
    if primary is None:
        return Verdict("No evaluated trials yet: nothing to conclude.", missing=["every evaluation"])
    label = metric_label(primary)
    K = f"top-{top_k}" if top_k else "top-K"
    lines, table, missing = [], [], []
    outcomes: dict[str, str | None] = {}
    head = comp[(comp["scope"] == "selected") & (comp["metric"] == primary)] if not comp.empty else comp
    fam_n = int(head["in_family"].sum()) if not head.empty else 0
    order = head["method"].tolist() if not head.empty else []
    floors = head["p_floor"].astype(float).tolist() if not head.empty else []
    mult = {"holm": "Holm", "bh": "Benjamini-Hochberg", "none": "no"}[cfg.multiplicity]
    for method in METHODS:
        r = head[head["method"] == method] if not head.empty else head
        if r is None or r.empty:
            outcomes[method] = None
            if not df[df["kind"] == method].empty or method == "optimal":
                missing.append(f"{METHOD_LABEL[method]}: top-K and random-draw results")
            continue
        r = Comparison.from_row(r.iloc[0].to_dict())
        oc = r.outcome
        outcomes[method] = oc
        lines += _method_lines(r, method, cfg, label, K, mult, floors, order)
        table.append(r.columns())
    if selection:
        for method, mode in selection.items():
            lines.append(f"{_cap(METHOD_LABEL[method])}: grid points {SELECTION_LABEL.get(mode, mode)}; the "
                         "'best on test' view (comparisons.csv, scope best_on_test) is optimistic.")
    family = _family_text(fam_n, primary, cfg, mult, family_note)
    if fam_n or not head.empty:
        lines.append(f"Multiplicity: {family}; each test there is an intersection-union test (rank test and "
                     "hierarchical t-test, both at that level: no correction for the pair); the equivalence tests of "
                     "the same rows form a parallel family; single heads and secondary metrics are separate families.")
    _singles_lines(singles, cfg, label, lines, table)
    for f in flags or []:
        lines.append(f"Flag: {METHOD_LABEL.get(f['method'], f['method'])} random draw {f['localizer']} {f['issue']} "
                     f"({f['heads']}).")
    opt = outcomes.get("optimal")
    headline = _headline(outcomes, head, table, cfg, K, label, floors, order)
    if opt is not None:
        headline += f" (Family: {family}.)"
    return Verdict(headline, lines, table, missing, opt)


def _singles_lines(singles: pd.DataFrame, cfg: VerdictSpec, label: str, lines: list[str], table: list[dict]) -> None:
    if singles is None or singles.empty:
        return
    for method, g in singles.groupby("method", sort=False):
        n = len(g)
        M = _cap(METHOD_LABEL[method])
        top = g.iloc[0]
        name = top["head"] or top["localizer"]
        for row in table:
            if row.get("method") == method:
                row.update(n_single=n, n_single_matching_full=None)
        if not g["gain_measurable"].any():
            why = ("no full-alignment or unedited result to compare" if top["full_alignment"] is None
                   or top["unedited"] is None else "full alignment shows no measurable gain to compare with")
            lines.append(f"{M}: {n} single heads; best {name} with {label} {_fmt(top['value'])} ({why}).")
            continue
        if g["matches_full"].isna().all():
            lines.append(f"{M}: {n} single heads; best {name} reaches {_pct(top['gain_fraction'])} of full alignment's "
                         "gain (no per-question scores or SEs: no confidence bound, so no match is declared).")
            continue
        match = g[g["matches_full"] == True]  # noqa: E712
        ranks = match["probe_rank"].dropna().astype(int).tolist()
        lines.append(f"{M}: {len(match)} of {n} single heads match full alignment (lower {1 - cfg.alpha:.0%} bound of "
                     f"the gain fraction above {1 - cfg.margin:.0%}, {cfg.multiplicity}-corrected over the {n} heads); "
                     f"best {name}: {_pct(top['gain_fraction'])} (lower bound {_pct(top['gain_fraction_lcb'])})"
                     + (f"; their probe-accuracy ranks: {', '.join(map(str, ranks))}" if ranks else "") + ".")
        for row in table:
            if row.get("method") == method:
                row.update(n_single=n, n_single_matching_full=len(match))
