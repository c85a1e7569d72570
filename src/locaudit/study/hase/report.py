"""The report of a Hase study: tables (strict JSON / CSV), figures (PNG) and one HTML page.

RUN/report/: r2.csv (R^2 of tracing / layer / both / layer*tracing and tracing's added R^2, bootstrap CIs over facts,
with the F-tests of what tracing adds to the layer, per problem and method), verdict.json (the tracing-argmax
layer against a null that keeps each layer's mean: permutation of tracing curves across facts and the
leave-one-fact-out layer-mean-removed contrast; the cross-fitted best fixed layer; per problem and method,
and the fact counts), r2_by_measure.csv (the R^2 table for each of Hase's success measures: rewrite, paraphrase
where the facts have paraphrases, neighbourhood, combined), r2_by_tracing.csv (with tracing.compare: the
tracing variable's reliability and R^2 under each compared setting beside the main one), edits.csv (every (fact, layer) edit), tracing_heatmap_<kind>.png, success_by_layer.png,
scatter_<problem>_<method>.png, index.html. Rebuilt from the ledger at any time (also mid-study).
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from locaudit.io import write_json_atomic, write_text_atomic
from locaudit.study.hase.analysis import MEASURES, argmax_vs_random, measure_r2, regressions
from locaudit.study.hase.run import META_KEY, read_data
from locaudit.study.hase.spec import HaseSpec
from locaudit.study.ledger import Ledger

log = logging.getLogger(__name__)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def collect(run_dir: Path) -> tuple[HaseSpec, dict | None, dict | None, pd.DataFrame, dict]:
    """(spec, facts data, tracing data, edits frame, ledger counts) of a run folder."""
    with Ledger(run_dir) as ledger:
        spec = HaseSpec.model_validate(ledger.get_meta(META_KEY))
        rows = ledger.rows(status="done")
        counts = ledger.counts()
    facts = tracing = None
    edits = []
    for r in rows:
        if r["kind"] == "hase_facts":
            facts = read_data(run_dir, r["key"], "facts.json")
        elif r["kind"] == "hase_trace":
            tracing = read_data(run_dir, r["key"], "tracing.json")
        elif r["kind"] == "hase_edit":
            edits += read_data(run_dir, r["key"], "edits.json")
    return spec, facts, tracing, pd.DataFrame(edits), counts


def finite_rows(d: pd.DataFrame, what: str) -> tuple[pd.DataFrame, dict[str, int]]:
    """The rows of `d` (fact, layer, tracing, success) with a finite tracing effect and success, and the counts of
    those left out: rows, and facts left with no row (a fact whose tracing is NaN at every layer: no corrupted run,
    as under symmetric replacement without a partner, or a one-token subject at a clean position 0). A warning
    names the counts."""
    ok = np.isfinite(d["tracing"].to_numpy(dtype=float)) & np.isfinite(d["success"].to_numpy(dtype=float))
    kept = d[ok]
    counts = {"n_rows_skipped": int((~ok).sum()),
              "n_facts_skipped": int(d["fact"].nunique() - kept["fact"].nunique())}
    if counts["n_rows_skipped"]:
        log.warning("%s: %d of %d (fact, layer) rows have no finite tracing effect or success and are left out of "
                    "the analysis (%d fact(s) entirely)", what, counts["n_rows_skipped"], len(d),
                    counts["n_facts_skipped"])
    return kept, counts


def analyze(spec: HaseSpec, df: pd.DataFrame) -> tuple[pd.DataFrame, list[dict]]:
    """The R^2 table and the verdicts, per (problem, method)."""
    kind = spec.tracing_kind(spec.editing.config(spec.editing.methods[0]).site)
    A = spec.analysis
    tables, verdicts = [], []
    if df.empty:
        return pd.DataFrame(), verdicts
    for (problem, method), g in df.groupby(["problem", "method"], sort=True):
        col = f"tracing_{kind}"
        if col not in g:
            continue
        d = pd.DataFrame({"fact": g["fact"], "layer": g["layer"], "tracing": pd.to_numeric(g[col], errors="coerce"),
                          "success": pd.to_numeric(g[A.success], errors="coerce")})
        d, skipped = finite_rows(d, f"{problem} {method}")
        if d["layer"].nunique() < 2 or d["fact"].nunique() < 3:
            continue
        res = regressions(d, A.bootstrap, A.seed)
        for row in res.rows():
            tables.append({"problem": problem, "method": method, "tracing_kind": kind, "success": A.success, **row})
        v = argmax_vs_random(d, A.bootstrap, A.alpha, A.margin, A.seed, n_perm=A.permutations)
        verdicts.append({"problem": problem, "method": method, "tracing_kind": kind, "success": A.success, **v,
                         **skipped})
    return pd.DataFrame(tables), verdicts


NO_PARAPHRASES = ("No paraphrase score: the facts carry no paraphrase prompts (ROME's known_1000 has none; CounterFact, "
                  "which has them, is not in the data root). Generalisation is not measured.")


def measure_tables(spec: HaseSpec, df: pd.DataFrame) -> pd.DataFrame:
    """Hase's R^2 table per success measure (rewrite, paraphrase, neighbourhood, combined), per (problem, method)."""
    if df.empty:
        return pd.DataFrame()
    kind = spec.tracing_kind(spec.editing.config(spec.editing.methods[0]).site)
    A, out = spec.analysis, []
    for (problem, method), g in df.groupby(["problem", "method"], sort=True):
        t = measure_r2(g, f"tracing_{kind}", MEASURES, A.bootstrap, A.seed)
        if not t.empty:
            t.insert(0, "method", method)
            t.insert(0, "problem", problem)
            t.insert(3, "tracing_kind", kind)
            out.append(t)
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()


