"""Candidate-vs-random comparisons, single heads vs full alignment, draw flags and the corrected
outcome of each comparison: `analyze` runs them all (docs/verdict.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import pandas as pd

from locaudit.study import stats as S
from locaudit.study.frames import (METHODS, by_localizer, best_per_localizer, candidates, for_candidate, grid_label,
                                   higher_is_better, metric_columns, primary_metric)
from locaudit.study.selection import SelectionEngine, SelectionPanel
from locaudit.study.spec import VerdictSpec


# ---------------------------------------------------------------------------------------------- comparisons
def _q(x: np.ndarray, q: float) -> float:
    x = x[np.isfinite(x)]
    return float(np.quantile(x, q)) if x.size else float("nan")


NAN = float("nan")


def _spread_is_noise(vals) -> bool:
    """The values are equal up to float rounding (sd at most 1e-12 of their size): a z-score of them is noise
    divided by noise, so it is left undefined."""
    v = np.asarray(vals, dtype=float)
    v = v[np.isfinite(v)]
    return v.size > 1 and float(v.std(ddof=1)) <= 1e-12 * max(1.0, float(np.abs(v).max()))


@dataclass
class Comparison:
    """One comparison of the selected scope: the candidate against the random draws on one metric for one edit
    method, as the verdict reads it (a row of comparisons.csv; docs/verdict.md names each field)."""

    method: str
    metric: str
    outcome: str | None = None
    selection: str | None = None
    candidate_mean: float = NAN
    random_mean: float = NAN
    random_sd: float = NAN
    n_random: int = 0
    n_questions: int | None = None
    percentile: float = NAN
    z: float = NAN
    p_rank: float = NAN  # (1 + #draws at least as good) / (n + 1)
    p_floor: float = NAN  # 1 / (n + 1)
    p_rank_adj: float = NAN
    p_mean: float = NAN  # the hierarchical t-test of the difference
    p_combined: float = NAN  # max(p_rank, p_mean): the intersection-union test
    p_combined_adj: float = NAN
    floor_fragile: bool = False  # one more draw at least as good would undo the claim
    rank_stability: float = NAN
    in_family: bool = False
    family_size: float = NAN
    diff: float = NAN
    ci_low: float = NAN  # the t-interval of the difference
    ci_high: float = NAN
    ci_boot_low: float = NAN  # the bootstrap percentile interval
    ci_boot_high: float = NAN
    se_diff: float = NAN
    se_locations: float = NAN
    se_questions: float = NAN
    se_seeds: float = NAN
    question_noise: str = ""
    training_noise: str = ""
    full_alignment: float | None = None
    unedited: float | None = None
    gain: float | None = None
    gain_lcb: float | None = None
    gain_measurable: bool | None = None
    margin_abs: float | None = None
    candidate_gain_fraction: float = NAN
    random_median_gain_fraction: float = NAN
    diff_gain_fraction: float = NAN
    tost_p: float = NAN
    tost_p_adj: float = NAN
    tost_low: float = NAN
    tost_high: float = NAN
    ch_p: float = NAN
    welch_seeds_p: float = NAN
    t_tost_p: float = NAN
    optimistic_candidate: float = NAN
    optimistic_random_mean: float = NAN
    optimistic_p_rank: float = NAN
    constant: bool = False

    @classmethod
    def from_row(cls, row: Any) -> "Comparison":
        """From a comparisons-table row (a dict or a pandas row); fields it lacks keep their defaults."""
        row = dict(row)
        return cls(**{f.name: row[f.name] for f in fields(cls) if f.name in row})

    def columns(self) -> dict:
        """The headline table's columns (verdict.csv; every field but the internal `constant`)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "constant"}


