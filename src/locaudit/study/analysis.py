"""From ledger rows to the paper's answer: tables, candidate-vs-random comparisons, single heads vs
full alignment, and a plain-language verdict.

Works on any subset of finished trials (a half-finished study gives a partial answer that says what
is missing). Conventions:
  - "best" scope: each localization (and training seed) is represented by its best grid point (alpha,
    or tau x lr) on the primary metric (True*Info when judged, else MC2 / MC1 / ...), and every metric
    is read at that point, as the paper compares the best edit per location;
  - per-grid scopes compare at one grid point; "pooled" puts every grid point of each side together
    (descriptive only: the values are not independent);
  - tests are one-sided toward "the candidate is better" (the localization claim's prediction).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import pandas as pd

from locaudit.study.stats import compare

METHODS = ("iti", "optimal")
METHOD_LABEL = {"iti": "ITI (heuristic edit)", "optimal": "optimal edit", "baseline": "unedited"}
PRIMARY_ORDER = ("true_info", "true", "mc2", "mc1", "mc0", "pref_acc", "info")
LOWER_IS_BETTER = ("kl", "ce", "loss", "nll", "perplexity")
BASE_COLUMNS = ("key", "kind", "method", "group", "localizer", "alpha", "tau", "lr", "seed", "status",
                "attempts", "duration_s", "cpu_s", "heads", "error")
MATCH_FRACTION = 0.9  # a localization "matches" full alignment at >= 90% of its gain over the unedited model


def higher_is_better(metric: str) -> bool:
    m = metric.lower()
    return not any(m == x or m.startswith(x + "_") or m.endswith("_" + x) for x in LOWER_IS_BETTER)


def metric_label(metric: str) -> str:
    return {"true_info": "True*Info", "true": "True", "info": "Info", "mc1": "MC1", "mc2": "MC2", "mc0": "MC0",
            "kl": "KL", "ce": "CE"}.get(metric, metric)


# ---------------------------------------------------------------------------------------------- tables
def trials_frame(rows: Iterable[dict]) -> pd.DataFrame:
    """Every ledger row as one table row: trial fields, grid values and metrics as columns."""
    out = []
    for r in rows:
        spec = (r.get("spec") or {}).get("content", {})
        loc = spec.get("localizer") or {}
        from locaudit.study.localizers import Localizer

        lo = Localizer.from_dict(loc) if loc else None
        d = {"key": r["key"], "kind": r["kind"], "method": r["kind"],
             "group": lo.group if lo else ("none" if r["kind"] == "baseline" else "shared"),
             "localizer": lo.name if lo else r["kind"], "alpha": spec.get("alpha"), "tau": spec.get("tau"),
             "lr": spec.get("lr"), "seed": spec.get("seed") if r["kind"] == "optimal" else None,
             "status": r["status"], "attempts": r["attempts"], "duration_s": r.get("duration_s"), "cpu_s": r.get("cpu_s"),
             "heads": (r.get("artifacts") or {}).get("heads"), "error": (r.get("error") or "").strip().splitlines()[-1:] or None}
        if isinstance(d["error"], list):
            d["error"] = d["error"][0] if d["error"] else None
        for k, v in (r.get("metrics") or {}).items():
            d[k if k not in BASE_COLUMNS else f"metric_{k}"] = v
        out.append(d)
    df = pd.DataFrame(out)
    if df.empty:
        df = pd.DataFrame(columns=list(BASE_COLUMNS))
    return df


def results_frame(rows: Iterable[dict]) -> pd.DataFrame:
    """Finished evaluation trials (baseline, ITI, optimal) only."""
    df = trials_frame(rows)
    df = df[(df["status"] == "done") & df["kind"].isin(("baseline",) + METHODS)].reset_index(drop=True)
    keep = [c for c in df.columns if c in BASE_COLUMNS or df[c].notna().any()]
    return df[keep]


def metric_columns(df: pd.DataFrame) -> list[str]:
    skip = set(BASE_COLUMNS) | {"n_edit_heads", "train_seconds"}
    cols = [c for c in df.columns if c not in skip and not c.startswith("train_") and not c.endswith("_se")
            and not c.startswith("n_") and pd.api.types.is_numeric_dtype(df[c]) and df[c].notna().any()]
    order = {m: i for i, m in enumerate(PRIMARY_ORDER + ("kl", "ce"))}
    return sorted(cols, key=lambda c: (order.get(c, 100), c))


def primary_metric(df: pd.DataFrame) -> str | None:
    cols = set(metric_columns(df))
    for m in PRIMARY_ORDER:
        if m in cols:
            return m
    rest = metric_columns(df)
    return rest[0] if rest else None


def grid_label(row: pd.Series) -> str:
    if row["kind"] == "iti":
        return f"alpha={row['alpha']:g}"
    if row["kind"] == "optimal":
        return f"tau={row['tau']:g},lr={row['lr']:g}"
    return ""


def best_per_localizer(df: pd.DataFrame, method: str, select: str) -> pd.DataFrame:
    """One row per (localizer, seed): the grid point with the best `select` metric."""
    sub = df[(df["kind"] == method)]
    if sub.empty or select not in sub.columns:
        return sub.iloc[0:0]
    sub = sub[sub[select].notna()]
    if sub.empty:
        return sub
    asc = not higher_is_better(select)
    seed = sub["seed"].fillna(0)
    sub = sub.assign(_seed=seed).sort_values(select, ascending=asc, kind="stable")
    return sub.groupby(["localizer", "_seed"], sort=False).head(1).drop(columns="_seed").reset_index(drop=True)


def _by_localizer(sub: pd.DataFrame, metric: str, group: str) -> tuple[list[float], list[str]]:
    """Values of `group`'s localizers (mean over training seeds)."""
    g = sub[(sub["group"] == group) & sub[metric].notna()]
    if g.empty:
        return [], []
    m = g.groupby("localizer", sort=True)[metric].mean()
    return m.tolist(), m.index.tolist()


