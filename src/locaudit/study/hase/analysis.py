"""The analysis Hase et al. ran, and a tracing-argmax test whose null keeps each layer's mean.

1. Regressions (per editing problem and method), over rows (fact, edited layer):
     tracing      success ~ 1 + tracing effect at the edited layer
     layer        success ~ C(layer)                      (the edited layer as a categorical variable)
     both         success ~ C(layer) + tracing
     interaction  success ~ C(layer) * tracing            (the paper's model: a tracing slope per layer)
   R^2 of each, the added R^2 of tracing over layer (both - layer, interaction - layer), with percentile
   bootstrap CIs over facts (facts are resampled with all their layers). OLS by least squares (checked
   against statsmodels). `ftests`: the nested-model F-tests of what tracing adds to the layer, as the paper
   reports them (interaction vs layer; both vs layer). `measure_r2`: the same table for each of Hase's
   success measures (rewrite, paraphrase, neighbourhood, combined; evaluate/facts.py), as the paper gives it.
2. Does the layer where tracing peaks edit better than the layer alone predicts? A comparison with the mean
   over layers ("a random layer") is confounded: when tracing peaks early on average and early layers are
   easy to edit, tracing wins with no fact-level information. So the null here keeps each layer's mean:
   (a) permutation: the statistic mean_i S[i, argmax tracing of fact i] is compared with the same statistic
       after shuffling whole tracing curves across facts (fact i gets the argmax layer of fact pi(i)); the
       layer distribution of the argmax, and each layer's mean success, are kept; only the link between a
       fact's tracing and that fact's success is broken. p_perm = (1 + #{perm >= observed}) / (1 + n_perm).
   (b) layer-mean-removed contrast: R[i, l] = S[i, l] - mean_{j != i} S[j, l] (leave-one-fact-out layer
       means), centred per fact (Rc). d_i = Rc[i, argmax_i] (what tracing's layer gains over the layer's
       own mean, relative to this fact's average layer), g_i = max_l Rc[i, l] (the fact-level oracle gain).
       theta = mean(d) / mean(g): the fraction of the fact-level oracle gain that tracing's choice gets.
       Bootstrap over facts recomputes the leave-one-out means in every resample.
   Verdict (the head studies' language, docs/verdict.md):
     evidence for     p_perm <= alpha AND the bootstrap p of theta > 0 <= alpha (an intersection-union test:
                      both must reject; no correction is needed);
     evidence against TOST: theta within +-margin at alpha (tracing's layer is no better than its layer's mean);
     inconclusive     neither;
     no signal        success shows no fact-level variation beyond the layer means (g = 0).
   Control: the best fixed layer, cross-fitted (for each fact, the layer with the best mean success on the
   OTHER facts), compared with tracing's layer fact by fact (bootstrap CI and p); reported beside the
   verdict, since "edit one good layer for every fact" is what a practitioner would do without tracing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from locaudit.study.stats import boot_p_above, boot_tost

MODELS = ("tracing", "layer", "both", "interaction")


def design(df: pd.DataFrame, which: str, layers: list[int]) -> np.ndarray:
    """Design matrix [n, p] of a model (with intercept; layer dummies drop the first layer)."""
    if which not in MODELS:
        raise ValueError(f"model {which!r} is not one of {MODELS}")
    n = len(df)
    cols = [np.ones(n)]
    lay = df["layer"].to_numpy()
    dummies = [(lay == l).astype(float) for l in layers[1:]]
    if which in ("layer", "both", "interaction"):
        cols += dummies
    if which in ("tracing", "both", "interaction"):
        t = df["tracing"].to_numpy(dtype=float)
        cols.append(t)
        if which == "interaction":
            cols += [d * t for d in dummies]
    return np.column_stack(cols)


def _fit(y: np.ndarray, X: np.ndarray, w: np.ndarray | None = None) -> tuple[float, float]:
    """(weighted residual sum of squares, weighted total sum of squares) of the least-squares fit."""
    if w is None:
        w = np.ones_like(y)
    sw = np.sqrt(w)
    beta, *_ = np.linalg.lstsq(X * sw[:, None], y * sw, rcond=None)
    res = y - X @ beta
    ybar = np.sum(w * y) / np.sum(w)
    return float(np.sum(w * res ** 2)), float(np.sum(w * (y - ybar) ** 2))


def r2(y: np.ndarray, X: np.ndarray, w: np.ndarray | None = None) -> float:
    """R^2 of the (weighted) least-squares fit of y on X (weights = bootstrap multiplicities)."""
    rss, sst = _fit(y, X, w)
    return float(1.0 - rss / sst) if sst > 0 else float("nan")


def r2_all(df: pd.DataFrame, layers: list[int], w: np.ndarray | None = None) -> dict[str, float]:
    y = df["success"].to_numpy(dtype=float)
    out = {m: r2(y, design(df, m, layers), w) for m in MODELS}
    out["added_tracing"] = out["both"] - out["layer"]
    out["added_interaction"] = out["interaction"] - out["layer"]
    return out


R2_KEYS = (*MODELS, "added_tracing", "added_interaction")


def ftests(df: pd.DataFrame) -> dict[str, dict]:
    """Nested-model F-tests of what tracing adds to the layer: {"interaction": layer*tracing vs layer,
    "both": layer + tracing vs layer}, each {F, df_num, df_den, p} (ranks from the design matrices, so a
    degenerate column costs no degree of freedom). Checked against statsmodels' compare_f_test."""
    from scipy import stats

    df = df.dropna(subset=["success", "tracing"]).reset_index(drop=True)
    layers = sorted(df["layer"].unique().tolist())
    y = df["success"].to_numpy(dtype=float)
    Xr = design(df, "layer", layers)
    rss_r, _ = _fit(y, Xr)
    rank_r = np.linalg.matrix_rank(Xr)
    out = {}
    for full in ("interaction", "both"):
        Xf = design(df, full, layers)
        rss_f, _ = _fit(y, Xf)
        rank_f = np.linalg.matrix_rank(Xf)
        dn, dd = int(rank_f - rank_r), int(len(y) - rank_f)
        if dn <= 0 or dd <= 0 or rss_f <= 0:
            out[full] = {"F": float("nan"), "df_num": dn, "df_den": dd, "p": float("nan")}
            continue
        F = ((rss_r - rss_f) / dn) / (rss_f / dd)
        out[full] = {"F": float(F), "df_num": dn, "df_den": dd, "p": float(stats.f.sf(F, dn, dd))}
    return out