def measure_summary(mt: pd.DataFrame) -> pd.DataFrame:
    """One row per (problem, method, measure): each model's R^2, tracing's added R^2 over the layer with its CI,
    and the interaction F-test's p (the report's compact view of `measure_tables`)."""
    if mt.empty:
        return mt
    rows = []
    for (problem, method, measure), g in mt.groupby(["problem", "method", "measure"], sort=False):
        r = g.set_index("model")
        ai = r.loc["added_interaction"]
        rows.append({"problem": problem, "method": method, "measure": measure, "n_rows": int(ai["n_rows"]),
                     **{f"r2_{m}": float(r.loc[m, "r2"]) for m in ("tracing", "layer", "both", "interaction")},
                     "added_tracing": float(r.loc["added_tracing", "r2"]),
                     "added_interaction": float(ai["r2"]), "added_ci_low": float(ai["ci_low"]),
                     "added_ci_high": float(ai["ci_high"]), "F_p_interaction": float(ai["F_p"])})
    return pd.DataFrame(rows)


def variant_tables(spec: HaseSpec, tracing: dict | None, df: pd.DataFrame) -> pd.DataFrame:
    """The tracing variable under each of tracing.compare's settings beside the main one, per (problem, method):
    its split-half reliability (Spearman-Brown), R^2 alone, added R^2 over the layer (layer * tracing) with its
    bootstrap CI and F-test p, and the mean corrupted probability. Empty without compare."""
    if df.empty or not tracing or not tracing.get("compare"):
        return pd.DataFrame()
    kind = spec.tracing_kind(spec.editing.config(spec.editing.methods[0]).site)
    A, out = spec.analysis, []
    main = {"settings": {}, "reliability": tracing.get("reliability", {}), "facts": tracing["facts"]}
    for name, v in [("main", main)] + [(json.dumps(c["settings"], sort_keys=True), c) for c in tracing["compare"]]:
        eff = {(fid, int(l)): e for fid, t in v["facts"].items() for l, e in enumerate(t["effects"].get(kind, []))}
        pc = [t["p_corrupt"] for t in v["facts"].values()  # null (NaN): no corrupted run (str without a partner)
              if isinstance(t["p_corrupt"], (int, float)) and t["p_corrupt"] == t["p_corrupt"]]
        rel = v["reliability"].get(kind, {})
        for (problem, method), g in df.groupby(["problem", "method"], sort=True):
            d = pd.DataFrame({"fact": g["fact"], "layer": g["layer"], "success": g[A.success],
                              "tracing": [eff.get((str(f), int(l)), float("nan")) for f, l in zip(g["fact"], g["layer"])]})
            d = d.dropna(subset=["success", "tracing"])
            if d.empty or d["layer"].nunique() < 2 or d["fact"].nunique() < 3:
                continue
            r = {x["model"]: x for x in regressions(d, A.bootstrap, A.seed).rows()}
            ai = r["added_interaction"]
            out.append({"problem": problem, "method": method, "tracing": name, "tracing_kind": kind,
                        "n_facts": int(d["fact"].nunique()), "reliability_sb": rel.get("spearman_brown", float("nan")),
                        "mean_p_corrupt": float(np.mean(pc)) if pc else float("nan"),
                        "r2_tracing": r["tracing"]["r2"], "added_interaction": ai["r2"], "added_ci_low": ai["ci_low"],
                        "added_ci_high": ai["ci_high"], "F_p_interaction": ai["F_p"]})
    return pd.DataFrame(out)


