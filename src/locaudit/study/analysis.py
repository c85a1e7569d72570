"""From ledger rows to the paper's answer: tables, candidate-vs-random comparisons, single heads vs full
alignment, a verdict with one of four outcomes, and design (power) checks. docs/verdict.md defines them.

Conventions:
  - every location is one unit: its training seeds are averaged (per question where per-question scores
    exist) on both sides, so the number of seeds never changes which test answers the question;
  - grid points (alpha, or tau x lr) are chosen per location on the primary metric, never on the data the
    result is reported on: on the validation split when the trials report `val_<metric>`, else by
    cross-fitting on the test questions (choose on one half, read the other, both ways), else (no
    per-question scores) on test, labelled optimistic. The "best on test" view stays, labelled optimistic;
  - the test: the candidate's rank among the random locations, (1 + #draws at least as good) / (n + 1);
    intervals: a hierarchical bootstrap over random locations and test questions (paired across edits);
  - equivalence: TOST on the candidate-minus-random difference as a fraction of full alignment's gain;
  - multiplicity: Holm or Benjamini-Hochberg across the headline table (the primary metric, one row per
    method), the single heads and the secondary metrics, each its own family.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from locaudit.study import stats as S
from locaudit.study.spec import VerdictSpec

METHODS = ("iti", "optimal")
METHOD_LABEL = {"iti": "ITI (heuristic edit)", "optimal": "optimal edit", "baseline": "unedited"}
PRIMARY_ORDER = ("true_info", "true", "mc2", "mc1", "mc0", "ab", "pref_acc", "info")
LOWER_IS_BETTER = ("kl", "ce", "loss", "nll", "perplexity")
BASE_COLUMNS = ("key", "kind", "method", "group", "localizer", "candidate", "alpha", "tau", "lr", "seed", "status",
                "attempts", "duration_s", "cpu_s", "heads", "edit_dir", "eval_dir", "precision", "cpu_capability",
                "error", "of")
OUTCOMES = ("evidence for", "evidence against", "inconclusive", "no signal")
# per-question score files of an evaluation folder: {file: {field: component}}
# judgements.jsonl holds the judges' probabilities: they are the *_prob components, and True / Info are
# those probabilities thresholded at the evaluation's judge_threshold (as EvalResult.set_judged does)
PER_QUESTION_FILES = {"judgements.jsonl": {"truth": "true_prob", "info": "info_prob"},
                      "mc_items.jsonl": {"mc1": "mc1", "mc2": "mc2", "mc0": "mc0"}}
# metrics computed from several per-question components (True*Info is the product of the means, as ITI)
PRODUCTS = {"true_info": ("true", "info"), "true_info_prob": ("true_prob", "info_prob")}
SELECTION_LABEL = {"single": "fixed (each location ran one grid point: nothing to choose)",
                   "validation": "chosen on the validation split", "cross-fit": "chosen by cross-fitting on "
                   "test-question halves (no validation results)", "optimistic": "chosen on the test split "
                   "itself (optimistic: no validation or per-question results)"}


def higher_is_better(metric: str) -> bool:
    m = metric.lower()
    return not any(m == x or m.startswith(x + "_") or m.endswith("_" + x) for x in LOWER_IS_BETTER)


def metric_label(metric: str) -> str:
    return {"true_info": "True*Info", "true": "True", "info": "Info", "mc1": "MC1", "mc2": "MC2", "mc0": "MC0",
            "kl": "KL", "ce": "CE"}.get(metric, metric)


# ---------------------------------------------------------------------------------------------- tables
def trials_frame(rows: Iterable[dict]) -> pd.DataFrame:
    """Every ledger row as one table row: the trial's typed fields (trials.Trial), its grid values, its
    artifacts' folders and its metrics as columns."""
    from locaudit.study.trials import Trial

    out = []
    for r in rows:
        spec = r.get("spec") or {}
        t = Trial.from_dict({**spec, "key": r["key"], "kind": r["kind"], "content": spec.get("content", {})})
        lo = t.localizer
        art = r.get("artifacts") or {}
        err = (r.get("error") or "").strip().splitlines()[-1:]
        d = {"key": t.key, "kind": t.kind, "method": t.kind, "group": t.group,
             "localizer": lo.name if lo else t.kind,
             "candidate": (lo.ranking or "probe") if lo is not None and lo.group == "top" else None,
             "alpha": t.grid.get("alpha"), "tau": t.grid.get("tau"), "lr": t.grid.get("lr"),
             "seed": t.replicate if t.kind == "optimal" else None, "of": t.content.get("of"),
             "status": r["status"], "attempts": r["attempts"], "duration_s": r.get("duration_s"), "cpu_s": r.get("cpu_s"),
             "heads": art.get("heads"), "edit_dir": art.get("edit"), "eval_dir": art.get("eval"),
             "precision": art.get("precision"), "cpu_capability": art.get("cpu_capability"),
             "error": err[0] if err else None}
        for k, v in (r.get("metrics") or {}).items():
            d[k if k not in BASE_COLUMNS else f"metric_{k}"] = v
        out.append(d)
    df = pd.DataFrame(out)
    if df.empty:
        df = pd.DataFrame(columns=list(BASE_COLUMNS))
    return df