# ---------------------------------------------------------------------------------------------- comparisons
def comparisons(df: pd.DataFrame, n_resamples: int = 9999, seed: int = 0) -> pd.DataFrame:
    """Candidate (top-K) vs random draws for each method, metric and scope."""
    primary = primary_metric(df)
    rows = []
    if primary is None:
        return pd.DataFrame()
    metrics = metric_columns(df)
    for method in METHODS:
        sub = df[df["kind"] == method]
        if sub.empty:
            continue
        scopes: list[tuple[str, pd.DataFrame, bool]] = [("best", best_per_localizer(df, method, primary), False)]
        labels = sub.apply(grid_label, axis=1)
        for g in sorted(labels.unique()):
            scopes.append((g, sub[labels == g], False))
        if labels.nunique() > 1:
            scopes.append(("pooled", sub, True))
        for scope, s, pooled in scopes:
            for metric in metrics:
                if metric not in s.columns:
                    continue
                if pooled:
                    cand = s[(s["group"] == "top") & s[metric].notna()][metric].tolist()
                    rand = s[(s["group"] == "random") & s[metric].notna()][metric].tolist()
                else:
                    top = s[(s["group"] == "top") & s[metric].notna()]
                    cand = top[metric].tolist()  # one value per training seed
                    rand, _ = _by_localizer(s, metric, "random")
                if not cand or not rand:
                    continue
                c = compare(cand, rand, higher_is_better(metric), n_resamples=n_resamples, seed=seed)
                rows.append({"method": method, "metric": metric, "scope": scope, **c.to_dict()})
    return pd.DataFrame(rows)


def gain_fraction(x: float, base: float | None, full: float | None, higher: bool = True,
                  noise: float | None = None) -> float:
    """Share of full alignment's improvement over the unedited model that x achieves (1 = as good).
    NaN when full alignment did not improve the metric by more than `noise` (its standard error):
    a share of no gain means nothing."""
    if base is None or full is None or any(v is None or not math.isfinite(v) for v in (x, base, full)):
        return float("nan")
    gain = (full - base) if higher else (base - full)
    if gain <= max(1e-9, noise or 0.0):
        return float("nan")
    return ((x - base) if higher else (base - x)) / gain


def _se(df: pd.DataFrame, metric: str, group: str) -> float | None:
    col = f"{metric}_se"
    if col not in df.columns:
        return None
    v = df[(df["group"] == group) & df[col].notna()][col]
    return float(v.mean()) if len(v) else None


def _value(df: pd.DataFrame, metric: str, group: str) -> float | None:
    v, _ = _by_localizer(df, metric, group)
    return float(np.mean(v)) if v else None


def singles_table(df: pd.DataFrame, ranking: list[tuple[int, int]] | None = None) -> pd.DataFrame:
    """Single heads (best grid point each) against full alignment, per method, on the primary metric."""
    primary = primary_metric(df)
    if primary is None:
        return pd.DataFrame()
    base = df[(df["kind"] == "baseline")]
    base_v = float(base[primary].mean()) if primary in base.columns and base[primary].notna().any() else None
    rank_of = {f"L{l}H{h}": i + 1 for i, (l, h) in enumerate(ranking or [])}
    rows = []
    for method in METHODS:
        best = best_per_localizer(df, method, primary)
        if best.empty:
            continue
        full = _value(best, primary, "all")
        noise = _se(best, primary, "all")
        hib = higher_is_better(primary)
        singles = best[best["group"] == "single"]
        for loc, g in singles.groupby("localizer", sort=False):
            v = float(g[primary].mean())
            heads = g["heads"].dropna().iloc[0] if g["heads"].notna().any() else None
            rows.append({"method": method, "metric": primary, "localizer": loc, "head": heads, "value": v,
                         "full_alignment": full, "unedited": base_v,
                         "gain_fraction": gain_fraction(v, base_v, full, hib, noise),
                         "probe_rank": rank_of.get(heads) if heads else None})
    out = pd.DataFrame(rows)
    if not out.empty:
        out = out.sort_values(["method", "value"], ascending=[True, not higher_is_better(primary)]).reset_index(drop=True)
    return out