def _selected_row(eng: SelectionEngine, panel: SelectionPanel, metric: str) -> dict | None:
    cfg = eng.cfg
    hib = higher_is_better(metric)
    sgn = 1.0 if hib else -1.0
    vals = eng.selected(panel, metric)
    if "top" not in panel.groups:
        return None
    top = panel.groups.index("top")
    rand = [i for i, g in enumerate(panel.groups) if g == "random" and np.isfinite(vals[i, 0])]
    c = vals[top]
    if not np.isfinite(c[0]) or not rand:
        return None
    rv = vals[rand]  # [n, R]
    n = len(rand)
    idx = eng.location_index(n, panel.method + metric)
    rmean = np.take_along_axis(rv.T, idx, axis=1).mean(axis=1)  # [R]
    d = c - rmean
    d_q = c - rv.mean(axis=0)  # questions only, locations as drawn
    alt = "greater" if hib else "less"
    r0 = rv[:, 0]
    boot = slice(1, None)
    level = cfg.level
    base = eng.base(metric)
    all_vals = np.concatenate([vals[:, 0][np.isfinite(vals[:, 0])]] + ([base[:1]] if base is not None else []))
    constant = bool(all_vals.size and np.ptp(all_vals) <= 1e-12 * max(1.0, float(np.abs(all_vals).max())))
    noise = eng.has_question_noise(metric)
    n_q = len(eng.weights(metric)["qids"]) if eng.weights(metric) else None
    # the question part of the difference's variance: the paired question bootstrap (locations as drawn),
    # unbiased by n / (n - 1) where the number of questions is known
    var_q = float(np.nanvar(d_q[boot], ddof=1)) if eng.B > 1 and noise.startswith(("paired", "per-trial")) else 0.0
    if n_q and n_q > 1:
        var_q *= n_q / (n_q - 1)
    seeds_vals = _candidate_seed_values(eng, panel, metric, top)  # the candidate's seeds at its chosen point
    ht = S.hierarchical_t(float(d[0]), r0, var_q, n_q, seeds_vals, alt, level)
    # rank stability: over the paired question resamples (locations as drawn), the share in which the
    # candidate is still strictly better than every draw
    with np.errstate(invalid="ignore"):
        first = (sgn * (c[None, boot] - rv[:, boot])).min(axis=0) > 0 if eng.B else np.zeros(0, bool)
    row: dict[str, Any] = {
        "method": panel.method, "metric": metric, "scope": "selected", "selection": eng.selection(panel)["mode"],
        "family": "headline" if metric == eng.primary else "secondary", "n_random": n, "n_questions": n_q,
        "candidate_mean": float(c[0]), "random_mean": float(r0.mean()),
        "random_sd": float(r0.std(ddof=1)) if n > 1 else float("nan"), "diff": float(d[0]),
        "percentile": (S.percentile_rank(c[0], r0) if hib else 100.0 - S.percentile_rank(c[0], r0)),
        "p_rank": S.empirical_p(c[0], r0, alt), "p_floor": S.rank_floor(n),
        "p_mean": ht["p"], "t_mean": ht["t"], "df_mean": ht["df"],
        "ci_low": ht["ci_low"], "ci_high": ht["ci_high"], "interval": "t (Satterthwaite df)",
        "ci_boot_low": _q(d[boot], (1 - level) / 2), "ci_boot_high": _q(d[boot], (1 + level) / 2),
        "se_diff": ht["se"], "se_locations": ht["se_locations"], "se_questions": ht["se_questions"],
        "se_seeds": ht["se_seeds"], "rank_stability": float(first.mean()) if first.size else float("nan"),
        "question_noise": noise, "constant": constant,
        "training_noise": (f"included ({len(seeds_vals)} training seeds of the candidate)" if len(seeds_vals) > 1 else
                           "omitted (one training seed: the interval does not include training noise)"),
        "z": S.zscore(c[0], r0) * sgn if n > 1 and not _spread_is_noise(r0) else float("nan"),
    }
    row["p_combined"] = max(row["p_rank"], ht["p"]) if math.isfinite(ht["p"]) else float("nan")
    ch = S.crawford_howell(c[0], r0, alt)
    row.update(ch_p=ch.pvalue)
    # seeds of the candidate vs the draws (secondary: tests training noise, not locations)
    row["n_candidate_seeds"] = len(seeds_vals)
    row["welch_seeds_p"] = S.welch_t(seeds_vals, r0, alt).pvalue if len(seeds_vals) > 1 else float("nan")
    row.update(_gain_columns(eng, metric, panel.method, c, r0, d, ht, noise))
    # the optimistic view: grid points chosen on the reported data itself
    v_opt = eng.values(panel, metric)[:, :, 0]
    best = np.array([(np.nanmax(r) if hib else np.nanmin(r)) if np.isfinite(r).any() else np.nan for r in v_opt])
    row.update(optimistic_candidate=float(best[top]), optimistic_random_mean=float(np.nanmean(best[rand])),
               optimistic_p_rank=S.empirical_p(best[top], best[rand], alt))
    return row