def merge_selection(df: pd.DataFrame) -> pd.DataFrame:
    """Copy each finished 'select' trial's validation metrics (`val_*`) onto the row of the trial it scored."""
    if df.empty or "of" not in df.columns:
        return df
    sel = df[(df["kind"] == "select") & (df["status"] == "done")]
    cols = [c for c in sel.columns if c.startswith("val_") and sel[c].notna().any()]
    if sel.empty or not cols:
        return df
    df = df.copy()
    pos = {k: i for i, k in enumerate(df["key"])}
    for _, r in sel.iterrows():
        i = pos.get(r["of"])
        if i is not None:
            for c in cols:
                df.loc[df.index[i], c] = r[c]
    return df


def results_frame(rows: Iterable[dict]) -> pd.DataFrame:
    """Finished evaluation trials (baseline, ITI, optimal) only, with their validation scores where selected."""
    df = merge_selection(trials_frame(rows))
    df = df[(df["status"] == "done") & df["kind"].isin(("baseline",) + METHODS)].reset_index(drop=True)
    keep = [c for c in df.columns if c in BASE_COLUMNS or df[c].notna().any()]
    return df[keep]


def metric_columns(df: pd.DataFrame) -> list[str]:
    """Metric columns of a results frame (validation copies `val_*`, SEs and training logs excluded)."""
    skip = set(BASE_COLUMNS) | {"n_edit_heads", "train_seconds"}
    cols = [c for c in df.columns if c not in skip and not c.startswith(("train_", "val_", "n_")) and not c.endswith("_se")
            and pd.api.types.is_numeric_dtype(df[c]) and df[c].notna().any()]
    order = {m: i for i, m in enumerate(PRIMARY_ORDER + ("kl", "ce"))}
    return sorted(cols, key=lambda c: (order.get(c, 100), c))


def primary_metric(df: pd.DataFrame, override: str | None = None) -> str | None:
    """The metric the verdict rests on: `override` if given and present, else the first of PRIMARY_ORDER."""
    cols = metric_columns(df)
    if override:
        if override not in cols:
            from locaudit.errors import ConfigError

            if not cols:
                return None
            raise ConfigError(f"verdict.primary_metric {override!r}: no such metric in the results; have {cols}")
        return override
    for m in PRIMARY_ORDER:
        if m in cols:
            return m
    return cols[0] if cols else None


def grid_label(row: pd.Series) -> str:
    if row["kind"] == "iti":
        return f"alpha={row['alpha']:g}"
    if row["kind"] == "optimal":
        return f"tau={row['tau']:g},lr={row['lr']:g}"
    return ""


def best_per_localizer(df: pd.DataFrame, method: str, select: str) -> pd.DataFrame:
    """One row per (localizer, seed): the grid point with the best `select` metric ON THE SAME DATA
    (optimistic; the verdict uses `Analysis.selected` instead)."""
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


