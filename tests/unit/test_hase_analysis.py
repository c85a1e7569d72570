"""The Hase analysis: R^2 of tracing / layer / both equals statsmodels OLS; the bootstrap weights equal
duplicated rows; the tracing-argmax verdict on synthetic data; edit metrics; the study file; a whole tiny
study in the ledger (resume runs nothing again; the report is written)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from locaudit.evaluate.facts import efficacy, fact_metrics, rewrite_score
from locaudit.study.hase.analysis import argmax_vs_random, design, r2, r2_all, regressions

REPO = Path(__file__).resolve().parents[2]


def _synthetic(n_facts=60, layers=(0, 3, 6, 9), seed=0, tracing_signal=0.5):
    rng = np.random.default_rng(seed)
    rows = []
    layer_effect = {l: 0.2 + 0.15 * i for i, l in enumerate(layers)}
    for f in range(n_facts):
        for l in layers:
            t = rng.normal()
            rows.append({"fact": f"f{f}", "layer": l, "tracing": t,
                         "success": layer_effect[l] + tracing_signal * 0.1 * t + rng.normal(0, 0.1)})
    return pd.DataFrame(rows)


def test_r2_equals_statsmodels():
    import statsmodels.formula.api as smf

    df = _synthetic()
    layers = sorted(df["layer"].unique())
    ours = r2_all(df, layers)
    sm = {"tracing": smf.ols("success ~ tracing", df).fit().rsquared,
          "layer": smf.ols("success ~ C(layer)", df).fit().rsquared,
          "both": smf.ols("success ~ C(layer) + tracing", df).fit().rsquared}
    for k, v in sm.items():
        assert ours[k] == pytest.approx(v, abs=1e-10)
    assert ours["added_tracing"] == pytest.approx(sm["both"] - sm["layer"], abs=1e-10)
    assert ours["layer"] > 0.5 > ours["tracing"]


def test_weighted_r2_equals_duplicated_rows():
    df = _synthetic(n_facts=10)
    layers = sorted(df["layer"].unique())
    rng = np.random.default_rng(1)
    wf = rng.integers(0, 3, size=10).astype(float)
    w = wf[pd.Index([f"f{i}" for i in range(10)]).get_indexer(df["fact"])]
    dup = df.loc[df.index.repeat(w.astype(int))].reset_index(drop=True)
    y = df["success"].to_numpy()
    assert r2(y, design(df, "both", layers), w) == pytest.approx(
        r2(dup["success"].to_numpy(), design(dup, "both", layers)), abs=1e-10)


def test_regressions_bootstrap_ci_covers_estimate():
    res = regressions(_synthetic(), n_boot=200, seed=0)
    for k in ("tracing", "layer", "both", "interaction", "added_tracing", "added_interaction"):
        lo, hi = res.ci[k]
        assert lo <= res.estimate[k] + 1e-12 and res.estimate[k] <= hi + 1e-12
    assert res.n_facts == 60 and res.n_layers == 4 and res.n_rows == 240
    assert regressions(_synthetic(), n_boot=50, seed=3).ci == regressions(_synthetic(), n_boot=50, seed=3).ci


LAYERS = list(range(0, 30, 3)) + [29]
MU_S = 0.3 + 0.4 * ((np.arange(len(LAYERS)) - len(LAYERS) / 2) / (len(LAYERS) / 2)) ** 2  # U-shaped by layer


def _layer_only(n=100, seed=0):
    """Success depends on the layer only (U-shaped: early layers easy); tracing is independent of success
    but peaks early on average (the confound of issue 26)."""
    rng = np.random.default_rng(seed)
    L = len(LAYERS)
    mu_t = np.exp(-np.arange(L) / 2.0)
    rows = []
    for f in range(n):
        t, s = mu_t + rng.normal(0, 0.4, L), MU_S + rng.normal(0, 0.15, L)
        rows += [{"fact": f, "layer": l, "tracing": t[i], "success": s[i]} for i, l in enumerate(LAYERS)]
    return pd.DataFrame(rows)


def _fact_signal(n=100, seed=0):
    """The same layer profile plus a fact-level bump: success peaks where that fact's tracing peaks."""
    rng = np.random.default_rng(seed)
    L = len(LAYERS)
    rows = []
    for f in range(n):
        bump = np.exp(-np.abs(np.arange(L) - rng.integers(L)) / 1.5)
        t, s = bump + rng.normal(0, 0.2, L), MU_S + 0.3 * bump + rng.normal(0, 0.15, L)
        rows += [{"fact": f, "layer": l, "tracing": t[i], "success": s[i]} for i, l in enumerate(LAYERS)]
    return pd.DataFrame(rows)