def _gain_columns(eng: SelectionEngine, metric: str, method: str, c: np.ndarray, r0: np.ndarray, d: np.ndarray,
                  ht: dict, noise: str) -> dict:
    """Full alignment's gain over the unedited model, whether it is measurable, the difference as a fraction
    of it and its TOST against the margin (c [R]: the candidate, r0 [n]: the draws as observed, d [R]: the
    difference per replicate)."""
    cfg, boot, n = eng.cfg, slice(1, None), r0.size
    sgn = 1.0 if higher_is_better(metric) else -1.0
    full, base = eng.full(metric, method), eng.base(metric)
    row: dict[str, Any] = {}
    row.update(full_alignment=float(full[0]) if full is not None else None,
               unedited=float(base[0]) if base is not None else None)
    gain = sgn * (full - base) if full is not None and base is not None else None
    if gain is not None:
        g0 = float(gain[0])
        lcb = _q(gain[boot], cfg.alpha) if noise.startswith(("paired", "per-trial")) and eng.B else g0
        measurable = bool(g0 > 1e-12 and lcb > 0)
        with np.errstate(all="ignore"):
            theta = np.where(gain > 0, sgn * d / gain, np.inf)
        t = _tost(theta, d, ht, cfg) if eng.B else None
        row.update(gain=g0, gain_lcb=lcb, gain_measurable=measurable, margin_abs=cfg.margin * g0 if g0 > 0 else None,
                   candidate_gain_fraction=float(sgn * (c[0] - base[0]) / g0) if g0 > 0 else float("nan"),
                   random_median_gain_fraction=float(np.median(sgn * (r0 - base[0]) / g0)) if g0 > 0 else float("nan"),
                   diff_gain_fraction=float(theta[0]) if g0 > 0 else float("nan"),
                   tost_p=t["p"] if t and measurable else float("nan"),
                   tost_low=t["lo"] if t and measurable else float("nan"),
                   tost_high=t["hi"] if t and measurable else float("nan"),
                   tost_method=t["method"] if t and measurable else None)
        if n > 1 and g0 > 0:
            mabs = cfg.margin * g0
            row["t_tost_p"] = S.tost_one(r0, c[0] - mabs, c[0] + mabs).pvalue
    else:
        row.update(gain=None, gain_lcb=None, gain_measurable=None, margin_abs=None, tost_p=float("nan"),
                   tost_low=float("nan"), tost_high=float("nan"))
    return row


def _tost(theta: np.ndarray, d: np.ndarray, ht: dict, cfg: VerdictSpec) -> dict:
    """TOST of the difference as a fraction of full alignment's gain, t-calibrated: the bootstrap's standard
    error of theta, scaled by the hierarchical t-test's over the bootstrap's standard error of the difference
    (the bootstrap's variance runs small at few questions or draws), with the same Satterthwaite df. Falls
    back to the bootstrap percentile TOST where a replicate has no positive gain (theta undefined)."""
    tb, db = theta[1:], d[1:]
    sd_d = float(np.nanstd(db, ddof=1)) if db.size > 1 else float("nan")
    if np.isfinite(tb).all() and tb.size > 1 and sd_d > 0 and math.isfinite(ht["se"]) and math.isfinite(ht["df"]):
        se = float(np.std(tb, ddof=1)) * ht["se"] / sd_d
        return {**S.t_tost(float(theta[0]), se, ht["df"], -cfg.margin, cfg.margin, cfg.alpha),
                "method": "t (bootstrap se, Satterthwaite df)"}
    return {**S.boot_tost(tb, -cfg.margin, cfg.margin, cfg.alpha), "method": "bootstrap percentile"}