# ---------------------------------------------------------------------------------------------- per question
def load_per_question(run_dir: str | Path, rows: Iterable[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """{trial key: {component: {qid: score}}} from each finished evaluation's judgements.jsonl (the judges'
    probabilities true_prob, info_prob, and true, info: those thresholded at the trial's judge_threshold)
    and mc_items.jsonl (mc1, mc2, mc0); a missing or unreadable file leaves that component out. A row whose
    artifacts name "judgements" (re-scored by another judge) is read from that file instead."""
    from locaudit.io import read_jsonl

    run_dir = Path(run_dir)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for r in rows:
        ev = (r.get("artifacts") or {}).get("eval")
        if r.get("status") != "done" or not ev:
            continue
        comps: dict[str, dict[str, float]] = {}
        redirect = (r.get("artifacts") or {}).get("judgements")  # re-scored by another judge (study/rejudge.py)
        for fname, fields in PER_QUESTION_FILES.items():
            path = run_dir / redirect if fname == "judgements.jsonl" and redirect else run_dir / ev / fname
            if not path.exists():
                continue
            try:
                for _, rec in read_jsonl(path):
                    for f, comp in fields.items():
                        v = rec.get(f)
                        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                            comps.setdefault(comp, {})[str(rec["qid"])] = float(v)
            except Exception:  # a damaged file: that trial falls back to its aggregate metrics
                continue
        thr = (r.get("metrics") or {}).get("judge_threshold")
        thr = float(thr) if isinstance(thr, (int, float)) and 0 < float(thr) < 1 else 0.5
        for soft, hard in (("true_prob", "true"), ("info_prob", "info")):
            if soft in comps:
                comps[hard] = {q: float(v >= thr) for q, v in comps[soft].items()}
        if "true" in comps and "info" in comps:  # the mean of per-question products (EvalResult.true_info_per_q)
            comps["true_info_per_q"] = {q: t * comps["info"][q] for q, t in comps["true"].items() if q in comps["info"]}
        if comps:
            out[r["key"]] = comps
    return out


def _half(qid: str) -> int:
    return int(hashlib.sha256(qid.encode()).hexdigest()[:8], 16) % 2


# ---------------------------------------------------------------------------------------------- the engine
@dataclass
class _Panel:
    """One method's trials as arrays: locations x grid points x training seeds."""

    method: str
    names: list[str]
    groups: list[str]
    heads: list[str | None]
    grid: list[str]
    keys: np.ndarray  # object [L, G, S]: trial key or None
    frame: pd.DataFrame


def _panel(df: pd.DataFrame, method: str) -> _Panel | None:
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
    return _Panel(method, names, groups, heads, grid, keys, sub)


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


class _Engine:
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
        """Question ids and paired bootstrap weights (halves A, B and their mean) for `metric`, or None
        when some trial lacks per-question scores for it."""
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
            half = np.array([_half(q) for q in qids], dtype=int)
            if len(qids) >= 2 and 0 < half.sum() < len(qids):
                rng = np.random.default_rng([self.seed, len(qids), sum(map(ord, metric))])
                wa = S.bootstrap_weights(len(qids), self.B, rng, half == 0)
                wb = S.bootstrap_weights(len(qids), self.B, rng, half == 1)
                fa = float((half == 0).mean())  # share of questions in half A
                # "all": the same resampled questions, each counted once (row 0: the plain mean over questions)
                res = {"qids": qids, "A": wa, "B": wb, "all": fa * wa + (1 - fa) * wb, "fa": fa}
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

    def values(self, panel: _Panel, metric: str, which: str = "all") -> np.ndarray:
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
    def selection(self, panel: _Panel) -> dict:
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

    def selected(self, panel: _Panel, metric: str) -> np.ndarray:
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
            fa = self.weights(metric)["fa"]  # each half's questions weigh as in a plain mean
            out = (1 - fa) * _take(self.values(panel, metric, "B"), sa) + fa * _take(self.values(panel, metric, "A"), sb)
        else:
            v = self.values(panel, metric)
            out = (_take(v, sel["A"][:, 0]) + _take(v, sel["B"][:, 0])) / 2
        self._cache[ck] = out
        return out

    def selected_grid(self, panel: _Panel) -> list[str]:
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


# ---------------------------------------------------------------------------------------------- comparisons
def _q(x: np.ndarray, q: float) -> float:
    x = x[np.isfinite(x)]
    return float(np.quantile(x, q)) if x.size else float("nan")


def _selected_row(eng: _Engine, panel: _Panel, metric: str) -> dict | None:
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
    full, base = eng.full(metric, panel.method), eng.base(metric)
    all_vals = np.concatenate([vals[:, 0][np.isfinite(vals[:, 0])]] + ([base[:1]] if base is not None else []))
    constant = bool(all_vals.size and np.ptp(all_vals) <= 1e-12 * max(1.0, float(np.abs(all_vals).max())))
    noise = eng.has_question_noise(metric)
    row: dict[str, Any] = {
        "method": panel.method, "metric": metric, "scope": "selected", "selection": eng.selection(panel)["mode"],
        "family": "headline" if metric == eng.primary else "secondary", "n_random": n,
        "n_questions": len(eng.weights(metric)["qids"]) if eng.weights(metric) else None,
        "candidate_mean": float(c[0]), "random_mean": float(r0.mean()),
        "random_sd": float(r0.std(ddof=1)) if n > 1 else float("nan"), "diff": float(d[0]),
        "percentile": (S.percentile_rank(c[0], r0) if hib else 100.0 - S.percentile_rank(c[0], r0)),
        "p_rank": S.empirical_p(c[0], r0, alt), "p_floor": S.rank_floor(n),
        "ci_low": _q(d[boot], (1 - level) / 2), "ci_high": _q(d[boot], (1 + level) / 2),
        "se_diff": float(np.nanstd(d[boot], ddof=1)) if eng.B > 1 else float("nan"),
        "se_questions": float(np.nanstd(d_q[boot], ddof=1)) if eng.B > 1 else float("nan"),
        "question_noise": noise, "constant": constant,
        "z": S.zscore(c[0], r0) * sgn if n > 1 else float("nan"),
    }
    ch = S.crawford_howell(c[0], r0, alt)
    row.update(ch_p=ch.pvalue, mwu_p=S.mann_whitney_u([c[0]], r0, alt).pvalue)
    # seeds of the candidate at its chosen grid point (secondary: tests training noise, not locations)
    seeds_vals = _candidate_seed_values(eng, panel, metric, top)
    row["n_candidate_seeds"] = len(seeds_vals)
    row["welch_seeds_p"] = S.welch_t(seeds_vals, r0, alt).pvalue if len(seeds_vals) > 1 else float("nan")
    # full alignment and the margin
    row.update(full_alignment=float(full[0]) if full is not None else None,
               unedited=float(base[0]) if base is not None else None)
    gain = sgn * (full - base) if full is not None and base is not None else None
    if gain is not None:
        g0 = float(gain[0])
        lcb = _q(gain[boot], cfg.alpha) if noise.startswith(("paired", "per-trial")) and eng.B else g0
        measurable = bool(g0 > 1e-12 and lcb > 0)
        with np.errstate(all="ignore"):
            theta = np.where(gain > 0, sgn * d / gain, np.inf)
        t = S.boot_tost(theta[boot], -cfg.margin, cfg.margin, cfg.alpha) if eng.B else None
        row.update(gain=g0, gain_lcb=lcb, gain_measurable=measurable, margin_abs=cfg.margin * g0 if g0 > 0 else None,
                   candidate_gain_fraction=float(sgn * (c[0] - base[0]) / g0) if g0 > 0 else float("nan"),
                   random_median_gain_fraction=float(np.median(sgn * (r0 - base[0]) / g0)) if g0 > 0 else float("nan"),
                   diff_gain_fraction=float(theta[0]) if g0 > 0 else float("nan"),
                   tost_p=t["p"] if t and measurable else float("nan"),
                   tost_low=t["lo"] if t and measurable else float("nan"),
                   tost_high=t["hi"] if t and measurable else float("nan"))
        if n > 1 and g0 > 0:
            mabs = cfg.margin * g0
            row["t_tost_p"] = S.tost_one(r0, c[0] - mabs, c[0] + mabs).pvalue
    else:
        row.update(gain=None, gain_lcb=None, gain_measurable=None, margin_abs=None, tost_p=float("nan"),
                   tost_low=float("nan"), tost_high=float("nan"))
    # the optimistic view: grid points chosen on the reported data itself
    v_opt = eng.values(panel, metric)[:, :, 0]
    best = np.array([(np.nanmax(r) if hib else np.nanmin(r)) if np.isfinite(r).any() else np.nan for r in v_opt])
    row.update(optimistic_candidate=float(best[top]), optimistic_random_mean=float(np.nanmean(best[rand])),
               optimistic_p_rank=S.empirical_p(best[top], best[rand], alt))
    return row


def _candidate_seed_values(eng: _Engine, panel: _Panel, metric: str, top: int) -> list[float]:
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
            cand, _ = _by_localizer(s, metric, "top")
            rand, _ = _by_localizer(s, metric, "random")
        if not cand or not rand:
            continue
        c = S.compare(cand, rand, higher_is_better(metric), n_resamples=n_resamples, seed=seed)
        d = c.to_dict()
        rows.append({"method": method, "metric": metric, "scope": scope, "selection": "optimistic" if scope ==
                     "best_on_test" else ("pooled (descriptive)" if pooled else "fixed grid point"),
                     "family": "descriptive", "n_random": d["n_random"], "candidate_mean": d["candidate_mean"],
                     "random_mean": d["random_mean"], "random_sd": d["random_sd"], "diff": d["diff"],
                     "percentile": d["percentile"], "p_rank": d["empirical_p"], "p_floor": S.rank_floor(d["n_random"]),
                     "ci_low": d["ci_low"], "ci_high": d["ci_high"], "z": d["z"], "ch_p": d["t_p"] if d["n_candidate"] == 1
                     else float("nan"), "welch_seeds_p": d["t_p"] if d["n_candidate"] > 1 else float("nan"),
                     "mwu_p": d["mwu_p"], "perm_p": d["perm_p"]})
    return rows


def _outcome(row: dict, alpha: float) -> str:
    if row.get("constant") or row.get("gain_measurable") is False:
        return "no signal"
    better = (row["diff"] > 0) if higher_is_better(row["metric"]) else (row["diff"] < 0)
    if row.get("in_family") and row.get("p_rank_adj", np.nan) <= alpha and better:
        return "evidence for"
    if row.get("tost_p_adj", np.nan) <= alpha:
        return "evidence against"
    return "inconclusive"


def _adjust(comp: pd.DataFrame, cfg: VerdictSpec) -> pd.DataFrame:
    """Holm / BH within each family of the selected scope; the outcome of each row."""
    if comp.empty:
        return comp
    comp = comp.copy()
    for col in ("p_rank_adj", "tost_p_adj"):
        comp[col] = np.nan
    comp["in_family"] = False
    comp["family_size"] = np.nan
    for fam in ("headline", "secondary"):
        m = (comp["scope"] == "selected") & (comp["family"] == fam)
        if not m.any():
            continue
        adj, member = S.adjust_family(comp.loc[m, "p_rank"].to_numpy(float), comp.loc[m, "p_floor"].to_numpy(float),
                                      cfg.multiplicity, cfg.alpha)
        comp.loc[m, "p_rank_adj"] = adj
        comp.loc[m, "in_family"] = member
        comp.loc[m, "family_size"] = int(member.sum())
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


def candidates(df: pd.DataFrame) -> list[str]:
    """The localizers whose top-K sets are candidate locations in a results frame (the probe first)."""
    if df.empty or "candidate" not in df.columns:
        return ["probe"] if not df.empty and (df["group"] == "top").any() else []
    found = sorted({str(c) for c in df.loc[df["group"] == "top", "candidate"].dropna()})
    return sorted(found, key=lambda c: (c != "probe", c))


def for_candidate(df: pd.DataFrame, candidate: str) -> pd.DataFrame:
    """The results with only `candidate`'s top-K rows among the candidates (controls are shared)."""
    if df.empty or "candidate" not in df.columns:
        return df
    other = (df["group"] == "top") & (df["candidate"].fillna("probe") != candidate)
    return df[~other].reset_index(drop=True)


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
    eng = _Engine(df, perq, cfg, n_resamples, seed)
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


def _selected_frame(eng: _Engine, metrics: list[str]) -> pd.DataFrame:
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


def _singles(eng: _Engine, ranking: list[tuple[int, int]] | None) -> pd.DataFrame:
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
    return f"{x:.{nd}f}"


def _p(x: Any) -> str:
    if x is None or not isinstance(x, (int, float)) or not math.isfinite(x):
        return "n/a"
    return f"{x:.2g}"


def _pct(x: Any) -> str:
    x = _finite(x)
    return "n/a" if x is None else f"{x + 0.0 if round(x * 100) else 0.0:.0%}"


def _finite(x: Any) -> float | None:
    """x as a float, or None when it is missing or not finite (pandas turns None into NaN)."""
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def decide_hint(row: dict, cfg: VerdictSpec, floors: list[float] | None = None, index: int = 0) -> str:
    """What would decide an inconclusive comparison: draws for the rank test to enter its family and reach
    its threshold, draws to detect the observed effect, and draws / questions for equivalence at the
    observed spread. `floors`: the headline family's rank-test floors, `index`: this row's place in it."""
    n = int(row["n_random"])
    floors = list(floors) if floors else [S.rank_floor(n)]
    member = S.tarone_family(floors, cfg.alpha)
    parts = []
    if not member[index]:
        need = _draws_to_join(floors, index, cfg.alpha)
        f2 = list(floors)
        f2[index] = S.rank_floor(need)
        m = int(S.tarone_family(f2, cfg.alpha).sum())
        parts.append(f"the rank test cannot go below {_p(S.rank_floor(n))} with {n} draws; it needs at least {need} "
                     f"draws to reach {_p(cfg.alpha / m)} ({cfg.multiplicity + ', ' if m > 1 else ''}family of {m})")
    thr = cfg.alpha / max(1, int(member.sum()) + (0 if member[index] else 1))
    z = _finite(row.get("z"))
    if z is not None and z > 0:
        need = S.draws_for_power(z, thr, cfg.power)
        parts.append(f"to detect the observed standing (z = {z:.2f}) with {cfg.power:.0%} power: about {need} draws"
                     if need else f"the observed standing (z = {z:.2f}, about {S.sps.norm.sf(z):.1%} of random locations "
                     f"expected above it) is not in the {thr:.3g} tail, so more draws alone would not show it")
    mabs = _finite(row.get("margin_abs"))
    sd, se_q = _finite(row.get("random_sd")), _finite(row.get("se_questions"))
    if mabs and sd is not None:
        need = equivalence_needs(sd, int(row["n_random"]), se_q or 0.0, _finite(row.get("n_questions")), mabs,
                                 cfg.alpha, cfg.power)
        parts.append(f"for equivalence within ±{cfg.margin:.0%} of full alignment's gain (if truly equal; observed "
                     f"spread sd {sd:.3g}, question SE {(se_q or 0.0) if (se_q or 0) > 1e-12 else 0:.3g}): {need['text']}")
    return "; ".join(parts) if parts else "more draws and questions"


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


def verdict(df: pd.DataFrame, comp: pd.DataFrame, singles: pd.DataFrame, config: VerdictSpec | dict | None = None,
            top_k: int | None = None, flags: list[dict] | None = None, selection: dict | None = None) -> Verdict:
    """The headline (from the optimal edit, the paper's central comparison) and one line per finding."""
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
        r = r.iloc[0].to_dict()
        oc = r["outcome"]
        outcomes[method] = oc
        M = _cap(METHOD_LABEL[method])
        stat = (f"{label} {_fmt(r['candidate_mean'])} at the {K} heads vs {_fmt(r['random_mean'])} ± "
                f"{_fmt(r['random_sd'])} over {int(r['n_random'])} random draws (percentile {r['percentile']:.0f}; "
                f"rank p = {_p(r['p_rank'])}, floor {_p(r['p_floor'])}, {mult}-adjusted "
                f"{_p(r['p_rank_adj']) if r['in_family'] else 'n/a: cannot reach ' + _p(cfg.alpha) + ' in this family'}; "
                f"difference {_fmt(r['diff'])}, {cfg.level:.0%} CI [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]"
                f"{'' if str(r.get('question_noise', '')).startswith(('paired', 'per-trial')) else '; question noise not included: no per-question scores or standard errors'})")
        eq = ""
        if r.get("gain_measurable"):
            eq = (f"; as a fraction of full alignment's gain the difference is {_pct(r.get('diff_gain_fraction'))}, "
                  f"TOST {1 - 2 * cfg.alpha:.0%} bounds [{_pct(r.get('tost_low'))}, {_pct(r.get('tost_high'))}] vs "
                  f"margin ±{cfg.margin:.0%} (p = {_p(r.get('tost_p'))}, adjusted {_p(r.get('tost_p_adj'))})")
        if oc == "no signal":
            why = (f"{label} does not vary" if r.get("constant") else
                   f"full alignment shows no measurable gain over the unedited model ({_fmt(r.get('full_alignment'))} "
                   f"vs {_fmt(r.get('unedited'))}; one-sided {1 - cfg.alpha:.0%} lower bound of the gain "
                   f"{_fmt(r.get('gain_lcb'))})")
            lines.append(f"{M}: no signal: {why}, so this comparison cannot speak to localization.")
        elif oc == "evidence for":
            lines.append(f"{M}: evidence for localization: the {K} heads beat random locations: {stat}{eq}.")
            if (str(r.get("question_noise", "")).startswith(("paired", "per-trial"))
                    and math.isfinite(r.get("ci_low", float("nan"))) and math.isfinite(r.get("ci_high", float("nan")))
                    and (r["ci_low"] <= 0 <= r["ci_high"])):
                lines.append(f"{M}: caution: the rank test holds the {int(r['n_questions'])} test questions fixed; with "
                             f"their sampling noise included, the {cfg.level:.0%} CI of the difference "
                             f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}] includes 0, so another sample of questions "
                             "might not repeat this: evaluate on more test questions to confirm it.")
        elif oc == "evidence against":
            lines.append(f"{M}: evidence against localization: the {K} heads and random locations are equivalent "
                         f"within ±{cfg.margin:.0%} of full alignment's gain: {stat}{eq}.")
        else:
            why = ("" if r.get("gain_measurable") is not None else
                   " Equivalence cannot be tested without full alignment and unedited results.")
            lines.append(f"{M}: inconclusive: {stat}{eq}.{why} To decide: {decide_hint(r, cfg, floors, order.index(method))}.")
        if r.get("gain_measurable") and math.isfinite(r.get("candidate_gain_fraction", float("nan"))):
            lines.append(f"{M}: full alignment (the optimal edit at all heads) reaches {label} {_fmt(r['full_alignment'])} (unedited "
                         f"{_fmt(r['unedited'])}); the {K} heads achieve {_pct(r['candidate_gain_fraction'])} of its "
                         f"gain, random draws a median {_pct(r['random_median_gain_fraction'])}.")
        table.append({k: r.get(k) for k in (
            "method", "metric", "outcome", "selection", "candidate_mean", "random_mean", "random_sd", "n_random",
            "n_questions", "percentile", "z", "p_rank", "p_floor", "p_rank_adj", "in_family", "family_size", "diff",
            "ci_low", "ci_high", "question_noise", "full_alignment", "unedited", "gain", "gain_lcb", "gain_measurable",
            "margin_abs", "candidate_gain_fraction", "random_median_gain_fraction", "diff_gain_fraction", "tost_p",
            "tost_p_adj", "tost_low", "tost_high", "ch_p", "mwu_p", "welch_seeds_p", "t_tost_p",
            "optimistic_candidate", "optimistic_random_mean", "optimistic_p_rank")})
    if selection:
        for method, mode in selection.items():
            lines.append(f"{_cap(METHOD_LABEL[method])}: grid points {SELECTION_LABEL.get(mode, mode)}; the "
                         "'best on test' view (comparisons.csv, scope best_on_test) is optimistic.")
    if fam_n or not head.empty:
        fam = (f"{fam_n} rank test(s) on {primary}, one per method whose draws can reach {_p(cfg.alpha)}" if fam_n else
               f"no rank test on {primary} here has enough draws to reach {_p(cfg.alpha)}")
        lines.append(f"Multiplicity: {mult} correction over the headline family ({fam}); the equivalence tests of the "
                     "same rows form a parallel family; single heads and secondary metrics are separate families.")
    _singles_lines(singles, cfg, label, lines, table)
    for f in flags or []:
        lines.append(f"Flag: {METHOD_LABEL.get(f['method'], f['method'])} random draw {f['localizer']} {f['issue']} "
                     f"({f['heads']}).")
    opt, iti = outcomes.get("optimal"), outcomes.get("iti")
    if opt is None:
        headline = ("Verdict pending: the optimal-edit comparison (top-K vs random draws) is not finished, and it is "
                    "the one that can show whether editing gives evidence for localization.")
        if iti == "evidence for":
            headline += " So far only the heuristic ITI edit makes the candidate heads look special."
    elif opt == "evidence for":
        headline = (f"Edit-based evidence for localization: yes. Under the optimal edit the {K} heads beat random "
                    f"locations on {label}.")
        if any(r.get("n_single_matching_full") for r in table if r.get("method") == "optimal"):
            headline += " But single heads match full alignment, so no location is unique."
    elif opt == "evidence against":
        headline = (f"Edit-based evidence for localization: none. Under the optimal edit, random heads are as "
                    f"effective as the {K} heads on {label} (equivalent within ±{cfg.margin:.0%} of full "
                    "alignment's gain)")
        headline += (", although the heuristic ITI edit made the candidate look special: that contrast is an artefact of "
                     "the sub-optimal edit, as in Wang & Veitch (2025)." if iti == "evidence for" else ".")
    elif opt == "no signal":
        headline = (f"Edit-based evidence for localization: no signal. Under the optimal edit, {label} does not "
                    "respond measurably, so the comparison cannot speak to localization.")
    else:
        r = head[head["method"] == "optimal"].iloc[0].to_dict()
        headline = (f"Edit-based evidence for localization: inconclusive. Under the optimal edit the {K} heads are "
                    f"neither shown better than random locations on {label} nor equivalent to them. To decide: "
                    f"{decide_hint(r, cfg, floors, order.index('optimal'))}.")
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


