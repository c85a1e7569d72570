"""The engine behind the analysis: every location's metric per bootstrap replicate, and the choice of
grid points per location (validation, cross-fit on question-id halves, or optimistic; docs/verdict.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from locaudit.study import stats as S
from locaudit.study.frames import METHODS, PRODUCTS, question_half, grid_label, higher_is_better, primary_metric
from locaudit.study.spec import VerdictSpec


# ---------------------------------------------------------------------------------------------- the engine
@dataclass
class SelectionPanel:
    """One method's trials as arrays: locations x grid points x training seeds."""

    method: str
    names: list[str]
    groups: list[str]
    heads: list[str | None]
    grid: list[str]
    keys: np.ndarray  # object [L, G, S]: trial key or None
    frame: pd.DataFrame


def _panel(df: pd.DataFrame, method: str) -> SelectionPanel | None:
    sub = df[df["kind"] == method].reset_index(drop=True)
    if sub.empty:
        return None
    order = {"top": 0, "random": 1, "single": 2, "all": 3}
    locs = sub[["localizer", "group"]].drop_duplicates("localizer")
    locs = locs.assign(_o=locs["group"].map(order).fillna(9)).sort_values(["_o", "localizer"], kind="stable")
    names, groups = locs["localizer"].tolist(), locs["group"].tolist()
    labels = sub.apply(grid_label, axis=1)
    grid = sorted(labels.unique())
    seeds = sorted(sub["seed"].fillna(0).unique())
    keys = np.full((len(names), len(grid), len(seeds)), None, dtype=object)
    li, gi, si = {n: i for i, n in enumerate(names)}, {g: i for i, g in enumerate(grid)}, {s: i for i, s in enumerate(seeds)}
    for (_, r), lab in zip(sub.iterrows(), labels):
        keys[li[r["localizer"]], gi[lab], si[0 if pd.isna(r["seed"]) else r["seed"]]] = r["key"]
    heads = []
    for n in names:
        h = sub[(sub["localizer"] == n) & sub["heads"].notna()]["heads"] if "heads" in sub else pd.Series([], dtype=object)
        heads.append(str(h.iloc[0]) if len(h) else None)
    return SelectionPanel(method, names, groups, heads, grid, keys, sub)


def _take(v: np.ndarray, sel: np.ndarray) -> np.ndarray:
    """v [L, G, R] at grid index sel ([L] or [L, R]; -1 = none) -> [L, R]."""
    L, G, R = v.shape
    s = np.broadcast_to(sel.reshape(L, -1), (L, R)) if sel.ndim == 1 else sel
    out = np.take_along_axis(v, np.clip(s, 0, G - 1)[:, None, :], axis=1)[:, 0, :]
    return np.where(s >= 0, out, np.nan)


def _nanmean(v: np.ndarray, axis: int) -> np.ndarray:
    """Mean over `axis` ignoring NaN (missing trials); NaN where every entry is missing, without a warning."""
    ok = np.isfinite(v)
    n = ok.sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.where(ok, v, 0.0).sum(axis=axis) / n, np.nan)


def _argbest(v: np.ndarray, higher: bool, axis: int = 1) -> np.ndarray:
    """Index of the best finite value along `axis` (first on ties), -1 where every value is NaN."""
    x = np.where(np.isfinite(v), v if higher else -v, -np.inf)
    idx = np.argmax(x, axis=axis)
    none = ~np.isfinite(v).any(axis=axis)
    return np.where(none, -1, idx)


