"""Matched collateral damage: locations compared at equal KL on generic text (docs/verdict.md, "Matched
collateral damage").

An optimal edit's dose curve (optimal.dose_steps) is its training path: the unedited model (KL 0, gain 0), the
states after a few optimizer steps, and the trained edit. Each point has a KL on generic text and a gain on the
behaviour metric (the metric minus the unedited model's, per question where per-question scores exist). A
location's **gain at the KL budget** is read off its path on the first segment that reaches the budget, by
interpolation linear in sqrt(KL) (`gain_at_kl`); a path that never reaches it keeps its last point's gain (it
stays within the budget) and is flagged `reached = False`. The interpolation weights depend on KL only, so the
per-question gains interpolate with the same weights and the paired question bootstrap carries over.

The candidate (top-K) against the random draws at the budget, with the verdict's own tests (study/stats.py):
the rank test (`empirical_p`, floor 1 / (n + 1)) AND the hierarchical t-test of the difference (locations'
spread plus the paired question bootstrap's variance, Satterthwaite df); "evidence for" needs both
(p_combined = max), "suggestive" when one more draw at least as good would undo it; "evidence against" is a
t TOST of the difference within +-margin of full alignment's gain at the same budget. A location can no longer
win by doing more damage: two paths along the same gain-vs-KL curve give the same gain at the budget, however
far each one goes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import stats as sps

from locaudit.study import stats as S


@dataclass
class DoseCurve:
    """One location's training path. kl [m] in step order; gain [m, Q] per question (Q = 1: aggregate only)."""

    name: str
    group: str  # top, random, single, all
    kl: np.ndarray
    gain: np.ndarray
    steps: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.kl = np.asarray(self.kl, dtype=float).reshape(-1)
        g = np.asarray(self.gain, dtype=float)
        self.gain = g.reshape(-1, 1) if g.ndim == 1 else g
        if self.gain.shape[0] != self.kl.size:
            raise ValueError(f"dose curve {self.name}: {self.kl.size} KL values for {self.gain.shape[0]} gains")

    @property
    def max_kl(self) -> float:
        return float(np.nanmax(self.kl)) if self.kl.size else 0.0

    @property
    def final_kl(self) -> float:
        return float(self.kl[-1]) if self.kl.size else 0.0


def gain_at_kl(kl: np.ndarray, gain: np.ndarray, budget: float) -> tuple[np.ndarray, bool]:
    """The gain [Q] where the path (0, 0) -> (kl[0], gain[0]) -> ... first reaches KL `budget`, interpolated
    within that segment linearly in sqrt(KL); (the last point's gain, False) if it never does.

    Why sqrt: for a small edit scaled by s, KL grows as s^2 and the gain as s, so the gain is linear in sqrt(KL)
    (exact for a scaled edit). Linear in KL itself, a concave path's chord lies below it, the more so the farther
    apart its points: a location whose points happen to lie closer to the budget would gain by it."""
    kl = np.concatenate([[0.0], np.asarray(kl, dtype=float).reshape(-1)])
    g = np.asarray(gain, dtype=float).reshape(kl.size - 1, -1)  # [points, Q]
    g = np.concatenate([np.zeros((1, g.shape[1])), g])
    hit = np.flatnonzero(kl[1:] >= budget)
    if hit.size == 0:
        return g[-1].copy(), False
    i = int(hit[0])  # segment (i, i + 1); kl[i] < budget <= kl[i + 1]
    r = np.sqrt(np.maximum(kl, 0.0))
    w = (math.sqrt(budget) - r[i]) / (r[i + 1] - r[i])
    return g[i] + w * (g[i + 1] - g[i]), True


def choose_budget(curves: list[DoseCurve], kl_budget: float | None, fraction: float) -> tuple[float, str]:
    """The KL budget and where it comes from: the spec's value, else `fraction` of full alignment's final KL,
    else of the random draws' median final KL (never a candidate's own)."""
    if kl_budget is not None:
        return float(kl_budget), "verdict.kl_budget"
    full = [c.final_kl for c in curves if c.group == "all"]
    if full and full[0] > 0:
        return fraction * full[0], f"{fraction:g} x full alignment's KL ({full[0]:.4g})"
    rand = [c.final_kl for c in curves if c.group == "random"]
    if rand and float(np.median(rand)) > 0:
        med = float(np.median(rand))
        return fraction * med, f"{fraction:g} x the random draws' median KL ({med:.4g})"
    return float("nan"), "no KL to set a budget by"


def _t_interval(est: float, boot: np.ndarray, n_q: int, level: float) -> tuple[float, float, float]:
    """(se, low, high): the paired bootstrap's standard error (unbiased by n / (n - 1)) with a t of n - 1 df."""
    if boot.size < 2 or n_q < 2:
        return float("nan"), float("nan"), float("nan")
    se = float(np.std(boot, ddof=1)) * math.sqrt(n_q / (n_q - 1))
    h = float(sps.t.ppf((1 + level) / 2, n_q - 1)) * se
    return se, est - h, est + h