# ---------------------------------------------------------------------------------------------- design
def design(spec: Any, observed: pd.DataFrame | None = None, n_questions: int | None = None,
           timings: dict[str, float] | None = None, counts: dict[str, int] | None = None) -> dict:
    """Power and design checks of a study before (or while) it runs: per comparison, the smallest reachable
    p-value, the family's threshold, the effect detectable with the target power, equivalence power, an
    estimated cost per trial kind, and warnings when the design cannot support a verdict. `observed`
    (a comparisons table) replaces the assumed spread where it has numbers."""
    cfg: VerdictSpec = spec.verdict
    R = spec.localizers.random
    n_all = len(R.draw_seeds())
    methods = []
    if spec.optimal.enabled and "random" in spec.optimal.localizers and "top" in spec.optimal.localizers:
        methods.append(("optimal", n_all))
    if spec.iti.enabled and "random" in spec.iti.localizers and "top" in spec.iti.localizers:
        methods.append(("iti", min(n_all, R.iti_n) if R.iti_n is not None else n_all))
    floors = [S.rank_floor(n) for _, n in methods]
    member = S.tarone_family(floors, cfg.alpha) if methods else np.array([], dtype=bool)
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
        g_obs, sd_obs, se_obs = _finite(o.get("gain")), _finite(o.get("random_sd")), _finite(o.get("se_questions"))
        gain = g_obs if g_obs and g_obs > 0 and o.get("gain_measurable") is True else cfg.assumed_gain
        sd = sd_obs if sd_obs else cfg.assumed_location_sd * gain
        se_q = se_obs if se_obs else (cfg.assumed_question_sd / math.sqrt(nq) if nq else float("nan"))
        shift = S.detectable_shift(n, thr, cfg.power) if inc else float("inf")
        mabs = cfg.margin * gain
        se_eq = math.sqrt(sd ** 2 / max(n, 1) + (se_q if math.isfinite(se_q) else 0.0) ** 2)
        eq_power = S.equivalence_power(mabs, se_eq, cfg.alpha) if n > 1 else 0.0
        c = {"method": method, "n_random": n, "p_floor": f, "in_family": bool(inc), "threshold": thr if inc else None,
             "can_reach_alpha": bool(inc), "draws_needed_for_floor": _draws_to_join(floors, len(out["comparisons"]), cfg.alpha),
             "detectable_shift_sd": shift, "detectable_effect": shift * sd if math.isfinite(shift) else None,
             "detectable_gain_fraction": shift * sd / gain if math.isfinite(shift) else None,
             "spread": "observed" if sd_obs else "assumed", "random_sd": sd, "gain": gain, "se_questions": se_q,
             "margin_abs": mabs, "equivalence_power": eq_power}
        need = equivalence_needs(sd, n, se_q if math.isfinite(se_q) else 0.0, nq, mabs, cfg.alpha, cfg.power)
        c.update(draws_for_equivalence=need["draws_only"], questions_for_equivalence=need["questions_only"],
                 draws_and_questions_for_equivalence=list(need["both"]), equivalence_needs=need["text"])
        out["comparisons"].append(c)
        if not inc:
            out["warnings"].append(
                f"{method}: {n} random draws give a rank p-value floor of {f:.3g}: in a family corrected by "
                f"{cfg.multiplicity} at {cfg.alpha:g} this comparison cannot show evidence for localization (needs >= "
                f"{c['draws_needed_for_floor']} draws).")
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
        out["cost"][kind] = {"trials": n, "mean_wall_s": t, "total_wall_s": t * n if t is not None else None}
    return out