def test_verdict_layer_only_study_is_not_evidence_for():
    v = argmax_vs_random(_layer_only(), n_boot=1000)
    # the confound is there: tracing's layer beats the mean over layers by a wide margin ...
    assert v["mean_success_argmax"] - v["mean_success_random"] > 0.15
    # ... but not the null that keeps each layer's mean
    assert v["outcome"] == "evidence against", v["text"]
    assert v["p_perm"] > 0.2 and v["p_contrast"] > 0.2 and abs(v["theta"]) < 0.1 and v["tost_p"] <= 0.05
    assert abs(v["mean_success_argmax"] - v["mean_success_permuted"]) < 0.02
    assert v["p_beats_best_fixed"] > 0.5  # the cross-fitted fixed layer does at least as well
    json.dumps(v, allow_nan=False)  # strict JSON: every number finite here


def test_verdict_fact_signal_study_is_evidence_for():
    v = argmax_vs_random(_fact_signal(), n_boot=1000)
    assert v["outcome"] == "evidence for", v["text"]
    assert v["p_perm"] <= 0.001 and v["p_contrast"] <= 0.001 and v["theta"] > 0.5
    assert v["mean_success_argmax"] - v["mean_success_permuted"] > 0.1
    # fewer facts, weaker signal: the same data can fail to decide, and a reversed signal is never "for"
    rev = _fact_signal(n=100, seed=1)
    rev["tracing"] = -rev["tracing"]
    assert argmax_vs_random(rev, n_boot=300)["outcome"] != "evidence for"


def test_verdict_same_argmax_for_every_fact_and_no_signal():
    rng = np.random.default_rng(0)
    layers = [0, 5, 10, 15]
    # tracing peaks at the layer that edits best for every fact: no fact-level information, so not "for"
    rows = []
    for f in range(300):
        for i, l in enumerate(layers):
            rows.append({"fact": f, "layer": l, "tracing": float(i == 0) + rng.normal(0, 0.05),
                         "success": 0.8 - 0.2 * i + rng.normal(0, 0.05)})
    v = argmax_vs_random(pd.DataFrame(rows), n_boot=500)
    assert v["outcome"] in ("evidence against", "inconclusive") and v["p_perm"] == 1.0
    assert v["best_layer_by_mean"] == 0 and v["crossfit_fixed_layer_counts"]["0"] == 300
    # success a function of the layer alone, without noise: no fact-level variation
    rows = [{"fact": f, "layer": l, "tracing": rng.normal(), "success": 0.1 * i} for f in range(20)
            for i, l in enumerate(layers)]
    assert argmax_vs_random(pd.DataFrame(rows), n_boot=100)["outcome"] == "no signal"


def test_loo_contrast_bootstrap_equals_duplicated_facts():
    from locaudit.study.hase.analysis import _contrast

    rng = np.random.default_rng(3)
    S, arg = rng.random((7, 4)), rng.integers(0, 4, 7)
    w = np.array([[2, 0, 1, 1, 3, 0, 0]], dtype=float)
    num, den = _contrast(S, arg, w)
    rep = np.repeat(np.arange(7), w[0].astype(int))
    n2, d2 = _contrast(S[rep], arg[rep])
    assert num[0] == pytest.approx(n2[0]) and den[0] == pytest.approx(d2[0])