# ---------------------------------------------------------------------------------------------- verdict
@dataclass
class Verdict:
    """The plain-language answer and the numbers behind it."""

    headline: str
    lines: list[str] = field(default_factory=list)
    table: list[dict] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def text(self) -> str:
        return "\n".join([self.headline, *[f"- {x}" for x in self.lines],
                          *([f"(missing: {', '.join(self.missing)})"] if self.missing else [])])


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _fmt(x: float | None, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{nd}f}"


def _p(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:.2g}"


def _more_draws(alpha: float) -> str:
    need = 1  # the fewest draws whose rank p-value floor 1/(n+1) is below alpha
    while 1.0 / (need + 1) >= alpha:
        need += 1
    return f"Use at least {need} random draws (localizers.random.n) for a rank p-value below {alpha:g}."


def verdict(df: pd.DataFrame, comp: pd.DataFrame, singles: pd.DataFrame, alpha: float = 0.05,
            top_k: int | None = None) -> Verdict:
    """Is the candidate special under each edit, and do random / single heads match full alignment?"""
    primary = primary_metric(df)
    if primary is None:
        return Verdict("No evaluated trials yet: nothing to conclude.", missing=["every evaluation"])
    label = metric_label(primary)
    K = f"top-{top_k}" if top_k else "top-K"
    base = df[df["kind"] == "baseline"]
    base_v = float(base[primary].mean()) if primary in base.columns and base[primary].notna().any() else None
    lines, table, missing = [], [], []
    special: dict[str, bool | None] = {}
    inconclusive: list[str] = []
    for method in METHODS:
        c = comp[(comp["method"] == method) & (comp["metric"] == primary) & (comp["scope"] == "best")] if not comp.empty else comp
        best = best_per_localizer(df, method, primary)
        full = _value(best, primary, "all") if not best.empty else None
        if c is None or c.empty:
            special[method] = None
            if not df[df["kind"] == method].empty or method == "optimal":
                missing.append(f"{METHOD_LABEL[method]}: top-K and random-draw results")
            continue
        r = c.iloc[0]
        is_special = bool(r["t_p"] < alpha and r["diff"] * (1 if higher_is_better(primary) else -1) > 0) \
            if math.isfinite(r["t_p"]) else bool(r["empirical_p"] < alpha)
        special[method] = is_special
        floor = 1.0 / (r["n_random"] + 1)
        # the candidate beat every draw, yet the draws are too few for the rank tests to reach alpha
        underpowered = not is_special and floor >= alpha and (r["percentile"] >= 100.0 if higher_is_better(primary)
                                                              else r["percentile"] <= 0.0)
        if underpowered:
            inconclusive.append(method)
        rand_vals, _ = _by_localizer(best, primary, "random")
        hib, noise = higher_is_better(primary), (_se(best, primary, "all") if not best.empty else None)
        cand_frac = gain_fraction(r["candidate_mean"], base_v, full, hib, noise)
        rand_fracs = [gain_fraction(v, base_v, full, hib, noise) for v in rand_vals]
        rand_frac = float(np.nanmedian(rand_fracs)) if rand_fracs and np.isfinite(rand_fracs).any() else float("nan")
        stat = (f"{label} {_fmt(r['candidate_mean'])} at the {K} heads vs {_fmt(r['random_mean'])} ± {_fmt(r['random_sd'])} "
                f"over {int(r['n_random'])} random draws (percentile {r['percentile']:.0f}, z = {_fmt(r['z'], 2)}, "
                f"{r['t_test']} p = {_p(r['t_p'])}, Mann-Whitney p = {_p(r['mwu_p'])}, empirical p = {_p(r['empirical_p'])}"
                f"{' (floor ' + _p(floor) + ')' if floor >= alpha else ''}; difference {_fmt(r['diff'])}, "
                f"95% CI [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}])")
        if is_special:
            lines.append(f"{_cap(METHOD_LABEL[method])}: the {K} heads beat random heads: {stat}. "
                         "On its own, this edit would be read as evidence for localization.")
        elif underpowered:
            lines.append(f"{_cap(METHOD_LABEL[method])}: the {K} heads beat every random draw, but "
                         f"{int(r['n_random'])} draws are too few to tell: {stat}. {_more_draws(alpha)}")
        else:
            lines.append(f"{_cap(METHOD_LABEL[method])}: random heads do about as well as the {K} heads: {stat}. "
                         "This edit gives no evidence that the candidate heads are special.")
        if full is not None and base_v is not None and math.isfinite(cand_frac):
            lines.append(f"{_cap(METHOD_LABEL[method])}: full alignment (all heads) reaches {label} {_fmt(full)} "
                         f"(unedited {_fmt(base_v)}); the {K} heads achieve {cand_frac:.0%} of its gain, random draws "
                         f"a median {rand_frac:.0%}." if math.isfinite(rand_frac) else
                         f"{_cap(METHOD_LABEL[method])}: full alignment reaches {label} {_fmt(full)} "
                         f"(unedited {_fmt(base_v)}); the {K} heads achieve {cand_frac:.0%} of its gain.")
        elif full is not None and base_v is not None:
            lines.append(f"{_cap(METHOD_LABEL[method])}: full alignment (all heads) did not improve {label} measurably "
                         f"({_fmt(full)} vs unedited {_fmt(base_v)}), so matching it is no benchmark here.")
        table.append({"method": method, "metric": primary, "candidate": r["candidate_mean"], "random_mean": r["random_mean"],
                      "random_sd": r["random_sd"], "n_random": int(r["n_random"]), "percentile": r["percentile"],
                      "z": r["z"], "p": r["t_p"], "test": r["t_test"], "mwu_p": r["mwu_p"], "perm_p": r["perm_p"],
                      "empirical_p": r["empirical_p"], "ci_low": r["ci_low"], "ci_high": r["ci_high"],
                      "full_alignment": full, "unedited": base_v, "candidate_gain_fraction": cand_frac,
                      "random_median_gain_fraction": rand_frac, "candidate_special": is_special})
    if not singles.empty:
        for method, g in singles.groupby("method", sort=False):
            n = len(g)
            fr = g["gain_fraction"]
            n_match = int((fr >= MATCH_FRACTION).sum()) if fr.notna().any() else None
            top = g.iloc[0]
            rank_txt = ""
            if g["probe_rank"].notna().any() and n_match:
                ranks = g[fr >= MATCH_FRACTION]["probe_rank"].dropna().astype(int).tolist()
                rank_txt = f"; their probe-accuracy ranks: {', '.join(map(str, ranks))}" if ranks else ""
            if n_match is None:
                why = ("no full-alignment or unedited result to compare" if top["full_alignment"] is None
                       or top["unedited"] is None or not math.isfinite(top["full_alignment"])
                       else "full alignment shows no measurable gain to compare with")
                lines.append(f"{_cap(METHOD_LABEL[method])}: {n} single heads; best {top['head'] or top['localizer']} "
                             f"with {label} {_fmt(top['value'])} ({why}).")
            else:
                lines.append(f"{_cap(METHOD_LABEL[method])}: {n_match} of {n} single heads reach at least "
                             f"{MATCH_FRACTION:.0%} of full alignment's gain (best {top['head'] or top['localizer']}: "
                             f"{label} {_fmt(top['value'])}, {_fmt(top['gain_fraction'] * 100, 0)}%){rank_txt}.")
                for row in table:
                    if row["method"] == method:
                        row.update(n_single=n, n_single_matching_full=n_match)
    opt, iti = special.get("optimal"), special.get("iti")
    if opt is None:
        headline = ("Verdict pending: the optimal-edit comparison (top-K vs random draws) is not finished, and it is "
                    "the one that can show whether editing gives evidence for localization.")
        if iti:
            headline += " So far only the heuristic ITI edit makes the candidate heads look special."
    elif opt is False and "optimal" in inconclusive:
        headline = (f"Edit-based evidence for localization: inconclusive. Under the optimal edit the {K} heads beat every "
                    f"random draw on {label}, but there are too few draws for that to be significant. {_more_draws(alpha)}")
    elif opt is False:
        headline = (f"Edit-based evidence for localization: none. Under the optimal edit, random heads do as well as the "
                    f"{K} heads on {label}")
        headline += (", although the heuristic ITI edit made the candidate look special: that contrast is an artefact of "
                     "the sub-optimal edit, as in Wang & Veitch (2025)." if iti else ".")
    else:
        headline = (f"Edit-based evidence for localization survives this control: under the optimal edit the {K} heads "
                    f"still beat random heads on {label}.")
        if any(r.get("n_single_matching_full") for r in table if r["method"] == "optimal"):
            headline += " But several single heads match full alignment, so no location is unique."
    return Verdict(headline, lines, table, missing)