def _draws_to_join(floors: list[float], i: int, alpha: float, max_n: int = 100000) -> int:
    """The fewest draws with which comparison i is in the Tarone family (others unchanged)."""
    n = S.draws_for_floor(alpha)
    while n < max_n:
        f = list(floors)
        f[i] = S.rank_floor(n)
        if S.tarone_family(f, alpha)[i]:
            return n
        n += 1
    return max_n


def design_text(d: dict) -> list[str]:
    """The design checks as lines for the terminal."""
    lines = [f"Design (alpha {d['alpha']:g}, {d['multiplicity']}, family of {d['family_size']} rank test(s), "
             f"margin ±{d['margin']:.0%} of full alignment's gain, {d['n_questions'] or '?'} test questions):"]
    for c in d["comparisons"]:
        det = (f"detects a candidate {c['detectable_shift_sd']:.2f} sd above the draws ({c['detectable_effect']:.3g}, "
               f"{c['detectable_gain_fraction']:.0%} of the gain) with {d['power']:.0%} power"
               if c["detectable_effect"] is not None else f"cannot reach {d['alpha']:g} (needs "
               f"{c['draws_needed_for_floor']} draws)")
        lines.append(f"  {c['method']}: {c['n_random']} draws, smallest p {c['p_floor']:.3g}"
                     f"{', threshold ' + format(c['threshold'], '.3g') if c['threshold'] else ''}; {det}; "
                     f"equivalence power {c['equivalence_power']:.0%} ({c['spread']} spread: sd {c['random_sd']:.3g}, "
                     f"question SE {c['se_questions']:.3g})")
    for kind, c in d["cost"].items():
        lines.append(f"  cost {kind}: {c['trials']} trials" + (f" x {c['mean_wall_s']:.0f} s = {c['total_wall_s'] / 60:.1f} min"
                                                                if c["mean_wall_s"] is not None else " (not measured yet)"))
    lines += [f"WARNING: {w}" for w in d["warnings"]]
    return lines


def to_jsonable(x: Any) -> Any:
    """Frames and records to strict-JSON-ready values (see io.strict_json)."""
    from locaudit.io import strict_json

    if isinstance(x, pd.DataFrame):
        return strict_json(json.loads(x.to_json(orient="records")))
    return strict_json(x)