def _candidate_seed_values(eng: SelectionEngine, panel: SelectionPanel, metric: str, top: int) -> list[float]:
    sel = eng.selection(panel)
    g = int(sel["sel"][top]) if "sel" in sel else int(sel["A"][top, 0])
    if g < 0:
        return []
    val, _ = eng._aggregate(panel.keys[top, g], metric)
    return [float(v) for v in val if np.isfinite(v)]


def _descriptive_rows(df: pd.DataFrame, method: str, metric: str, primary: str, n_resamples: int, seed: int
                      ) -> list[dict]:
    """Per grid point, pooled and best-on-test scopes (legacy `compare`, seeds averaged per location)."""
    sub = df[df["kind"] == method]
    rows = []
    labels = sub.apply(grid_label, axis=1)
    scopes: list[tuple[str, pd.DataFrame, bool]] = [("best_on_test", best_per_localizer(df, method, primary), False)]
    scopes += [(g, sub[labels == g], False) for g in sorted(labels.unique())]
    if labels.nunique() > 1:
        scopes.append(("pooled", sub, True))
    for scope, s, pooled in scopes:
        if metric not in s.columns:
            continue
        if pooled:
            cand = s[(s["group"] == "top") & s[metric].notna()][metric].tolist()
            rand = s[(s["group"] == "random") & s[metric].notna()][metric].tolist()
        else:
            cand, _ = by_localizer(s, metric, "top")
            rand, _ = by_localizer(s, metric, "random")
        if not cand or not rand:
            continue
        c = S.compare(cand, rand, higher_is_better(metric), n_resamples=n_resamples, seed=seed)
        d = c.to_dict()
        rows.append({"method": method, "metric": metric, "scope": scope, "selection": "optimistic" if scope ==
                     "best_on_test" else ("pooled (descriptive)" if pooled else "fixed grid point"),
                     "family": "descriptive", "n_random": d["n_random"], "candidate_mean": d["candidate_mean"],
                     "random_mean": d["random_mean"], "random_sd": d["random_sd"], "diff": d["diff"],
                     "percentile": d["percentile"], "p_rank": d["empirical_p"], "p_floor": S.rank_floor(d["n_random"]),
                     "ci_low": d["ci_low"], "ci_high": d["ci_high"], "z": NAN if _spread_is_noise(rand) else d["z"],
                     "ch_p": d["t_p"] if d["n_candidate"] == 1 else float("nan"),
                     "welch_seeds_p": d["t_p"] if d["n_candidate"] > 1 else float("nan"),
                     "mwu_p": d["mwu_p"], "perm_p": d["perm_p"]})
    return rows


def _outcome(row: dict, alpha: float) -> str:
    """One comparison's outcome (docs/verdict.md). "Evidence for" needs the intersection-union test: the
    rank test AND the hierarchical t-test of the difference, their p = max(p_rank, p_mean) corrected over
    the family; "suggestive" when that holds only at the design's floor (one more draw at least as good
    would undo it)."""
    if row.get("constant") or row.get("gain_measurable") is False:
        return "no signal"
    better = (row["diff"] > 0) if higher_is_better(row["metric"]) else (row["diff"] < 0)
    if row.get("in_family") and row.get("p_combined_adj", np.nan) <= alpha and better:
        return "suggestive" if row.get("floor_fragile") else "evidence for"
    if row.get("tost_p_adj", np.nan) <= alpha:
        return "evidence against"
    return "inconclusive"