@dataclass
class R2Result:
    estimate: dict[str, float]
    ci: dict[str, tuple[float, float]]
    n_facts: int
    n_layers: int
    n_rows: int
    f: dict[str, dict] = field(default_factory=dict)

    def rows(self) -> list[dict]:
        out = []
        for k in R2_KEYS:
            row = {"model": k, "r2": self.estimate[k], "ci_low": self.ci[k][0], "ci_high": self.ci[k][1],
                   "n_facts": self.n_facts, "n_layers": self.n_layers, "n_rows": self.n_rows,
                   "F": float("nan"), "F_df_num": None, "F_df_den": None, "F_p": float("nan")}
            ft = self.f.get({"added_interaction": "interaction", "added_tracing": "both"}.get(k, ""))
            if ft:
                row.update(F=ft["F"], F_df_num=ft["df_num"], F_df_den=ft["df_den"], F_p=ft["p"])
            out.append(row)
        return out


def _fact_weights(facts: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """[n_boot, n_facts] multiplicities of a bootstrap over facts."""
    n = len(facts)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(float)


def regressions(df: pd.DataFrame, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> R2Result:
    """R^2 of the four models on rows (fact, layer, tracing, success), bootstrap CIs over facts, and the
    F-tests of what tracing adds over the layer."""
    df = df.dropna(subset=["success", "tracing"]).reset_index(drop=True)
    layers = sorted(df["layer"].unique().tolist())
    est = r2_all(df, layers)
    facts = np.array(sorted(df["fact"].unique().tolist()))
    fidx = pd.Index(facts).get_indexer(df["fact"])
    rng = np.random.default_rng(seed)
    boots = {k: [] for k in est}
    for wf in _fact_weights(facts, n_boot, rng):
        w = wf[fidx]
        if w.sum() == 0:
            continue
        r = r2_all(df, layers, w)
        for k, v in r.items():
            boots[k].append(v)
    a = (1 - level) / 2
    ci = {k: (float(np.nanquantile(v, a)), float(np.nanquantile(v, 1 - a))) if v else (float("nan"), float("nan"))
          for k, v in boots.items()}
    return R2Result(est, ci, len(facts), len(layers), len(df), ftests(df))


MEASURES = ("rewrite_score", "paraphrase_score", "neighbourhood_stability", "combined_score")


def measure_r2(df: pd.DataFrame, tracing_col: str, measures: tuple[str, ...] = MEASURES, n_boot: int = 1000,
               seed: int = 0) -> pd.DataFrame:
    """The R^2 table per success measure, as Hase et al. give it (rewrite, paraphrase, neighbourhood and the
    combined score): for each measure present in `df` with values, `regressions` of that measure on the edited
    layer and `tracing_col` (rows: the measure, each model's R^2 with its bootstrap CI over facts, tracing's added
    R^2 over the layer, the F-tests). A measure absent from `df` (paraphrase_score without paraphrase prompts)
    or constant is left out."""
    rows = []
    for m in measures:
        if m not in df or tracing_col not in df:
            continue
        d = pd.DataFrame({"fact": df["fact"], "layer": df["layer"], "tracing": df[tracing_col], "success": df[m]})
        d = d.dropna(subset=["success", "tracing"])
        if d.empty or d["layer"].nunique() < 2 or d["fact"].nunique() < 3 or d["success"].nunique() < 2:
            continue
        for r in regressions(d, n_boot, seed).rows():
            rows.append({"measure": m, **r})
    return pd.DataFrame(rows)


def _wide(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(S, Tr) Float[facts, layers] of success and tracing, facts with every layer only; the layers."""
    df = df.dropna(subset=["success", "tracing"])
    wide_s = df.pivot_table(index="fact", columns="layer", values="success", aggfunc="mean")
    wide_t = df.pivot_table(index="fact", columns="layer", values="tracing", aggfunc="mean")
    wide_t = wide_t.reindex(index=wide_s.index, columns=wide_s.columns)
    keep = wide_s.notna().all(axis=1) & wide_t.notna().all(axis=1)
    return wide_s[keep].to_numpy(dtype=float), wide_t[keep].to_numpy(dtype=float), [int(c) for c in wide_s.columns]


def _contrast(S: np.ndarray, arg: np.ndarray, W: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Layer-mean-removed contrast: (sum_i w_i d_i, sum_i w_i g_i) per weight row (W: [B, n] multiplicities;
    None = the sample itself). Leave-one-out layer means are taken within each (re)sample: a fact's own
    copy is left out of the mean it is compared with."""
    n = S.shape[0]
    if W is None:
        W = np.ones((1, n))
    tot = W @ S  # [B, L]
    cnt = W.sum(1, keepdims=True)  # [B, 1]
    loo = (tot[:, None, :] - S[None]) / np.maximum(cnt[:, :, None] - 1, 1)  # [B, n, L]
    R = S[None] - loo
    Rc = R - R.mean(2, keepdims=True)
    d = Rc[:, np.arange(n), arg]  # [B, n]
    g = Rc.max(2)
    return (W * d).sum(1), (W * g).sum(1)


def _crossfit_fixed(S: np.ndarray) -> np.ndarray:
    """Int[n]: for each fact, the layer (column) with the best mean success over the other facts."""
    n = S.shape[0]
    loo = (S.sum(0)[None] - S) / max(n - 1, 1)
    return loo.argmax(1)


def _state_outcome(out: dict, S: np.ndarray, n: int, den0: np.ndarray, theta: float, gain_low: float, p_perm: float,
                   p_contrast: float, tost: dict, alpha: float, margin: float) -> None:
    """`argmax_vs_random`'s outcome and its sentence (out["outcome"], out["text"]) from the tests' results in
    `out` and those given, with the note on the cross-fitted best fixed layer."""
    fixed_note = ""
    if np.isfinite(out["p_beats_best_fixed"]):
        beats = out["p_beats_best_fixed"] <= alpha and out["diff_vs_best_fixed"] > 0
        fixed_note = (f" Against the best fixed layer (chosen on the other facts), tracing's layer "
                      f"{'edits better' if beats else 'does not edit measurably better'} "
                      f"(difference {out['diff_vs_best_fixed']:+.3f}, p = {out['p_beats_best_fixed']:.3g}).")
    tol = 1e-9 * (1.0 + float(np.abs(S).max()))  # per fact: rounding of the leave-one-out means
    if not np.isfinite(theta) or den0[0] <= tol * n or gain_low <= tol:
        out["outcome"] = "no signal"
        out["text"] = ("Edit success shows no fact-level variation beyond each layer's mean: nothing for tracing "
                       "to inform (no signal).")
    elif p_perm <= alpha and p_contrast <= alpha and theta > 0:
        out["outcome"] = "evidence for"
        out["text"] = ("Tracing-based evidence for where to edit: yes. The layer where a fact's tracing peaks edits "
                       "that fact better than its layer's mean success predicts (permutation of tracing curves "
                       f"across facts p = {p_perm:.3g}; layer-mean-removed contrast theta = {theta:.3f}, "
                       f"p = {p_contrast:.3g}).") + fixed_note
    elif tost["p"] <= alpha:
        out["outcome"] = "evidence against"
        out["text"] = ("Tracing-based evidence for where to edit: none. Once each layer's mean success is removed, "
                       f"the layer where tracing peaks gains less than {margin:.0%} of the fact-level oracle gain "
                       f"(theta = {theta:.3f}, TOST p = {tost['p']:.3g}; permutation p = {p_perm:.3g}).") + fixed_note
    else:
        out["outcome"] = "inconclusive"
        out["text"] = ("Inconclusive: tracing's layer is neither shown better than its layer's mean (permutation "
                       f"p = {p_perm:.3g}, contrast p = {p_contrast:.3g}) nor shown equivalent within {margin:.0%} "
                       "of the fact-level oracle gain; more facts would decide it.") + fixed_note


def argmax_vs_random(df: pd.DataFrame, n_boot: int = 1000, alpha: float = 0.05, margin: float = 0.1,
                     seed: int = 0, n_perm: int = 2000) -> dict:
    """The tracing-argmax layer against a null that keeps each layer's mean (see the module docstring);
    a strict-JSON-ready dict with the outcome, the two tests and the cross-fitted fixed-layer control."""
    S, Tr, layers = _wide(df)
    n = S.shape[0]
    out: dict = {"n_facts": int(n), "layers": layers, "alpha": alpha, "margin": margin, "n_perm": int(n_perm),
                 "n_boot": int(n_boot)}
    if n < 3 or S.shape[1] < 2:
        out.update(outcome="no signal", reason="fewer than 3 facts or 2 layers",
                   text="Fewer than 3 facts with every layer edited, or fewer than 2 layers: no test.")
        return out
    rng = np.random.default_rng(seed)
    idx = np.arange(n)
    arg = Tr.argmax(1)
    s_arg = S[idx, arg]
    observed = float(s_arg.mean())
    # (a) permutation of tracing curves across facts
    perm = np.array([S[idx, arg[rng.permutation(n)]].mean() for _ in range(n_perm)]) if n_perm else np.array([])
    p_perm = float((1 + np.sum(perm >= observed - 1e-12)) / (1 + n_perm)) if n_perm else float("nan")
    # (b) layer-mean-removed (leave-one-fact-out) contrast
    num0, den0 = _contrast(S, arg)
    theta = float(num0[0] / den0[0]) if den0[0] > 1e-9 * n * (1.0 + float(np.abs(S).max())) else float("nan")
    W = _fact_weights(idx, n_boot, rng) if n_boot else np.ones((0, n))
    if n_boot:
        num, den = _contrast(S, arg, W)
        with np.errstate(divide="ignore", invalid="ignore"):
            theta_b = np.where(den > 0, num / den, np.nan)
    else:
        theta_b = np.array([])
    p_contrast = boot_p_above(theta_b, 0.0) if n_boot else float("nan")
    tost = boot_tost(theta_b, -margin, margin, alpha) if n_boot else {"p": float("nan")}
    # the cross-fitted best fixed layer
    fixed = _crossfit_fixed(S)
    s_fixed = S[idx, fixed]
    dfix = s_arg - s_fixed
    dfix_b = W @ dfix / n if n_boot else np.array([])
    counts = np.bincount(arg, minlength=len(layers))
    nan2 = [float("nan"), float("nan")]
    out.update({
        "mean_success_argmax": observed, "mean_success_random": float(S.mean()),
        "mean_success_permuted": float(perm.mean()) if n_perm else float("nan"),
        "mean_success_best": float(S.max(1).mean()),
        "diff_vs_permuted": observed - float(perm.mean()) if n_perm else float("nan"),
        "p_perm": p_perm,
        "contrast": float(num0[0] / n), "oracle_gain": float(den0[0] / n), "theta": theta,
        "theta_ci": [float(np.nanquantile(theta_b, alpha)), float(np.nanquantile(theta_b, 1 - alpha))]
        if n_boot and np.isfinite(theta_b).any() else nan2,
        "p_contrast": p_contrast, "p_for": max(p_perm, p_contrast), "tost_p": tost["p"],
        "argmax_layer_counts": {str(l): int(c) for l, c in zip(layers, counts)},
        "best_layer_by_mean": int(layers[int(S.mean(0).argmax())]),
        "mean_success_best_fixed": float(s_fixed.mean()),
        "crossfit_fixed_layer_counts": {str(l): int(c) for l, c in
                                        zip(layers, np.bincount(fixed, minlength=len(layers)))},
        "diff_vs_best_fixed": float(dfix.mean()),
        "diff_vs_best_fixed_ci": [float(np.quantile(dfix_b, alpha)), float(np.quantile(dfix_b, 1 - alpha))]
        if n_boot else nan2,
        "p_beats_best_fixed": boot_p_above(dfix_b, 0.0) if n_boot else float("nan"),
    })
    gain_low = float(np.quantile(den / n, alpha)) if n_boot else float(den0[0] / n)
    out["oracle_gain_low"] = gain_low
    _state_outcome(out, S, n, den0, theta, gain_low, p_perm, p_contrast, tost, alpha, margin)
    return out