class SelectionEngine:
    """Values of every location per bootstrap replicate (axis R: replicate 0 = the data as observed)."""

    def __init__(self, df: pd.DataFrame, perq: dict | None, cfg: VerdictSpec, n_resamples: int, seed: int) -> None:
        self.df, self.perq, self.cfg = df, perq or {}, cfg
        self.B = max(int(n_resamples), 0)
        self.R = self.B + 1
        self.seed = seed
        self.primary = primary_metric(df, cfg.primary_metric)
        self.panels = {m: p for m in METHODS if (p := _panel(df, m)) is not None}
        self.base_keys = df[df["kind"] == "baseline"]["key"].tolist()
        self._w: dict[str, Any] = {}
        self._sel: dict[str, Any] = {}
        self._cache: dict[tuple, np.ndarray] = {}

    # ---------------------------------------------------------------- questions
    def components(self, metric: str) -> tuple[str, ...]:
        return PRODUCTS.get(metric, (metric,))

    def weights(self, metric: str) -> dict | None:
        """Question ids and paired bootstrap weights for `metric`, or None when some trial lacks per-question
        scores for it. "all" [R, Q]: the test questions resampled jointly (every question with the same
        chance, as they were sampled), the same weights for every edit; "A" and "B": those weights within
        each question-id hash half, renormalised (for cross-fit selection only); "fa" [R]: half A's share of
        each replicate's weight. A replicate that leaves a half empty is drawn again."""
        if metric in self._w:
            return self._w[metric]
        comps = self.components(metric)
        keys = [k for p in self.panels.values() for k in p.keys.flat if k is not None] + self.base_keys
        res = None
        if keys and all(all(c in self.perq.get(k, {}) for c in comps) for k in keys):
            qids = None
            for k in keys:
                for c in comps:
                    s = set(self.perq[k][c])
                    qids = s if qids is None else qids & s
            qids = sorted(qids or [])
            half = np.array([question_half(q) for q in qids], dtype=int)
            if len(qids) >= 2 and 0 < half.sum() < len(qids):
                rng = np.random.default_rng([self.seed, len(qids), sum(map(ord, metric))])
                w = S.bootstrap_weights(len(qids), self.B, rng)
                a = half == 0
                for _ in range(100):  # a replicate with no question of one half cannot cross-fit: redraw it
                    fa = w[:, a].sum(axis=1)
                    bad = np.flatnonzero((fa <= 0) | (fa >= 1 - 1e-12))
                    if not bad.size:
                        break
                    w[bad] = S.bootstrap_weights(len(qids), bad.size, rng)[1:]
                fa = w[:, a].sum(axis=1)
                with np.errstate(invalid="ignore", divide="ignore"):
                    wa = np.where(a, w, 0.0) / fa[:, None]
                    wb = np.where(~a, w, 0.0) / (1 - fa)[:, None]
                res = {"qids": qids, "A": wa, "B": wb, "all": w, "fa": fa}
        self._w[metric] = res
        return res

    def _question_array(self, keys: np.ndarray, comp: str, qids: list[str]) -> np.ndarray:
        out = np.full(keys.shape + (len(qids),), np.nan)
        for idx, k in np.ndenumerate(keys):
            if k is not None:
                d = self.perq[k][comp]
                out[idx] = [d[q] for q in qids]
        return out

    def _combine(self, metric: str, keys: np.ndarray, w: np.ndarray, qids: list[str]) -> np.ndarray:
        """keys [...] -> metric at each replicate's weights [..., R] (NaN where no trial)."""
        means = []
        for c in self.components(metric):
            x = self._question_array(keys, c, qids)
            missing = ~np.isfinite(x).all(axis=-1)
            m = (np.nan_to_num(x).reshape(-1, x.shape[-1]) @ w.T).reshape(x.shape[:-1] + (w.shape[0],))  # one GEMM
            m[missing] = np.nan
            means.append(m)
        return np.prod(means, axis=0) if len(means) > 1 else means[0]

    def _noise(self, metric: str, value: np.ndarray, se: np.ndarray, tag: str) -> np.ndarray:
        """No per-question scores: the aggregate value, plus independent normal noise of its SE in the
        bootstrap replicates (unpaired, so conservative for differences) where an SE was recorded."""
        rng = np.random.default_rng([self.seed, sum(map(ord, metric + tag))])
        z = rng.standard_normal(value.shape + (self.R,))
        z[..., 0] = 0.0
        return value[..., None] + np.nan_to_num(se)[..., None] * z

    def has_question_noise(self, metric: str) -> str:
        if self.weights(metric) is not None:
            return "paired per-question bootstrap"
        se = f"{metric}_se"
        if se in self.df.columns and self.df[se].notna().any():
            return "per-trial standard errors (unpaired, conservative)"
        return "none (no per-question scores or standard errors: question noise not included)"

    def _aggregate(self, keys: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
        by_key = self.df.set_index("key")
        val = np.full(keys.shape, np.nan)
        se = np.full(keys.shape, np.nan)
        for idx, k in np.ndenumerate(keys):
            if k is not None and k in by_key.index:
                if metric in by_key.columns:
                    val[idx] = by_key.at[k, metric]
                if f"{metric}_se" in by_key.columns:
                    se[idx] = by_key.at[k, f"{metric}_se"]
        return val.astype(float), se.astype(float)

    def values(self, panel: SelectionPanel, metric: str, which: str = "all") -> np.ndarray:
        """[L, G, R]: each location's metric per grid point, training seeds averaged."""
        ck = (panel.method, metric, which)
        if ck in self._cache:
            return self._cache[ck]
        w = self.weights(metric)
        if w is not None:
            v = self._combine(metric, panel.keys, w[which], w["qids"])  # [L, G, S, R]
        else:
            val, se = self._aggregate(panel.keys, metric)
            v = self._noise(metric, val, se, panel.method)
        out = _nanmean(v, axis=2)
        self._cache[ck] = out
        return out

    def base(self, metric: str) -> np.ndarray | None:
        """[R] the unedited model's value (mean over baseline trials)."""
        if not self.base_keys:
            return None
        keys = np.array(self.base_keys, dtype=object)
        w = self.weights(metric)
        if w is not None:
            v = self._combine(metric, keys, w["all"], w["qids"])
        else:
            val, se = self._aggregate(keys, metric)
            if not np.isfinite(val).any():
                return None
            v = self._noise(metric, val, se, "baseline")
        out = _nanmean(v, axis=0)
        return out if np.isfinite(out[0]) else None

    # ---------------------------------------------------------------- selection
    def selection(self, panel: SelectionPanel) -> dict:
        """How grid points are chosen for this method (on the primary metric) and the chosen indices."""
        if panel.method in self._sel:
            return self._sel[panel.method]
        p, hib = self.primary, higher_is_better(self.primary)
        val_col = f"val_{p}"
        have = (panel.keys != None).any(axis=2)  # noqa: E711  [L, G]: grid points each location ran
        if (have.sum(axis=1) <= 1).all():  # nothing to choose: every location ran one grid point
            sel = {"mode": "single", "sel": _argbest(np.where(have, 1.0, np.nan), True)}
        elif val_col in panel.frame.columns and panel.frame[val_col].notna().all():
            v, _ = self._aggregate(panel.keys, val_col)
            sel = {"mode": "validation", "sel": _argbest(_nanmean(v, axis=2), hib)}
        elif self.weights(p) is not None:
            va, vb = self.values(panel, p, "A"), self.values(panel, p, "B")
            sel = {"mode": "cross-fit", "A": _argbest(va, hib), "B": _argbest(vb, hib)}  # [L, R] each
        else:
            sel = {"mode": "optimistic", "sel": _argbest(self.values(panel, p)[:, :, 0], hib)}
        self._sel[panel.method] = sel
        return sel

    def selected(self, panel: SelectionPanel, metric: str) -> np.ndarray:
        """[L, R]: each location's value at its chosen grid point (metric read where the primary chose)."""
        ck = (panel.method, metric, "selected")
        if ck in self._cache:
            return self._cache[ck]
        sel = self.selection(panel)
        if "sel" in sel:
            out = _take(self.values(panel, metric), sel["sel"])
        elif self.weights(metric) is not None:
            same = metric == self.primary  # the primary re-chooses in every replicate; others follow replicate 0
            sa, sb = (sel["A"], sel["B"]) if same else (sel["A"][:, 0], sel["B"][:, 0])
            fa = self.weights(metric)["fa"]  # [R]: each half's questions weigh as in the replicate's mean
            out = (1 - fa) * _take(self.values(panel, metric, "B"), sa) + fa * _take(self.values(panel, metric, "A"), sb)
        else:
            v = self.values(panel, metric)
            out = (_take(v, sel["A"][:, 0]) + _take(v, sel["B"][:, 0])) / 2
        self._cache[ck] = out
        return out

    def selected_grid(self, panel: SelectionPanel) -> list[str]:
        sel = self.selection(panel)
        out = []
        for i in range(len(panel.names)):
            if "sel" in sel:
                g = int(sel["sel"][i])
                out.append(panel.grid[g] if g >= 0 else "")
            else:
                a, b = int(sel["A"][i, 0]), int(sel["B"][i, 0])
                out.append(" | ".join(dict.fromkeys(panel.grid[x] for x in (a, b) if x >= 0)))
        return out

    def full(self, metric: str, method: str) -> np.ndarray | None:
        """[R] full alignment: the optimal edit at all heads (else this method's own all-heads edit)."""
        for m in ("optimal", method):
            p = self.panels.get(m)
            if p is not None and "all" in p.groups:
                v = self.selected(p, metric)[p.groups.index("all")]
                if np.isfinite(v[0]):
                    return v
        return None

    def location_index(self, n: int, tag: str) -> np.ndarray:
        """[R, n] random locations resampled with replacement (row 0: as observed)."""
        rng = np.random.default_rng([self.seed, n, sum(map(ord, tag))])
        idx = rng.integers(0, n, size=(self.R, n))
        idx[0] = np.arange(n)
        return idx