def _one_more_draw(p_rank: np.ndarray, p_mean: np.ndarray, n: np.ndarray, member: np.ndarray, method: str,
                   alpha: float) -> np.ndarray:
    """For each family member: would its combined test still pass if one more draw were at least as good
    (rank p + 1 / (n + 1), the family otherwise unchanged)? False where it would not: the claim rests on
    the design's floor."""
    out = np.ones(p_rank.size, dtype=bool)
    for i in np.flatnonzero(member):
        pr = p_rank.copy()
        pr[i] = min(1.0, pr[i] + 1.0 / (n[i] + 1))
        adj = S.adjust_pvalues(np.maximum(pr, p_mean)[member], method)
        out[i] = bool(adj[int(member[:i].sum())] <= alpha)
    return out


def _adjust(comp: pd.DataFrame, cfg: VerdictSpec) -> pd.DataFrame:
    """Holm / BH within each family of the selected scope (the discrete restriction by the rank tests'
    floors); the outcome of each row."""
    if comp.empty:
        return comp
    comp = comp.copy()
    for col in ("p_rank_adj", "p_combined_adj", "tost_p_adj"):
        comp[col] = np.nan
    comp["in_family"] = False
    comp["floor_fragile"] = False
    comp["family_size"] = np.nan
    for fam in ("headline", "secondary"):
        m = (comp["scope"] == "selected") & (comp["family"] == fam)
        if not m.any():
            continue
        floors = comp.loc[m, "p_floor"].to_numpy(float)
        adj, member = S.adjust_family(comp.loc[m, "p_rank"].to_numpy(float), floors, cfg.multiplicity, cfg.alpha)
        comp.loc[m, "p_rank_adj"] = adj
        pc = comp.loc[m, "p_combined"].to_numpy(float)
        member &= np.isfinite(pc)
        adj_c = np.full(pc.shape, np.nan)
        if member.any():
            adj_c[member] = S.adjust_pvalues(pc[member], cfg.multiplicity)
        comp.loc[m, "p_combined_adj"] = adj_c
        comp.loc[m, "in_family"] = member
        comp.loc[m, "family_size"] = int(member.sum())
        holds = _one_more_draw(comp.loc[m, "p_rank"].to_numpy(float), comp.loc[m, "p_mean"].to_numpy(float),
                               comp.loc[m, "n_random"].to_numpy(float), member, cfg.multiplicity, cfg.alpha)
        comp.loc[m, "floor_fragile"] = ~holds & member
        if "tost_p" in comp.columns:
            comp.loc[m, "tost_p_adj"] = S.adjust_pvalues(comp.loc[m, "tost_p"].to_numpy(float), cfg.multiplicity)
    sel = comp["scope"] == "selected"
    comp["outcome"] = None
    comp.loc[sel, "outcome"] = [_outcome(r, cfg.alpha) for r in comp[sel].to_dict("records")]
    return comp


# ---------------------------------------------------------------------------------------------- the analysis
@dataclass
class Analysis:
    """Everything the report shows: comparisons, single heads, flags, the locations at their chosen grid
    points (`selected`: one row per location, metrics as columns) and the configuration used."""

    primary: str | None
    comparisons: pd.DataFrame
    singles: pd.DataFrame
    flags: list[dict]
    selected: pd.DataFrame
    selection: dict[str, str]
    config: VerdictSpec


