"""Design checks of a study before (or while) it runs: floors, thresholds, detectable effects,
equivalence power and cost (`locaudit run STUDY --dry-run`, docs/verdict.md).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from locaudit.study import stats as S
from locaudit.study.spec import VerdictSpec


def finite_or_none(x: Any) -> float | None:
    """x as a float, or None when it is missing or not finite (pandas turns None into NaN)."""
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None



def equivalence_needs(sd: float, n: int, se_q: float, n_q: float | None, margin_abs: float, alpha: float,
                      power: float) -> dict:
    """Draws and test questions for TOST to show equivalence of a true difference 0 with `power`, when the
    difference's variance is sd^2 / n (locations) + se_q^2 (questions, shrinking as 1 / questions): more
    draws only, more questions only, or both (each part given half the variance budget)."""
    need = S.se_for_equivalence(margin_abs, alpha, power) ** 2
    loc, q = sd ** 2 / max(n, 1), se_q ** 2
    out: dict[str, Any] = {"se_needed": math.sqrt(need), "se_now": math.sqrt(loc + q)}
    out["draws_only"] = max(2, math.ceil(sd ** 2 / (need - q))) if q < need else None
    out["questions_only"] = math.ceil(n_q * q / (need - loc)) if n_q and loc < need and q > 0 else None
    out["both"] = (max(2, math.ceil(2 * sd ** 2 / need)), math.ceil(2 * n_q * q / need) if n_q and q > 0 else None)
    if loc + q <= need:
        out["text"] = "the design already suffices"
        return out
    opts = []
    if out["draws_only"]:
        opts.append(f"about {out['draws_only']} draws")
    if out["questions_only"]:
        opts.append(f"about {out['questions_only']} test questions")
    d2, q2 = out["both"]
    opts.append(f"about {d2} draws and {q2} test questions" if q2 else f"about {d2} draws")
    out["text"] = " or ".join(dict.fromkeys(opts))
    return out


# ---------------------------------------------------------------------------------------------- design
def design(spec: Any, observed: pd.DataFrame | None = None, n_questions: int | None = None,
           timings: dict[str, float] | None = None, counts: dict[str, int] | None = None,
           unknown_attempts: dict[str, int] | None = None) -> dict:
    """Power and design checks of a study before (or while) it runs: per comparison, the smallest reachable
    p-value, the family's threshold, the effect detectable with the target power, equivalence power, an
    estimated cost per trial kind, and warnings when the design cannot support a verdict. `observed`
    (a comparisons table) replaces the assumed spread where it has numbers. `timings`: mean wall seconds per
    trial by kind; `unknown_attempts`: by kind, how many attempts behind those means ran for an unknown time
    (their cost is then a lower bound, and says so)."""
    cfg: VerdictSpec = spec.verdict
    R = spec.localizers.random
    n_all = len(R.draw_seeds())
    methods = []
    if spec.optimal.enabled and "random" in spec.optimal.localizers and "top" in spec.optimal.localizers:
        methods.append(("optimal", n_all))
    if spec.iti.enabled and "random" in spec.iti.localizers and "top" in spec.iti.localizers:
        methods.append(("iti", min(n_all, R.iti_n) if R.iti_n is not None else n_all))
    floors = [S.rank_floor(n) for _, n in methods]
    member = S.discrete_family(floors, cfg.alpha, cfg.multiplicity) if methods else np.array([], dtype=bool)
    m = max(1, int(member.sum()))
    nq = n_questions
    out: dict[str, Any] = {"alpha": cfg.alpha, "margin": cfg.margin, "multiplicity": cfg.multiplicity,
                           "power": cfg.power, "family_size": int(member.sum()), "n_questions": nq,
                           "comparisons": [], "warnings": [], "cost": {}}
    obs = {}
    if observed is not None and not observed.empty:
        for r in observed[(observed["scope"] == "selected") & (observed["family"] == "headline")].to_dict("records"):
            obs[r["method"]] = r
    for (method, n), f, inc in zip(methods, floors, member):
        thr = cfg.alpha / m
        o = obs.get(method, {})
        g_obs, sd_obs, se_obs = (finite_or_none(o.get(k)) for k in ("gain", "random_sd", "se_questions"))
        gain = g_obs if g_obs and g_obs > 0 and o.get("gain_measurable") is True else cfg.assumed_gain
        sd = sd_obs if sd_obs else cfg.assumed_location_sd * gain
        se_q = se_obs if se_obs else (cfg.assumed_question_sd / math.sqrt(nq) if nq else float("nan"))
        # the candidate's own noise (its question SE in units of the draws' sd) is part of the power
        ratio = se_q / sd if math.isfinite(se_q) and sd > 0 else 0.0
        shift = S.detectable_shift(n, thr, cfg.power, ratio, nq) if inc else float("inf")
        floor_only = bool(inc and thr * (n + 1) < 2 - 1e-9)
        mabs = cfg.margin * gain
        se_eq = math.sqrt(sd ** 2 / max(n, 1) + (se_q if math.isfinite(se_q) else 0.0) ** 2)
        eq_power = S.equivalence_power(mabs, se_eq, cfg.alpha) if n > 1 else 0.0
        # the narrowest margin this design shows equivalence within, with the target power (TOST, true difference 0)
        m_pow = S.margin_for_equivalence(se_eq, cfg.alpha, cfg.power) if n > 1 else None
        c = {"method": method, "n_random": n, "p_floor": f, "in_family": bool(inc), "threshold": thr if inc else None,
             "can_reach_alpha": bool(inc),
             "draws_needed_for_floor": draws_to_join(floors, len(out["comparisons"]), cfg.alpha, cfg.multiplicity),
             "floor_only": floor_only, "draws_beyond_floor": math.ceil(2 / thr - 1 - 1e-9),
             "noise_ratio": ratio, "power_rule": "rank test and hierarchical t-test" if nq else "rank test",
             "detectable_shift_sd": shift, "detectable_effect": shift * sd if math.isfinite(shift) else None,
             "detectable_gain_fraction": shift * sd / gain if math.isfinite(shift) else None,
             "spread": "observed" if sd_obs else "assumed", "random_sd": sd, "gain": gain, "se_questions": se_q,
             "margin_abs": mabs, "equivalence_power": eq_power, "powered_margin": m_pow,
             "powered_margin_fraction": m_pow / gain if m_pow is not None and gain > 0 else None}
        need = equivalence_needs(sd, n, se_q if math.isfinite(se_q) else 0.0, nq, mabs, cfg.alpha, cfg.power)
        c.update(draws_for_equivalence=need["draws_only"], questions_for_equivalence=need["questions_only"],
                 draws_and_questions_for_equivalence=list(need["both"]), equivalence_needs=need["text"])
        out["comparisons"].append(c)
        if not inc:
            out["warnings"].append(
                f"{method}: {n} random draws give a rank p-value floor of {f:.3g}: in a family corrected by "
                f"{cfg.multiplicity} at {cfg.alpha:g} this comparison cannot show evidence for localization (needs >= "
                f"{c['draws_needed_for_floor']} draws).")
        if floor_only:
            out["warnings"].append(
                f"{method}: with {n} draws only the floor p = {f:.3g} passes the threshold {thr:.3g} (alpha x (n + 1) = "
                f"{thr * (n + 1):.2f} < 2): one draw at least as good undoes it, so the best this design can report is "
                f"'suggestive'; use >= {c['draws_beyond_floor']} draws.")
        if eq_power < cfg.power:
            out["warnings"].append(
                f"{method}: equivalence power {eq_power:.0%} < {cfg.power:.0%} at the {c['spread']} "
                f"spread (margin ±{cfg.margin:.0%} of a gain of {gain:.3g}): needs {need['text']}.")
    if not methods:
        out["warnings"].append("no comparison of top-K vs random locations: the study cannot give a verdict.")
    if not (spec.optimal.enabled and spec.localizers.all and "all" in spec.optimal.localizers):
        out["warnings"].append("no full alignment (optimal edit at all heads): equivalence margins and single-head "
                               "matches cannot be assessed.")
    if spec.evaluation.split != "test":
        out["warnings"].append(f"evaluation.split is {spec.evaluation.split!r}: the verdict should be reported on test.")
    for kind, n in (counts or {}).items():
        t = (timings or {}).get(kind)
        out["cost"][kind] = {"trials": n, "mean_wall_s": t, "total_wall_s": t * n if t is not None else None,
                             "unknown_attempts": int((unknown_attempts or {}).get(kind, 0))}
    return out


def draws_to_join(floors: list[float], i: int, alpha: float, method: str = "holm", max_n: int = 100000) -> int:
    """The fewest draws with which comparison i is in its discrete family (others unchanged)."""
    n = S.draws_for_floor(alpha)
    while n < max_n:
        f = list(floors)
        f[i] = S.rank_floor(n)
        if S.discrete_family(f, alpha, method)[i]:
            return n
        n += 1
    return max_n


def design_text(d: dict) -> list[str]:
    """The design checks as lines for the terminal."""
    lines = [f"Design (alpha {d['alpha']:g}, {d['multiplicity']}, family of {d['family_size']} rank test(s), "
             f"margin ±{d['margin']:.0%} of full alignment's gain, {d['n_questions'] or '?'} test questions):"]
    for c in d["comparisons"]:
        det = (f"detects a candidate {c['detectable_shift_sd']:.2f} sd above the draws ({c['detectable_effect']:.3g}, "
               f"{c['detectable_gain_fraction']:.0%} of the gain) with {d['power']:.0%} power ({c['power_rule']}, the "
               f"candidate's own noise {c['noise_ratio']:.2f} sd included)"
               if c["detectable_effect"] is not None else f"cannot reach {d['alpha']:g} (needs "
               f"{c['draws_needed_for_floor']} draws)")
        lines.append(f"  {c['method']}: {c['n_random']} draws, smallest p {c['p_floor']:.3g}"
                     f"{', threshold ' + format(c['threshold'], '.3g') if c['threshold'] else ''}; {det}; "
                     f"equivalence power {c['equivalence_power']:.0%} ({c['spread']} spread: sd {c['random_sd']:.3g}, "
                     f"question SE {c['se_questions']:.3g})"
                     + (f"; {d['power']:.0%} power for equivalence within ±{c['powered_margin']:.3g} "
                        f"({c['powered_margin_fraction']:.0%} of the gain)" if c.get("powered_margin_fraction") else ""))
    for kind, c in d["cost"].items():
        lines.append(f"  cost {kind}: {c['trials']} trials" + (f" x {c['mean_wall_s']:.0f} s = {c['total_wall_s'] / 60:.1f} min"
                                                                if c["mean_wall_s"] is not None else " (not measured yet)")
                     + (f" (at least: {c['unknown_attempts']} earlier attempt(s) of these trials were killed before the "
                        "ledger kept heartbeats, and their time is not in it; `--measure` prices the edits afresh)"
                        if c.get("unknown_attempts") and c["mean_wall_s"] is not None else ""))
    lines += [f"WARNING: {w}" for w in d["warnings"]]
    return lines
