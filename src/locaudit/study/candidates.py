"""Several localizers in one study: each one's verdict side by side, and how much they agree.

A study may propose candidate locations with several localizers (the probe, activation patching,
attribution patching). Every candidate's top-K set is edited like the probe's and compared with the
SAME random draws, full alignment and unedited model (`analysis.for_candidate`). Tested against the same
null, the localizers form one family, by serial gatekeeping: the primary localizer (the probe) first, in its
own headline family; the others only when it passes all its tests, together in one family (`side_by_side`). Agreement between localizers (Jaccard of top-K sets, Spearman over all heads) is set
against what two random K-sets / rankings give (hypergeometric and Monte-Carlo nulls); each causal localizer's
top-K stability between disjoint halves of its pairs (`stability_rows`) says how far its own ranking can be trusted.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from locaudit.errors import ConfigError
from locaudit.study.analysis import analyze, candidates, for_candidate, primary_metric, verdict
from locaudit.study.spec import ProbeSpec, StudySpec, VerdictSpec
from locaudit.study.stats import gatekeeping

log = logging.getLogger(__name__)


def _top_k(study: StudySpec | None, localizer: str, recorded: Any) -> int:
    """K of a localizer's candidate set: the run's StudySpec's (StudySpec.top_k_of), else the K its result recorded
    (a localize trial's config always holds top_k), else the probe's default."""
    if study is not None:
        try:
            return study.top_k_of(localizer)
        except ConfigError:  # a localizer the run's spec no longer enables: the K its trial ran with
            pass
    return int(recorded) if recorded is not None else ProbeSpec().top_k


def rankings_of_run(run_dir: Path, rows: list[dict], probe=None, notes: list[str] | None = None,
                    study: StudySpec | None = None) -> dict[str, dict]:
    """{localizer: {"ranking": [(l, h), ...] best first, "shape": (L, H), "top_k": K}} for the probe and every
    finished causal localizer trial of a run (K from the run's `study` spec); an unreadable folder is skipped and
    named in `notes`."""
    out: dict[str, dict] = {}
    if probe is not None:
        out["probe"] = {"ranking": probe.ranking(), "shape": tuple(probe.val_acc.shape),
                        "top_k": _top_k(study, "probe", probe.meta.get("top_k"))}
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
        name = str(content.get("method", path.name))
        out[name] = {"ranking": eff.ranking(), "shape": eff.shape, "effects": eff,
                     "top_k": _top_k(study, name, (content.get("config") or {}).get("top_k"))}
    return out


STABILITY_KEY = ["localizer", "k", "n_pairs", "half_pairs", "overlap", "chance", "jaccard", "spearman"]


def stability_rows(rankings: dict[str, dict]) -> list[dict]:
    """Each causal localizer's top-K stability between two disjoint halves of its pairs (localize/stability.py,
    the result's meta["stability"]): overlap of the halves' top-K sets (with its chance level K / heads), Jaccard,
    Spearman over all heads, the full sample's top-K and its layer histogram. A localizer whose result has none
    (results of older versions; fewer than 2 pairs; no per-pair effects) gets a row with a note."""
    out = []
    for name, r in rankings.items():
        eff = r.get("effects")
        if eff is None:  # the probe: no pair halves
            continue
        st = eff.meta.get("stability")
        if not isinstance(st, dict) or "overlap" not in st:
            note = st.get("note") if isinstance(st, dict) else None
            out.append({"localizer": name, "note": note or "no stability in this result (computed from localizer "
                        "version 2 on, with the per-pair effects kept)"})
            continue
        out.append({"localizer": name, **{k: st.get(k) for k in STABILITY_KEY[1:]},
                    "top_all": " ".join(st.get("top_all") or []), "top_a": " ".join(st.get("top_a") or []),
                    "top_b": " ".join(st.get("top_b") or []),
                    "layer_hist": " ".join(f"L{l}:{c}" for l, c in enumerate((st.get("layer_hist") or {}).get("all")
                                                                              or []) if c),
                    "seed": st.get("seed"), "rank_by": st.get("rank_by")})
    return out


def side_by_side(res: pd.DataFrame, perq: dict | None, cfg: VerdictSpec, rankings: dict[str, dict],
                 n_resamples: int = 4999, max_overlap: float | None = 0.5) -> tuple[list[dict], dict[str, Any]]:
    """One row per (candidate localizer, method) with its outcome on the primary metric, and each
    candidate's verdict (headline and lines). Empty when the study has a single candidate.

    The localizers form one family by serial gatekeeping (stats.gatekeeping): the primary localizer (the
    probe, else the first) is decided in its own headline family; only when all of its tests there reject
    are the other localizers' tests decided, together, by the study's multiplicity rule with the discrete
    restriction. A test that fails this family is at most "inconclusive"."""
    cands = candidates(res)
    if len(cands) < 2:
        return [], {}
    rows: list[dict] = []
    runs: dict[str, tuple] = {}
    for c in cands:
        k = (rankings.get(c) or {}).get("top_k")
        rk = (rankings.get(c) or {}).get("ranking")
        a = analyze(res, perq, cfg, rk, n_resamples=n_resamples, max_overlap=max_overlap, top_k=k, candidate=c)
        sub = for_candidate(res, c)
        runs[c] = (a, sub, k)
        primary = primary_metric(sub, cfg.primary_metric)
        comp = a.comparisons
        if comp.empty or primary is None:
            continue
        head = comp[(comp["scope"] == "selected") & (comp["metric"] == primary)]
        for _, r in head.iterrows():
            rows.append({"localizer": c, "primary_localizer": c == cands[0], "top_k": k, "method": r["method"],
                         "metric": primary, "outcome": r["outcome"], "own_family_outcome": r["outcome"],
                         "candidate_mean": r.get("candidate_mean"), "random_mean": r.get("random_mean"),
                         "n_random": r.get("n_random"), "percentile": r.get("percentile"), "p_rank": r.get("p_rank"),
                         "p_floor": r.get("p_floor"), "p_mean": r.get("p_mean"), "p_combined": r.get("p_combined"),
                         "p_combined_adj": r.get("p_combined_adj") if r.get("in_family") else float("nan"),
                         "floor_fragile": r.get("floor_fragile"), "tost_p_adj": r.get("tost_p_adj"),
                         "diff": r.get("diff"), "ci_low": r.get("ci_low"), "ci_high": r.get("ci_high")})
    prim = [r for r in rows if r["primary_localizer"]]
    rest = [r for r in rows if not r["primary_localizer"]]
    gate, adj, member = gatekeeping([float(r["p_combined_adj"]) for r in prim],
                                    [float(r["p_combined"]) for r in rest], [float(r["p_floor"]) for r in rest],
                                    cfg.multiplicity, cfg.alpha)
    mult = {"holm": "Holm", "bh": "Benjamini-Hochberg", "none": "no correction"}[cfg.multiplicity]
    for r, a_, m_ in zip(rest, adj, member):
        r["p_adj_across_localizers"] = float(a_)
        r["in_family_across_localizers"] = bool(m_)
        if r["outcome"] in ("evidence for", "suggestive") and not (gate and m_ and a_ <= cfg.alpha):
            r["outcome"] = "inconclusive"
            r["outcome_note"] = (f"the primary localizer ({cands[0]}) did not pass all its tests, so the gate stayed "
                                 "closed" if not gate else f"not confirmed in the family across localizers ({mult}, "
                                 f"adjusted p {a_:.3g})")
    verdicts: dict[str, Any] = {}
    n_rest = len({r["localizer"] for r in rest})
    for c, (a, sub, k) in runs.items():
        note = (f"gatekeeping across {len(cands)} localizers: {c} is the primary localizer, decided first" if c == cands[0]
                else f"gatekeeping across {len(cands)} localizers: decided only if the primary localizer ({cands[0]}) "
                f"passes all its tests, then with the other {n_rest} localizer(s) in one {mult} family "
                f"(gate {'open' if gate else 'closed'})")
        v = verdict(sub, a.comparisons, a.singles, cfg, top_k=k, flags=a.flags, selection=a.selection,
                    family_note=note)
        headline, outcome = v.headline, v.outcome
        own = next((r for r in rest if r["localizer"] == c and r["method"] == "optimal" and r.get("outcome_note")), None)
        if own is not None:
            outcome = "inconclusive"
            headline = (f"Across localizers: {own['own_family_outcome']} in its own family, but {own['outcome_note']}: "
                        f"inconclusive. {headline}")
        verdicts[c] = {"headline": headline, "outcome": outcome, "lines": v.lines}
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