def analyze(df: pd.DataFrame, perq: dict | None = None, config: VerdictSpec | dict | None = None,
            ranking: list[tuple[int, int]] | None = None, n_resamples: int = 4999, seed: int = 0,
            max_overlap: float | None = 0.5, top_k: int | None = None, candidate: str | None = None) -> Analysis:
    """Run every comparison of a results frame (see the module docstring); `perq` from load_per_question.

    With several candidate localizers (probe, activation patching, ...), one candidate is analysed:
    `candidate` (default: the probe, else the first); `analyze_candidates` runs each."""
    cfg = config if isinstance(config, VerdictSpec) else VerdictSpec.model_validate(config or {})
    cands = candidates(df)
    if len(cands) > 1 or (candidate is not None and cands):
        df = for_candidate(df, candidate or cands[0])
    if df.empty or primary_metric(df, cfg.primary_metric) is None:
        return Analysis(None, pd.DataFrame(), pd.DataFrame(), [], pd.DataFrame(), {}, cfg)
    eng = SelectionEngine(df, perq, cfg, n_resamples, seed)
    metrics = metric_columns(df)
    rows: list[dict] = []
    for method, panel in eng.panels.items():
        for metric in metrics:
            r = _selected_row(eng, panel, metric)
            if r is not None:
                rows.append(r)
            rows += _descriptive_rows(df, method, metric, eng.primary, min(n_resamples, 1999), seed)
    comp = _adjust(pd.DataFrame(rows), cfg)
    return Analysis(eng.primary, comp, _singles(eng, ranking), draw_flags(df, max_overlap, top_k),
                    _selected_frame(eng, metrics), {m: eng.selection(p)["mode"] for m, p in eng.panels.items()}, cfg)


def comparisons(df: pd.DataFrame, perq: dict | None = None, config: VerdictSpec | dict | None = None,
                n_resamples: int = 4999, seed: int = 0) -> pd.DataFrame:
    """Candidate (top-K) vs random draws for each method, metric and scope (`analyze(...).comparisons`)."""
    return analyze(df, perq, config, n_resamples=n_resamples, seed=seed).comparisons


def _selected_frame(eng: SelectionEngine, metrics: list[str]) -> pd.DataFrame:
    rows = []
    for method, p in eng.panels.items():
        grid = eng.selected_grid(p)
        vals = {m: eng.selected(p, m)[:, 0] for m in metrics}
        for i, name in enumerate(p.names):
            rows.append({"kind": method, "method": method, "group": p.groups[i], "localizer": name, "heads": p.heads[i],
                         "grid": grid[i], "seed": None, **{m: float(vals[m][i]) for m in metrics}})
    base = eng.df[eng.df["kind"] == "baseline"]
    if not base.empty:
        rows.append({"kind": "baseline", "method": "baseline", "group": "none", "localizer": "baseline",
                     **{m: (float(b[0]) if (b := eng.base(m)) is not None else None) for m in metrics}})
    return pd.DataFrame(rows)


def gain_fraction(x: float, base: float | None, full: float | None, higher: bool = True,
                  noise: float | None = None) -> float:
    """Share of full alignment's improvement over the unedited model that x achieves (1 = as good);
    NaN when full alignment did not improve the metric by more than `noise`."""
    if base is None or full is None or any(v is None or not math.isfinite(v) for v in (x, base, full)):
        return float("nan")
    gain = (full - base) if higher else (base - full)
    if gain <= max(1e-9, noise or 0.0):
        return float("nan")
    return ((x - base) if higher else (base - x)) / gain


