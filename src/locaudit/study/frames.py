"""Ledger rows to tables: the trials and results frames, metric columns and the primary metric, the
candidate localizers of a frame, and per-question scores from each evaluation's files (docs/verdict.md).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

METHODS = ("iti", "optimal")
METHOD_LABEL = {"iti": "ITI (heuristic edit)", "optimal": "optimal edit", "baseline": "unedited"}
PRIMARY_ORDER = ("true_info", "true", "mc2", "mc1", "mc0", "ab", "pref_acc", "info")
LOWER_IS_BETTER = ("kl", "ce", "loss", "nll", "perplexity")
BASE_COLUMNS = ("key", "kind", "method", "group", "localizer", "candidate", "alpha", "tau", "lr", "seed", "status",
                "attempts", "duration_s", "cpu_s", "lost_s", "lost_unknown", "heads", "edit_dir", "eval_dir", "precision", "cpu_capability",
                "error", "of")
OUTCOMES = ("evidence for", "suggestive", "evidence against", "inconclusive", "no signal")
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
             "lost_s": r.get("lost_s", 0.0), "lost_unknown": r.get("lost_unknown", 0),
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


def by_localizer(sub: pd.DataFrame, metric: str, group: str) -> tuple[list[float], list[str]]:
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


def question_half(qid: str) -> int:
    return int(hashlib.sha256(qid.encode()).hexdigest()[:8], 16) % 2


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


def to_jsonable(x: Any) -> Any:
    """Frames and records to strict-JSON-ready values (see io.strict_json)."""
    from locaudit.io import strict_json

    if isinstance(x, pd.DataFrame):
        return strict_json(json.loads(x.to_json(orient="records")))
    return strict_json(x)