def _figures(spec: HaseSpec, tracing: dict | None, df: pd.DataFrame, out: Path) -> list[str]:
    from locaudit.localize.tracing import CATEGORIES, TracedFact, category_heatmap

    plt = _plt()
    figs = []
    if tracing and tracing.get("facts"):
        traced = [TracedFact(v["p_clean"], v["p_corrupt"], v["effects"], tuple(v["subject"]), v["n_tokens"],
                             v["noise_top"], v["grid"], v.get("halves", {}), v.get("pos0_noised", False))
                  for v in tracing["facts"].values()]
        for kind in spec.tracing.kinds:
            if not any(kind in t.grid for t in traced):
                continue
            H = category_heatmap(traced, kind).numpy()
            fig, ax = plt.subplots(figsize=(7, 3.2))
            im = ax.imshow(H.T, aspect="auto", cmap={"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}[kind])
            ax.set_yticks(range(len(CATEGORIES)), CATEGORIES, fontsize=7)
            ax.set_xlabel("layer")
            n = sum(kind in t.grid for t in traced)
            ax.set_title(f"causal tracing ({kind}), mean effect over {n} facts")
            fig.colorbar(im, ax=ax)
            fig.tight_layout()
            name = f"tracing_heatmap_{kind}.png"
            fig.savefig(out / name, dpi=110)
            plt.close(fig)
            figs.append(name)
        layers = tracing["layers"]
        fig, ax = plt.subplots(figsize=(6, 3))
        for kind in spec.tracing.kinds:
            m = np.nanmean([[v["effects"][kind][l] for l in layers] for v in tracing["facts"].values()], axis=0)
            ax.plot(layers, m, marker="o", label=kind)
        ax.set_xlabel("layer")
        ax.set_ylabel("tracing effect (last subject token)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "tracing_by_layer.png", dpi=110)
        plt.close(fig)
        figs.append("tracing_by_layer.png")
    if not df.empty:
        A = spec.analysis
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for (problem, method), g in df.groupby(["problem", "method"]):
            s = g.groupby("layer")[A.success].agg(["mean", "sem"])
            ax.errorbar(s.index, s["mean"], yerr=1.96 * s["sem"].fillna(0), marker="o", capsize=2,
                        label=f"{problem} / {method}")
        ax.set_xlabel("edited layer")
        ax.set_ylabel(A.success)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "success_by_layer.png", dpi=110)
        plt.close(fig)
        figs.append("success_by_layer.png")
        kind = spec.tracing_kind(spec.editing.config(spec.editing.methods[0]).site)
        for (problem, method), g in df.groupby(["problem", "method"]):
            col = f"tracing_{kind}"
            if col not in g:
                continue
            fig, ax = plt.subplots(figsize=(4.5, 3.5))
            sc = ax.scatter(g[col], g[A.success], c=g["layer"], s=8, cmap="viridis")
            fig.colorbar(sc, ax=ax, label="layer")
            ax.set_xlabel(f"tracing effect ({kind}) at the edited layer")
            ax.set_ylabel(A.success)
            ax.set_title(f"{problem} / {method}", fontsize=9)
            fig.tight_layout()
            name = f"scatter_{problem}_{method}.png"
            fig.savefig(out / name, dpi=110)
            plt.close(fig)
            figs.append(name)
    return figs


def _tracing_summary(tracing: dict | None) -> dict:
    """The tracing variable's definition, its split-half reliability per kind (the ceiling on the R^2 it can
    reach) and the position-0 summary; recomputed from the halves for runs traced before these were stored."""
    if not tracing:
        return {}
    from locaudit.localize.tracing import TracedFact, split_half_reliability

    rel = tracing.get("reliability")
    if rel is None:
        traced = [TracedFact(v["p_clean"], v["p_corrupt"], v["effects"], tuple(v["subject"]), v["n_tokens"],
                             halves=v.get("halves", {})) for v in tracing["facts"].values()]
        kinds = sorted({k for v in tracing["facts"].values() for k in v["effects"]})
        rel = {k: split_half_reliability(traced, k) for k in kinds}
    return {"measure": tracing.get("measure", "diff"), "noise_from": tracing.get("noise_from", "embedding"),
            "clean_pos0": tracing.get("clean_pos0", False), "corruption": tracing.get("corruption", "noise"),
            "reliability": rel, "position0": tracing.get("position0", {}),
            "compare": [{k: c[k] for k in ("settings", "n_retraced", "reliability", "position0")}
                        for c in tracing.get("compare", [])]}


def position0_text(ts: dict) -> str:
    """What the study did with position 0 and what that changes, in words (from the position-0 summary of the main
    tracing and, where tracing.compare flips clean_pos0, of that variant)."""
    p0 = ts.get("position0") or {}
    if not p0:
        return ""
    if ts.get("clean_pos0"):
        s = (f"kept clean: {p0.get('n_clean')} facts traced with it clean, of which {p0.get('n_nothing_noised', 0)} "
             "have a one-token subject at position 0 (nothing noised, no tracing value).")
    else:
        s = (f"noised with the subject: {p0.get('n_noised')} facts had position 0 noised (mean p drop "
             f"{_f(p0.get('mean_p_drop_noised'))} vs {_f(p0.get('mean_p_drop_clean'))} for the "
             f"{p0.get('n_clean')} whose subject starts later).")
    flip = [c for c in ts.get("compare", []) if set(c.get("settings", {})) == {"clean_pos0"}]
    for c in flip:
        q = c.get("position0", {})
        s += (f" Traced again with clean_pos0 = {c['settings']['clean_pos0']} ({c.get('n_retraced')} facts re-traced): "
              f"{q.get('n_noised')} facts with position 0 noised, mean p drop {_f(q.get('mean_p_drop_noised'))}; "
              "its reliability and R^2 are in the tracing-settings table.")
    if not flip:
        s += (" Its effect on R^2 was not measured in this study; to measure it, add tracing.compare: [{clean_pos0: "
              + str(not ts.get("clean_pos0")).lower() + "}].")
    return s


def edit_norms(df: pd.DataFrame) -> list[dict]:
    """||dW||_F / ||W||_F of the edits, per (problem, method): mean, median, max and the count."""
    if df.empty or "dw_rel_norm" not in df:
        return []
    out = []
    for (problem, method), g in df.groupby(["problem", "method"], sort=True):
        x = g["dw_rel_norm"].dropna().to_numpy(dtype=float)
        if x.size:
            out.append({"problem": problem, "method": method, "n": int(x.size), "mean": float(x.mean()),
                        "median": float(np.median(x)), "max": float(x.max())})
    return out


def _f(x, fmt: str = ".3f") -> str:
    return format(x, fmt) if isinstance(x, (int, float)) and np.isfinite(x) else "n/a"


def _verdict_numbers(v: dict) -> str:
    """The numbers behind a verdict, in one sentence (empty when there was no test)."""
    if "p_perm" not in v:
        return ""
    ci = v.get("theta_ci") or [float("nan")] * 2
    return (f" theta = {_f(v['theta'])} (90% CI [{_f(ci[0])}, {_f(ci[1])}]), contrast p = {_f(v['p_contrast'], '.3g')}, "
            f"permutation p = {_f(v['p_perm'], '.3g')} ({v['n_perm']} permutations), TOST p = {_f(v['tost_p'], '.3g')}. "
            f"Mean success: tracing's layer {_f(v['mean_success_argmax'])}, with another fact's tracing curve "
            f"{_f(v['mean_success_permuted'])}, the mean over layers {_f(v['mean_success_random'])}, the cross-fitted "
            f"best fixed layer {_f(v['mean_success_best_fixed'])}, each fact's best layer {_f(v['mean_success_best'])}.")


def _table_html(df: pd.DataFrame) -> str:
    if df.empty:
        return "<p>(no rows yet)</p>"
    return df.to_html(index=False, float_format=lambda x: f"{x:.3f}", escape=True, border=0)


def build_report(run_dir: str | Path) -> Path:
    """Write RUN/report/ from the ledger; returns the index.html path."""
    run_dir = Path(run_dir)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    spec, facts, tracing, df, counts = collect(run_dir)
    table, verdicts = analyze(spec, df)
    if not df.empty:
        write_text_atomic(out / "edits.csv", df.to_csv(index=False))
    write_text_atomic(out / "r2.csv", table.to_csv(index=False) if not table.empty else "")
    mt = measure_tables(spec, df)
    write_text_atomic(out / "r2_by_measure.csv", mt.to_csv(index=False) if not mt.empty else "")
    vt = variant_tables(spec, tracing, df)
    if not vt.empty:
        write_text_atomic(out / "r2_by_tracing.csv", vt.to_csv(index=False))
    has_para = "paraphrase_score" in df and df["paraphrase_score"].notna().any()
    fact_counts = facts["counts"] if facts else {}
    write_json_atomic(out / "verdict.json", {"facts": fact_counts, "known_top_k": facts and facts["known_top_k"],
                                             "verdicts": verdicts, "r2": table.to_dict("records"),
                                             "r2_by_measure": measure_summary(mt).to_dict("records"),
                                             "paraphrases": bool(has_para),
                                             "edit_norms": edit_norms(df),
                                             "r2_by_tracing": vt.to_dict("records"),
                                             "tracing": _tracing_summary(tracing),
                                             "trials": counts})
    figs = _figures(spec, tracing, df, out)
    e = html.escape
    parts = [f"<html><head><meta charset='utf-8'><title>{e(spec.name)}</title></head><body>",
             f"<h1>{e(spec.name)}: does localization inform editing?</h1>", f"<p>{e(spec.description)}</p>",
             f"<p>model {e(spec.model.name)}, precision {e(spec.resolved_precision())}; trials "
             f"{e(json.dumps(counts))}</p>"]
    if fact_counts:
        parts.append(f"<p>facts: {fact_counts.get('total')} in the file, {fact_counts.get('known')} known "
                     f"(object's first token in the top-{facts['known_top_k']}), "
                     f"{fact_counts.get('with_counterfactual')} with a counterfactual object, "
                     f"{fact_counts.get('used')} studied.</p>")
    parts.append("<h2>Verdict: does the layer where a fact's tracing peaks edit that fact better than the layer's "
                 "mean success predicts?</h2><ul>")
    for v in verdicts:
        parts.append(f"<li><b>{e(v['problem'])} / {e(v['method'])}: {e(v['outcome'])}</b>. "
                     f"{e(v.get('text', v.get('reason', '')))}{e(_verdict_numbers(v))}{e(_skipped_note(v))}</li>")
    parts.append("</ul><h2>R^2 of edit success (tracing alone, layer alone, both, layer * tracing), with the "
                 "F-tests of what tracing adds to the layer</h2>")
    parts.append(_table_html(table))
    parts.append("<h2>R^2 per success measure (Hase et al.): rewrite, paraphrase (generalisation), neighbourhood "
                 "(specificity: the edit's target object must not move on other facts of the relation), and their "
                 "harmonic mean; tracing's added R^2 over the layer with its bootstrap CI over facts</h2>")
    if not has_para:
        parts.append(f"<p>{e(NO_PARAPHRASES)}</p>")
    parts.append(_table_html(measure_summary(mt)))
    ts = _tracing_summary(tracing)
    if ts:
        parts.append(f"<p>Tracing variable: {e(ts['measure'])} (corruption {e(ts['corruption'])}; noise unit: "
                     f"{e(ts['noise_from'])} std; position 0 "
                     f"{'kept clean' if ts['clean_pos0'] else 'noised when the subject starts there'}). Its split-half "
                     "reliability (two halves of the noise samples; Spearman-Brown for the full curve) bounds the R^2 "
                     "tracing can reach:</p>")
        parts.append(_table_html(pd.DataFrame(list(ts["reliability"].values()))))
        if ts["position0"]:
            parts.append(f"<p>Position 0 (the attention sink; most known_1000 subjects start there when the "
                         f"tokenizer adds no BOS): {e(position0_text(ts))}</p>")
    if not vt.empty:
        parts.append("<h2>The tracing variable under other settings (tracing.compare): reliability and R^2 beside "
                     "the main variable's</h2>")
        parts.append(_table_html(vt))
    parts.append("<h2>Size of the edits: ||dW|| / ||W|| (Frobenius) per editor</h2>")
    parts.append(_table_html(pd.DataFrame(edit_norms(df))))
    for f in figs:
        parts.append(f"<h3>{e(f)}</h3><img src='{e(f)}'>")
    parts.append("</body></html>")
    write_text_atomic(out / "index.html", "\n".join(parts))
    return out / "index.html"


def summary_text(run_dir: str | Path) -> str:
    """Plain-text R^2 table and verdicts (what the CLI prints)."""
    v = json.loads((Path(run_dir) / "report" / "verdict.json").read_text())
    lines = [f"facts: {json.dumps(v['facts'])}"]
    for r in v["r2"]:
        ftest = (f"  F = {_f(r.get('F'), '.3g')} (df {r.get('F_df_num')}, {r.get('F_df_den')}), p = {_f(r.get('F_p'), '.3g')}"
                 if r.get("F_df_num") is not None else "")
        lines.append(f"  {r['problem']:<18} {r['method']:<5} R2[{r['model']:<17}] = {_f(r['r2'])} "
                     f"[{_f(r['ci_low'])}, {_f(r['ci_high'])}]{ftest}")
    for r in v.get("r2_by_measure", []):
        lines.append(f"  {r['problem']:<18} {r['method']:<5} {r['measure']:<23} R2 tracing {_f(r['r2_tracing'])} "
                     f"layer {_f(r['r2_layer'])} both {_f(r['r2_both'])} layer*tracing {_f(r['r2_interaction'])}; "
                     f"added {_f(r['added_interaction'])} [{_f(r['added_ci_low'])}, {_f(r['added_ci_high'])}] "
                     f"F p = {_f(r['F_p_interaction'], '.3g')}")
    if not v.get("paraphrases", True):
        lines.append("  " + NO_PARAPHRASES)
    for k, r in (v.get("tracing") or {}).get("reliability", {}).items():
        lines.append(f"  tracing[{k}] split-half r = {_f(r.get('r'))}, Spearman-Brown = {_f(r.get('spearman_brown'))} "
                     f"({r.get('n_facts')} facts)")
    for r in v.get("r2_by_tracing", []):
        lines.append(f"  {r['problem']:<18} {r['method']:<5} tracing {r['tracing']:<28} reliability "
                     f"{_f(r['reliability_sb'])} R2 {_f(r['r2_tracing'])} added {_f(r['added_interaction'])} "
                     f"[{_f(r['added_ci_low'])}, {_f(r['added_ci_high'])}] F p = {_f(r['F_p_interaction'], '.3g')}")
    p0 = position0_text(v.get("tracing") or {})
    if p0:
        lines.append("  position 0: " + p0)
    for r in v.get("edit_norms", []):
        lines.append(f"  ||dW||/||W|| {r['problem']:<18} {r['method']:<5} mean {_f(r['mean'], '.3g')} "
                     f"median {_f(r['median'], '.3g')} max {_f(r['max'], '.3g')} (n={r['n']})")
    for d in v["verdicts"]:
        lines.append(f"  verdict {d['problem']} / {d['method']}: {d['outcome']} "
                     f"(theta={d.get('theta')}, p_perm={d.get('p_perm')}, p_contrast={d.get('p_contrast')}, "
                     f"tost_p={d.get('tost_p')}){_skipped_note(d)}")
    return "\n".join(lines)


def _skipped_note(v: dict) -> str:
    """The rows the analysis left out for want of a finite tracing effect or success (empty when none)."""
    n = int(v.get("n_rows_skipped") or 0)
    return (f" Left out: {n} (fact, layer) rows without a finite tracing effect or success "
            f"({int(v.get('n_facts_skipped') or 0)} facts entirely).") if n else ""


__all__ = ["build_report", "collect", "analyze", "measure_tables", "measure_summary", "summary_text"]