def matched_kl(curves: list[DoseCurve], budget: float, alpha: float = 0.05, margin: float = 0.10, level: float = 0.95,
               n_resamples: int = 1999, seed: int = 0) -> dict:
    """Every location's gain at KL `budget` with its interval, and the candidate (group top) vs the random draws
    there (see the module docstring). Curves share their questions (gain columns in the same order) or all have
    Q = 1 (aggregate only: the intervals then cover locations only)."""
    out: dict = {"budget": float(budget), "locations": [], "outcome": None}
    if not curves or not math.isfinite(budget) or budget <= 0:
        out["outcome"] = "no signal"
        out["reason"] = "no KL budget"
        return out
    Q = {c.gain.shape[1] for c in curves}
    if len(Q) != 1:
        raise ValueError(f"dose curves with different numbers of questions: {sorted(Q)}")
    n_q = Q.pop()
    at = [gain_at_kl(c.kl, c.gain, budget) for c in curves]
    # several curves of one location (training seeds): their gains at the budget averaged, per question
    names = list(dict.fromkeys(c.name for c in curves))
    members = {n: [i for i, c in enumerate(curves) if c.name == n] for n in names}
    G = np.stack([np.mean([at[i][0] for i in members[n]], axis=0) for n in names])  # [locations, Q]
    reached = [all(at[i][1] for i in members[n]) for n in names]
    first = [curves[members[n][0]] for n in names]
    paired = n_q > 1
    rng = np.random.default_rng(seed)
    W = S.bootstrap_weights(n_q, n_resamples if paired else 0, rng)  # [B + 1, Q]; row 0 = the data as observed
    Gb = G @ W.T  # [locations, B + 1]
    for i, n in enumerate(names):
        ms = [curves[j] for j in members[n]]
        se, lo, hi = _t_interval(float(Gb[i, 0]), Gb[i, 1:], n_q, level) if paired else (float("nan"),) * 3
        out["locations"].append({"localizer": n, "group": ms[0].group, "gain": float(Gb[i, 0]), "se": se,
                                 "ci_low": lo, "ci_high": hi, "reached": bool(reached[i]), "n_curves": len(ms),
                                 "max_kl": max(c.max_kl for c in ms), "final_kl": float(np.mean([c.final_kl for c in ms])),
                                 "final_gain": float(np.mean([c.gain[-1].mean() for c in ms]))})
    groups = [c.group for c in first]
    top = [i for i, g in enumerate(groups) if g == "top"]
    rand = [i for i, g in enumerate(groups) if g == "random"]
    full = [i for i, g in enumerate(groups) if g == "all"]
    out.update(n_random=len(rand), n_questions=n_q if paired else None,
               question_noise="paired question bootstrap" if paired else "none (aggregate scores only)")
    if not top or not rand:
        out["outcome"] = None
        out["reason"] = "no candidate or no random draws with dose curves"
        return out
    c, rv = Gb[top[0]], Gb[rand]  # [B + 1], [n, B + 1]
    n = len(rand)
    d = c - rv.mean(axis=0)
    var_q = float(np.var(d[1:], ddof=1)) * n_q / (n_q - 1) if paired and d.size > 2 else 0.0
    ht = S.hierarchical_t(float(d[0]), rv[:, 0], var_q, n_q if paired else None, None, "greater", level)
    p_rank = S.empirical_p(float(c[0]), rv[:, 0], "greater")
    p_comb = max(p_rank, ht["p"]) if math.isfinite(ht["p"]) else float("nan")
    fragile = bool(math.isfinite(p_comb) and max(min(1.0, p_rank + 1.0 / (n + 1)), ht["p"]) > alpha)
    out.update(candidate=names[top[0]], candidate_gain=float(c[0]), random_mean_gain=float(rv[:, 0].mean()),
               random_sd_gain=float(rv[:, 0].std(ddof=1)) if n > 1 else float("nan"), diff=float(d[0]),
               ci_low=ht["ci_low"], ci_high=ht["ci_high"], se_diff=ht["se"], df=ht["df"], p_rank=p_rank,
               p_floor=S.rank_floor(n), p_mean=ht["p"], p_combined=p_comb, floor_fragile=fragile,
               candidate_reached=bool(reached[top[0]]), random_reached=int(sum(reached[i] for i in rand)))
    gain_full = lcb_full = float("nan")
    if full:
        gain_full = float(Gb[full[0], 0])
        lcb_full = float(np.quantile(Gb[full[0], 1:], alpha)) if paired else gain_full
        out.update(full_gain=gain_full, full_gain_lcb=lcb_full)
    measurable = not full or (gain_full > 1e-12 and lcb_full > 0)
    tost_p = float("nan")
    if full and measurable and math.isfinite(ht["se"]):
        tost_p = S.t_tost(float(d[0]), ht["se"], ht["df"], -margin * gain_full, margin * gain_full, alpha)["p"]
    out["tost_p"] = tost_p
    if not measurable:
        out["outcome"] = "no signal"
    elif math.isfinite(p_comb) and p_comb <= alpha and d[0] > 0:
        out["outcome"] = "suggestive" if fragile else "evidence for"
    elif math.isfinite(tost_p) and tost_p <= alpha:
        out["outcome"] = "evidence against"
    else:
        out["outcome"] = "inconclusive"
    return out


def summary_line(res: dict, metric: str) -> str | None:
    """One verdict line for the matched-KL comparison (None when there is nothing to say)."""
    if not res or res.get("outcome") is None or "diff" not in res:
        return None
    f = lambda x: "nan" if x is None or not math.isfinite(x) else f"{x:.3g}"  # noqa: E731
    return (f"Matched collateral damage (secondary, outside the headline family): at KL {f(res['budget'])} on "
            f"generic text ({res.get('budget_source', '')}), the candidate's {metric} gain {f(res['candidate_gain'])} "
            f"vs the random draws' mean {f(res['random_mean_gain'])} (difference {f(res['diff'])}, "
            f"{f(res['ci_low'])} to {f(res['ci_high'])}; rank p {f(res['p_rank'])}, floor {f(res['p_floor'])}; "
            f"t-test p {f(res['p_mean'])}): {res['outcome']}."
            + ("" if res.get("candidate_reached", True) and res.get("random_reached") == res.get("n_random") else
               f" Reaching the budget: the candidate {'yes' if res.get('candidate_reached') else 'no'}, "
               f"{res.get('random_reached')} of {res.get('n_random')} draws (the others keep their trained gain)."))