def test_ftests_equal_statsmodels():
    import statsmodels.formula.api as smf

    from locaudit.study.hase.analysis import ftests

    df = _fact_signal(n=40)
    ours = ftests(df)
    layer = smf.ols("success ~ C(layer)", df).fit()
    for name, formula in (("interaction", "success ~ C(layer) * tracing"), ("both", "success ~ C(layer) + tracing")):
        F, p, dfn = smf.ols(formula, df).fit().compare_f_test(layer)
        assert ours[name]["F"] == pytest.approx(F, rel=1e-8) and ours[name]["p"] == pytest.approx(p, rel=1e-6, abs=1e-300)
        assert ours[name]["df_num"] == dfn
    r = r2_all(df, LAYERS)
    assert r["interaction"] == pytest.approx(smf.ols("success ~ C(layer) * tracing", df).fit().rsquared, abs=1e-10)
    assert ftests(_layer_only(n=40))["interaction"]["p"] > 0.01


def test_edit_metrics():
    lp = np.log
    assert rewrite_score("error_injection", lp(0.6), lp(0.1), lp(0.2), lp(0.6)) == pytest.approx(0.5)
    assert rewrite_score("fact_erasure", lp(0.8), lp(0.2)) == pytest.approx(0.75)
    assert rewrite_score("fact_amplification", lp(0.5), lp(0.75)) == pytest.approx(0.5)
    assert efficacy("error_injection", lp(0.6), lp(0.1), lp(0.6)) == 1.0
    m = fact_metrics("error_injection", {"true": lp(0.6), "new": lp(0.1), "nb_true": [lp(0.5), lp(0.5)], "nb_new": []},
                     {"true": lp(0.2), "new": lp(0.5), "nb_true": [lp(0.4), lp(0.5)], "nb_new": [lp(0.3), lp(0.6)]})
    assert m["neighbourhood_score"] == 0.5 and m["efficacy"] == 1.0
    assert m["neighbour_drift"] == pytest.approx(abs(np.log(0.4 / 0.5)) / 2)
    with pytest.raises(ValueError):
        rewrite_score("forcing", 0.0, 0.0)


def test_study_files_validate():
    from locaudit.study.hase.spec import load_hase_spec

    for name in ("hase_smollm2.yaml", "hase_gptj.yaml"):
        spec = load_hase_spec(REPO / "studies" / name)
        assert spec.editing.problems
    s = load_hase_spec(REPO / "studies" / "hase_smollm2.yaml")
    assert len(s.layer_list(30)) >= 10 and s.layer_list(30)[-1] == 29
    assert load_hase_spec(REPO / "studies" / "hase_gptj.yaml").layer_list(28) == list(range(28))


def test_bad_study_field_is_named(tmp_path):
    from locaudit.errors import ConfigError
    from locaudit.study.hase.spec import load_hase_spec

    p = tmp_path / "s.yaml"
    p.write_text("name: x\nfacts: {path: f.json}\nediting: {problems: [forcing]}\n")
    with pytest.raises(ConfigError, match="editing.problems"):
        load_hase_spec(p)
    p.write_text("name: x\nfacts: {path: f.json}\nlayers: every:0\n")
    with pytest.raises(ConfigError, match="every:K"):
        load_hase_spec(p).layer_list(4)


