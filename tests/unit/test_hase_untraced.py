"""Facts without a finite tracing effect (no corrupted run: symmetric replacement without a partner, or a one-token
subject at a clean position 0): the trace trial's metrics leave them out and count them, where the former code
crashed on max() of nothing; the analysis skips their rows with a counted warning. And edit trial keys hold the
fact-forcing-only editor settings for fact_forcing only."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hase_fixtures import four_fact_study

from locaudit.study.hase.report import analyze
from locaudit.study.hase.run import expand_hase, max_effect, trace_metrics
from locaudit.study.ledger import nonfinite_metrics

STUDY = (
    "name: tiny-hase-untraced\nprecision: fp32\n"
    "facts: {path: facts.jsonl, known_top_k: 259, max_facts: 4, n_neighbours: 1}\n"
    "tracing: {n_noise: 2, kinds: [mlp, attn], grid_facts: 0}\nlayers: [0, 2]\n"
    "editing: {problems: [error_injection, fact_forcing], methods: [ft, rome]EDITORS}\n"
    "analysis: {bootstrap: 20, permutations: 50}\n"
)


def _spec(folder: Path, editors: str = ""):
    return four_fact_study(folder, STUDY.replace("EDITORS", editors))


def test_max_effect_of_an_untraced_fact_is_nan() -> None:
    assert max_effect([0.1, float("nan"), 0.3, None]) == 0.3  # None: a NaN as tracing.json holds it
    assert math.isnan(max_effect([float("nan"), None])) and math.isnan(max_effect([]))


def test_trace_metrics_leave_out_and_count_untraced_facts() -> None:
    nan = float("nan")
    tr = {"facts": {"a": {"effects": {"mlp": [0.2, 0.4], "attn": [nan, None]}},
                    "b": {"effects": {"mlp": [nan, nan], "attn": [None, None]}},
                    "c": {"effects": {"mlp": [0.0, -0.1], "attn": [nan, nan]}}}}
    m = trace_metrics(tr, ["mlp", "attn"])
    assert m["mean_max_effect_mlp"] == pytest.approx((0.4 + 0.0) / 2)
    assert m["n_untraced_mlp"] == 1.0 and m["n_untraced_attn"] == 3.0 and m["n_facts"] == 3.0
    assert "mean_max_effect_attn" not in m  # no fact has one: left out, not a made-up 0
    assert nonfinite_metrics(m) == []  # the ledger records them


def _frame(n_facts: int = 12, layers=(0, 2, 4), seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = [{"problem": "error_injection", "method": "ft", "fact": f"f{f}", "layer": l,
             "tracing_mlp": float(rng.normal()), "rewrite_score": float(0.2 * i + rng.normal(0, 0.1))}
            for f in range(n_facts) for i, l in enumerate(layers)]
    return pd.DataFrame(rows)


def test_analysis_skips_untraced_rows_with_a_counted_warning(tmp_path: Path, caplog) -> None:
    spec = _spec(tmp_path)
    full = _frame()
    untraced = full.copy()
    untraced.loc[untraced["fact"].isin(["f0", "f1"]), "tracing_mlp"] = np.nan  # two facts, every layer
    untraced.loc[(untraced["fact"] == "f2") & (untraced["layer"] == 4), "tracing_mlp"] = None
    with caplog.at_level(logging.WARNING, logger="locaudit.study.hase.report"):
        table, verdicts = analyze(spec, untraced)
    assert "7 of 36 (fact, layer) rows have no finite tracing effect" in caplog.text
    (v,) = verdicts
    assert v["n_rows_skipped"] == 7 and v["n_facts_skipped"] == 2
    # the same numbers as the analysis of the rows that remain
    kept = untraced[untraced["tracing_mlp"].notna()]
    table2, (v2,) = analyze(spec, kept)
    assert v2["n_rows_skipped"] == 0 and v2["n_facts_skipped"] == 0
    pd.testing.assert_frame_equal(table, table2)
    assert v.keys() == v2.keys()
    for k in v:
        if not k.endswith("_skipped"):
            assert np.asarray(v[k], dtype=object).tolist() == np.asarray(v2[k], dtype=object).tolist() or \
                np.allclose(np.asarray(v[k], dtype=float), np.asarray(v2[k], dtype=float), equal_nan=True), k
    assert analyze(spec, full)[1][0]["n_rows_skipped"] == 0
    from locaudit.study.hase.report import _skipped_note

    assert _skipped_note(v) == (" Left out: 7 (fact, layer) rows without a finite tracing effect or success "
                                "(2 facts entirely).") and _skipped_note(v2) == ""


def _edit_keys(spec) -> dict[tuple[str, str, int], str]:
    return {(t.content["problem"], t.content["method"], t.content["layer"]): t.key
            for t in expand_hase(spec, 4) if t.kind == "hase_edit"}


def test_forcing_settings_key_fact_forcing_trials_only(tmp_path: Path) -> None:
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
    plain = _edit_keys(_spec(tmp_path / "a"))
    forced = _edit_keys(_spec(tmp_path / "b", ", ft: {forcing: {steps: 50}, forcing_samples: 1}"))
    assert plain.keys() == forced.keys() and len(plain) == 2 * 2 * 2
    for (problem, method, layer), key in plain.items():
        if problem == "fact_forcing" and method == "ft":
            assert forced[problem, method, layer] != key
        else:  # error injection (and the other editor): the keys of a study without the fact-forcing settings
            assert forced[problem, method, layer] == key
    facts_trial = [t for t in expand_hase(_spec(tmp_path / "b", ", ft: {forcing: {steps: 50}}"), 4)
                   if t.kind == "hase_edit" and t.content["problem"] == "fact_forcing"]
    assert all("forcing" in t.content["config"] for t in facts_trial if t.content["method"] == "ft")