def _singles(eng: SelectionEngine, ranking: list[tuple[int, int]] | None) -> pd.DataFrame:
    """Single heads against full alignment on the primary metric: gain fraction, its lower confidence
    bound, and 'matches' when that bound exceeds 1 - margin after the family's correction."""
    cfg, metric = eng.cfg, eng.primary
    hib = higher_is_better(metric)
    sgn = 1.0 if hib else -1.0
    rank_of = {f"L{l}H{h}": i + 1 for i, (l, h) in enumerate(ranking or [])}
    noisy = eng.has_question_noise(metric).startswith(("paired", "per-trial")) and eng.B > 0
    rows = []
    for method, p in eng.panels.items():
        idx = [i for i, g in enumerate(p.groups) if g == "single"]
        if not idx:
            continue
        vals = eng.selected(p, metric)
        full, base = eng.full(metric, method), eng.base(metric)
        gain = sgn * (full - base) if full is not None and base is not None else None
        g0 = float(gain[0]) if gain is not None else float("nan")
        measurable = gain is not None and g0 > 1e-12 and (_q(gain[1:], cfg.alpha) > 0 if noisy else True)
        grid = eng.selected_grid(p)
        for i in idx:
            v = vals[i]
            row = {"method": method, "metric": metric, "localizer": p.names[i], "head": p.heads[i], "grid": grid[i],
                   "value": float(v[0]), "full_alignment": float(full[0]) if full is not None else None,
                   "unedited": float(base[0]) if base is not None else None, "gain_fraction": float("nan"),
                   "gain_fraction_lcb": float("nan"), "p_match": float("nan"), "gain_measurable": bool(measurable),
                   "probe_rank": rank_of.get(p.heads[i]) if p.heads[i] else None}
            if gain is not None and g0 > 0:
                with np.errstate(all="ignore"):
                    frac = np.where(gain > 0, sgn * (v - base) / gain, -np.inf)
                row["gain_fraction"] = float(frac[0])
                if noisy and measurable:
                    row["gain_fraction_lcb"] = _q(frac[1:], cfg.alpha)
                    row["p_match"] = S.boot_p_above(frac[1:], 1 - cfg.margin)
            rows.append(row)
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    out["p_match_adj"] = np.nan
    for method in out["method"].unique():
        m = out["method"] == method
        out.loc[m, "p_match_adj"] = S.adjust_pvalues(out.loc[m, "p_match"].to_numpy(float), cfg.multiplicity)
    out["matches_full"] = [None if not np.isfinite(p) else bool(p <= cfg.alpha) for p in out["p_match_adj"]]
    return out.sort_values(["method", "value"], ascending=[True, not hib]).reset_index(drop=True)


def singles_table(df: pd.DataFrame, ranking: list[tuple[int, int]] | None = None, perq: dict | None = None,
                  config: VerdictSpec | dict | None = None, n_resamples: int = 4999, seed: int = 0) -> pd.DataFrame:
    """Single heads vs full alignment (`analyze(...).singles`)."""
    return analyze(df, perq, config, ranking, n_resamples, seed).singles


def draw_flags(df: pd.DataFrame, max_overlap: float | None = 0.5, top_k: int | None = None) -> list[dict]:
    """Random draws that coincide with the top-K heads, overlap them by more than `max_overlap` of the
    smaller set, or duplicate an earlier draw (from each trial's recorded heads)."""
    from locaudit.heads import HeadSet

    flags: list[dict] = []
    if df.empty or "heads" not in df.columns:
        return flags
    limit = 0.5 if max_overlap is None else max_overlap
    for method in METHODS:
        sub = df[(df["kind"] == method) & df["heads"].notna()]
        top = sub[sub["group"] == "top"]["heads"]
        top_set = set(HeadSet.parse(str(top.iloc[0])).heads) if len(top) else None
        seen: dict[frozenset, str] = {}
        for loc, g in sub[sub["group"] == "random"].groupby("localizer", sort=False):
            heads = frozenset(HeadSet.parse(str(g["heads"].iloc[0])).heads)
            if top_set is not None:
                ov = len(heads & top_set)
                small = min(len(heads), len(top_set))
                if heads == top_set:
                    flags.append({"method": method, "localizer": loc, "heads": g["heads"].iloc[0],
                                  "issue": f"coincides with the top-{top_k or len(top_set)} heads", "overlap": ov})
                elif small and ov / small > limit:
                    flags.append({"method": method, "localizer": loc, "heads": g["heads"].iloc[0], "overlap": ov,
                                  "issue": f"shares {ov} of {small} heads with the top-{top_k or len(top_set)} heads"})
            if heads in seen:
                flags.append({"method": method, "localizer": loc, "heads": g["heads"].iloc[0], "overlap": None,
                              "issue": f"duplicates draw {seen[heads]}"})
            else:
                seen[heads] = str(loc)
    return flags
