"""Several localizers in one study: each one's verdict side by side, and how much they agree.

A study may propose candidate locations with several localizers (the probe, activation patching,
attribution patching). Every candidate's top-K set is edited like the probe's and compared with the
SAME random draws, full alignment and unedited model (`analysis.for_candidate`). Each candidate's own
comparison family is corrected as usual (Holm / BH over methods); the headline p-values of the optimal
edit are corrected once more across candidates (Holm), since asking "is any localizer special?" is one
more family. Agreement between localizers (Jaccard of top-K sets, Spearman over all heads) is set
against what two random K-sets / rankings give (hypergeometric and Monte-Carlo nulls).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from locaudit.study.analysis import analyze, candidates, for_candidate, primary_metric, verdict
from locaudit.study.spec import VerdictSpec
from locaudit.study.stats import adjust_pvalues

log = logging.getLogger(__name__)


def rankings_of_run(run_dir: Path, rows: list[dict], probe=None, notes: list[str] | None = None) -> dict[str, dict]:
    """{localizer: {"ranking": [(l, h), ...] best first, "shape": (L, H), "top_k": K}} for the probe and every
    finished causal localizer trial of a run; an unreadable folder is skipped and named in `notes`."""
    out: dict[str, dict] = {}
    if probe is not None:
        out["probe"] = {"ranking": probe.ranking(), "shape": tuple(probe.val_acc.shape),
                        "top_k": int(probe.meta.get("top_k", 16))}
    for r in rows:
        if r["kind"] != "localize" or r["status"] != "done" or not (r.get("artifacts") or {}).get("localize"):
            continue
        content = (r.get("spec") or {}).get("content", {})
        path = run_dir / r["artifacts"]["localize"]
        try:
            from locaudit.localize.effects import HeadEffects

            eff = HeadEffects.load(path)
        except Exception as e:  # a report never fails on a damaged artifact, but says so
            msg = f"localizer {content.get('method')}: folder {path} is unreadable ({type(e).__name__}: {str(e)[:200]})"
            log.warning(msg)
            if notes is not None:
                notes.append(msg)
            continue
        out[str(content.get("method", path.name))] = {
            "ranking": eff.ranking(), "shape": eff.shape, "effects": eff,
            "top_k": int((content.get("config") or {}).get("top_k", 16))}
    return out


def side_by_side(res: pd.DataFrame, perq: dict | None, cfg: VerdictSpec, rankings: dict[str, dict],
                 n_resamples: int = 4999, max_overlap: float | None = 0.5) -> tuple[list[dict], dict[str, Any]]:
    """One row per (candidate localizer, method) with its outcome on the primary metric, and each
    candidate's verdict (headline and lines). Empty when the study has a single candidate."""
    cands = candidates(res)
    if len(cands) < 2:
        return [], {}
    rows: list[dict] = []
    verdicts: dict[str, Any] = {}
    for c in cands:
        k = (rankings.get(c) or {}).get("top_k")
        sub = for_candidate(res, c)
        rk = (rankings.get(c) or {}).get("ranking")
        a = analyze(res, perq, cfg, rk, n_resamples=n_resamples, max_overlap=max_overlap, top_k=k, candidate=c)
        v = verdict(sub, a.comparisons, a.singles, cfg, top_k=k, flags=a.flags, selection=a.selection)
        verdicts[c] = {"headline": v.headline, "outcome": v.outcome, "lines": v.lines}
        primary = primary_metric(sub, cfg.primary_metric)
        comp = a.comparisons
        if comp.empty or primary is None:
            continue
        head = comp[(comp["scope"] == "selected") & (comp["metric"] == primary)]
        for _, r in head.iterrows():
            rows.append({"localizer": c, "top_k": k, "method": r["method"], "metric": primary,
                         "outcome": r["outcome"], "candidate_mean": r.get("candidate_mean"),
                         "random_mean": r.get("random_mean"), "n_random": r.get("n_random"),
                         "percentile": r.get("percentile"), "p_rank": r.get("p_rank"),
                         "p_rank_adj": r.get("p_rank_adj"), "tost_p_adj": r.get("tost_p_adj"),
                         "diff": r.get("diff"), "ci_low": r.get("ci_low"), "ci_high": r.get("ci_high")})
    for method in {r["method"] for r in rows}:  # one more family: the same method across localizers
        idx = [i for i, r in enumerate(rows) if r["method"] == method and pd.notna(r["p_rank"])]
        if len(idx) > 1:
            adj = adjust_pvalues([float(rows[i]["p_rank"]) for i in idx], "holm")
            for i, p in zip(idx, adj):
                rows[i]["p_rank_adj_across_localizers"] = float(p)
    return rows, verdicts


def agreement_rows(rankings: dict[str, dict], null_draws: int = 2000, seed: int = 0) -> list[dict]:
    """Agreement between every pair of localizers at the smaller of their K, with the random-pair nulls."""
    from locaudit.localize.agreement import agreement

    names = [n for n in rankings if rankings[n].get("ranking")]
    out = []
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            a, b = rankings[names[i]], rankings[names[j]]
            if tuple(a["shape"]) != tuple(b["shape"]):
                continue
            k = min(int(a["top_k"]), int(b["top_k"]))
            r = agreement(a["ranking"], b["ranking"], k, tuple(a["shape"]), null_draws=null_draws, seed=seed)
            nul = r["null"]
            out.append({"a": names[i], "b": names[j], "k": k, "overlap": r["overlap"], "jaccard": r["jaccard"],
                        "jaccard_random_mean": nul["jaccard_mean"], "jaccard_random_q95": nul["jaccard_q95"],
                        "p_jaccard": r["p_jaccard"], "spearman": r["spearman"],
                        "spearman_random_q95": nul.get("mc_spearman_q95"), "p_spearman": r["p_spearman"]})
    return out
