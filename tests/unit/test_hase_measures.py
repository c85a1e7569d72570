"""Hase et al.'s per-measure success scores and the R^2 table per measure: the scores by hand (paraphrase = the
rewrite score on paraphrases; neighbourhood = 1 - |dp| / (|p_pre - 0.5| + 0.5) of the edit's target on neighbour
prompts; combined = their harmonic mean); paraphrases read from a facts file (CounterFact's key or ours), none
from known_1000; and on synthetic data where the answer is known, a measure that depends on tracing shows
tracing's added R^2 over the layer, a measure that depends on the layer only does not."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from locaudit.data.facts import load_facts
from locaudit.evaluate.facts import combined_score, fact_metrics, neighbourhood_stability, paraphrase_score
from locaudit.study.hase.analysis import measure_r2

L = math.log


def test_scores_by_hand():
    # neighbourhood: p 0.2 -> 0.5 moves 0.3 of at most 0.8; p 0.9 -> 0.9 does not move
    assert neighbourhood_stability([L(0.2), L(0.9)], [L(0.5), L(0.9)]) == pytest.approx((1 - 0.3 / 0.8 + 1) / 2)
    assert neighbourhood_stability([L(0.5)], [L(1e-9)]) == pytest.approx(0.0, abs=1e-6)  # at p = .5 the most it can move
    assert math.isnan(neighbourhood_stability([], []))
    # paraphrase: error injection's rewrite score per paraphrase, averaged
    ps = paraphrase_score("error_injection", [L(0.5), L(0.5)], [L(0.1), L(0.1)], [L(0.2), L(0.0 + 0.5)],
                          [L(0.6), L(0.75)])
    assert ps == pytest.approx(((0.6 - 0.2) / 0.8 + (0.75 - 0.5) / 0.5) / 2)
    assert paraphrase_score("fact_erasure", [L(0.8)], [L(0.2)]) == pytest.approx(0.75)
    assert combined_score(0.5, 1.0, float("nan")) == pytest.approx(2 / 3)
    assert combined_score(0.5, -0.1, 1.0) == 0.0
    m = fact_metrics("error_injection",
                     {"true": L(0.6), "new": L(0.1), "nb_true": [L(0.7)], "nb_new": [L(0.2)], "nb_target": [L(0.2)],
                      "para_true": [L(0.5)], "para_new": [L(0.1)]},
                     {"true": L(0.2), "new": L(0.55), "nb_true": [L(0.6)], "nb_new": [L(0.3)], "nb_target": [L(0.3)],
                      "para_true": [L(0.3)], "para_new": [L(0.4)]})
    rw, pa, nb = (0.55 - 0.1) / 0.9, (0.4 - 0.1) / 0.9, 1 - 0.1 / 0.8
    assert (m["rewrite_score"], m["paraphrase_score"], m["neighbourhood_stability"]) == pytest.approx((rw, pa, nb))
    assert m["combined_score"] == pytest.approx(3 / (1 / rw + 1 / pa + 1 / nb))
    assert m["neighbourhood_score"] == 1.0  # ROME's NS is still there
    # without paraphrases (known_1000) the measure is absent, the combined score uses the other two
    m2 = fact_metrics("fact_erasure", {"true": L(0.8), "nb_true": [], "nb_target": [L(0.4)]},
                      {"true": L(0.2), "nb_true": [], "nb_target": [L(0.4)]})
    assert "paraphrase_score" not in m2 and m2["neighbourhood_stability"] == pytest.approx(1.0)
    assert m2["combined_score"] == pytest.approx(2 / (1 / 0.75 + 1))


def test_paraphrases_read_from_the_facts_file(tmp_path):
    p = tmp_path / "f.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "subject": "Paris", "prompt": "Paris is in", "target": "France",
         "paraphrase_prompts": ["Where is Paris? Paris is in "]},
        {"id": "b", "subject": "Rome", "prompt": "Rome is in", "target": "Italy", "paraphrases": ["Rome lies in"]},
        {"id": "c", "subject": "Oslo", "prompt": "Oslo is in", "target": "Norway"}]) + "\n")
    f = {x.id: x for x in load_facts(p)}
    assert f["a"].meta["paraphrases"] == ["Where is Paris? Paris is in"]
    assert f["b"].meta["paraphrases"] == ["Rome lies in"] and "paraphrases" not in f["c"].meta
    p.write_text(json.dumps({"subject": "Oslo", "prompt": "Oslo is in", "target": "N", "paraphrases": "x"}) + "\n")
    with pytest.raises(Exception, match="paraphrases"):
        load_facts(p)


def _synthetic(n_facts=40, layers=(0, 2, 4, 6, 8, 10), seed=0) -> pd.DataFrame:
    """Tracing varies by fact and layer; `follows` = layer effect + 0.8 tracing + noise; `layer_only` = the
    same layer effect + noise (independent of tracing)."""
    g = np.random.default_rng(seed)
    rows = []
    shape = {l: 0.15 * (i - 2.5) ** 2 for i, l in enumerate(layers)}  # U-shaped by layer
    for f in range(n_facts):
        for l in layers:
            t = g.uniform(0, 1)
            rows.append({"fact": str(f), "layer": l, "tracing_mlp": t,
                         "follows": shape[l] + 0.8 * t + g.normal(0, 0.1),
                         "layer_only": shape[l] + g.normal(0, 0.1)})
    return pd.DataFrame(rows)


def test_added_r2_only_for_the_measure_that_depends_on_tracing():
    df = _synthetic()
    t = measure_r2(df, "tracing_mlp", ("follows", "layer_only", "paraphrase_score"), n_boot=200, seed=1)
    assert set(t["measure"]) == {"follows", "layer_only"}  # an absent measure is left out
    r = {(m, k): row for (m, k), row in t.set_index(["measure", "model"]).iterrows()}
    yes, no = r[("follows", "added_tracing")], r[("layer_only", "added_tracing")]
    assert yes["r2"] > 0.2 and yes["ci_low"] > 0.15 and yes["F_p"] < 1e-10  # measured: 0.253 [0.204, 0.289]
    assert no["r2"] < 0.01 and no["ci_high"] < 0.03 and no["F_p"] > 0.05  # measured: 0.0001 [0, 0.0013], p 0.68
    assert r[("layer_only", "layer")]["r2"] > 0.5 and r[("layer_only", "tracing")]["r2"] < 0.02
    assert r[("follows", "interaction")]["r2"] >= r[("follows", "both")]["r2"] - 1e-12


def test_report_measure_summary():
    from locaudit.study.hase.report import measure_summary, measure_tables
    from locaudit.study.hase.spec import HaseSpec

    df = _synthetic(n_facts=12).rename(columns={"follows": "rewrite_score", "layer_only": "neighbourhood_stability"})
    df["problem"], df["method"] = "error_injection", "memit"
    spec = HaseSpec(name="x", facts={"path": "unused.json"}, analysis={"bootstrap": 50})
    s = measure_summary(measure_tables(spec, df)).set_index("measure")
    assert list(s.index) == ["rewrite_score", "neighbourhood_stability"]
    assert s.loc["rewrite_score", "added_tracing"] > 0.2 > s.loc["neighbourhood_stability", "added_tracing"]
    assert (s["method"] == "memit").all() and (s["n_rows"] == 72).all()