def test_tiny_study_runs_resumes_and_reports(tmp_path):
    from locaudit.models.tiny import tiny_model
    from locaudit.study.hase.report import build_report
    from locaudit.study.hase.run import run_hase
    from locaudit.study.hase.spec import load_hase_spec

    lm = tiny_model("llama", n_layers=3)
    recs = []
    for i, (s, rel, obj) in enumerate([("Paris", "R1", "France"), ("Rome", "R1", "Italy"), ("Oslo", "R1", "Norway"),
                                       ("Bern", "R1", "Swiss"), ("Tokyo", "R2", "Japan"), ("Lima", "R2", "Peru"),
                                       ("Cairo", "R2", "Egypt")]):
        recs.append({"id": str(i), "subject": s, "prompt": f"{s} is a city in", "target": obj, "relation_id": rel,
                     **({"paraphrases": [f"Where is {s}? {s} lies in"]} if i % 2 == 0 else {})})
    (tmp_path / "facts.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    (tmp_path / "study.yaml").write_text(
        "name: tiny\nfacts: {path: facts.jsonl, known_top_k: 259, max_facts: 6, n_neighbours: 2}\n"
        "tracing: {n_noise: 4, kinds: [mlp, hidden], grid_facts: 1, measure: fraction, noise_from: subject,\n"
        "  clean_pos0: true}\nlayers: [0, 1, 2]\n"
        "editing: {problems: [error_injection, fact_erasure], methods: [ft, lora, rome, memit],\n"
        "  ft: {steps: 3, lr: 0.05, norm_bound: 0.1, batch_facts: 4, nll: sum, early_stop: 0.01},\n"
        "  lora: {steps: 3, lr: 0.1, batch_facts: 4}, rome: {steps: 5, lr: 0.5, batch_facts: 4, cov_tokens: 3000},\n"
        "  memit: {steps: 5, lr: 0.5, batch_facts: 4, cov_tokens: 3000, window: 3, mom2_update_weight: 10}}\n"
        "analysis: {bootstrap: 50, permutations: 200}\n")
    spec = load_hase_spec(tmp_path / "study.yaml")
    res = run_hase(spec, tmp_path / "run", lm=lm, progress=False)
    assert res["counts"]["done"] == 2 + 2 * 4 * 3 and res["counts"]["failed"] == 0, res
    again = run_hase(spec, tmp_path / "run", lm=lm, progress=False)
    assert again["ran"] == []
    index = build_report(tmp_path / "run")
    v = json.loads((index.parent / "verdict.json").read_text())
    assert v["facts"]["used"] == 6 and len(v["verdicts"]) == 8
    assert all("p_perm" in d and d["outcome"] in ("evidence for", "evidence against", "inconclusive", "no signal")
               for d in v["verdicts"])
    tr = v["tracing"]
    assert tr["measure"] == "fraction" and tr["clean_pos0"] and set(tr["reliability"]) == {"mlp", "hidden"}
    assert tr["reliability"]["mlp"]["n_facts"] == 6 and tr["position0"]["n_noised"] == 0
    assert all(x >= 0 or x != x for x in pd.read_csv(index.parent / "edits.csv")["tracing_mlp"])  # max(0, .) / |.|
    norms = {(r["problem"], r["method"]): r for r in v["edit_norms"]}
    assert len(norms) == 8 and all(r["n"] == 18 for r in norms.values())
    # ft stops early (loss < 0.01): erasing a fact the random model gives p ~ 0 needs no change at all
    assert norms[("fact_erasure", "ft")]["max"] == 0.0
    assert all(r["mean"] > 0 for k, r in norms.items() if k != ("fact_erasure", "ft"))
    assert {r["model"] for r in v["r2"]} == {"tracing", "layer", "both", "interaction", "added_tracing",
                                            "added_interaction"}
    assert (index.parent / "success_by_layer.png").exists() and (index.parent / "tracing_heatmap_mlp.png").exists()
    edits = pd.read_csv(index.parent / "edits.csv")
    assert len(edits) == 6 * 3 * 8 and set(edits["layer"]) == {0, 1, 2}
    # memit "at layer l" edits the window centred on l; Hase's measures per edit; paraphrases where the file has them
    mem = edits[edits["method"] == "memit"]
    assert dict(zip(mem["layer"], mem["window"])) == {0: "0-1", 1: "0-1-2", 2: "1-2"}
    assert mem["residual_left"].between(0, 1.5).all()
    has_para = edits["fact"].astype(int) % 2 == 0
    assert edits.loc[has_para, "paraphrase_score"].notna().all() and edits.loc[~has_para, "paraphrase_score"].isna().all()
    assert edits["neighbourhood_stability"].between(0, 1).all() and edits["combined_score"].notna().all()
    measures = {(r["problem"], r["method"], r["measure"]) for r in v["r2_by_measure"]}
    assert ("error_injection", "memit", "paraphrase_score") in measures and v["paraphrases"] is True
    assert {m for _, _, m in measures} <= {"rewrite_score", "paraphrase_score", "neighbourhood_stability", "combined_score"}
    assert (index.parent / "r2_by_measure.csv").exists() and "R^2 per success measure" in index.read_text()
    stopped = (edits["problem"] == "fact_erasure") & (edits["method"] == "ft")
    assert edits["dw_rel_norm"].ge(0).all() and edits.loc[stopped, "dw_rel_norm"].eq(0).all()
    # the ft bound holds entry-wise, so ft's relative norm is at most bound x sqrt(entries) / ||W||
    from locaudit.study.hase.report import summary_text

    assert "||dW||/||W||" in summary_text(tmp_path / "run") and "rome" in summary_text(tmp_path / "run")
    # docs/results.md's Hase section (scripts/results_doc.py --hase) carries the report's numbers, and --check
    # catches a typed figure
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[2] / "scripts" / "results_doc.py"
    sp = importlib.util.spec_from_file_location("results_doc", path)
    rd = importlib.util.module_from_spec(sp)
    sys.modules["results_doc"] = rd
    sp.loader.exec_module(rd)
    out = tmp_path / "docs" / "results.md"
    assert rd.main(["--hase", f"Tiny={tmp_path / 'run'}", "--out", str(out)]) == 0
    text = out.read_text()
    r = next(x for x in v["r2_by_measure"] if (x["problem"], x["method"], x["measure"]) ==
             ("error_injection", "rome", "rewrite_score"))
    vd = next(x for x in v["verdicts"] if (x["problem"], x["method"]) == ("error_injection", "rome"))
    row = next(line for line in text.splitlines() if line.startswith("| error_injection | rome |"))
    assert f"| {r['r2_layer']:.3f} |" in row and f"**{vd['outcome']}**" in row
    assert f"r = {tr['reliability']['mlp']['r']:.3f}" in text and "Cost: facts 1 trial(s)" in text
    assert (tmp_path / "docs" / "results" / "hase-tiny" / "success_by_layer.png").exists()
    assert rd.main(["--hase", f"Tiny={tmp_path / 'run'}", "--out", str(out), "--check"]) == 0
    out.write_text(text.replace(f"| {r['r2_layer']:.3f} |", "| 0.999 |", 1))
    assert rd.main(["--hase", f"Tiny={tmp_path / 'run'}", "--out", str(out), "--check"]) == 1


def test_spread_order_covers_depth_first():
    from locaudit.study.hase.run import spread_order

    layers = [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 29]
    order = spread_order(layers)
    assert sorted(order) == layers and order[:3] == [0, 29, 15]
    assert spread_order([4]) == [4] and spread_order([]) == []


@pytest.mark.parametrize("make, outcome", [(_layer_only, "evidence against"), (_fact_signal, "evidence for")])
def test_report_label_follows_the_layer_mean_null(make, outcome):
    from locaudit.study.hase.report import analyze
    from locaudit.study.hase.spec import HaseSpec

    spec = HaseSpec(name="x", facts={"path": "unused.json"}, analysis={"bootstrap": 300, "permutations": 500})
    d = make().rename(columns={"tracing": "tracing_mlp", "success": "rewrite_score"})
    d["problem"], d["method"] = "error_injection", "ft"
    table, verdicts = analyze(spec, d)
    assert [v["outcome"] for v in verdicts] == [outcome] and verdicts[0]["n_perm"] == 500
    f = table.set_index("model").loc["added_interaction"]
    assert f["F_df_num"] == len(LAYERS) and 0 <= f["F_p"] <= 1
