"""Real SmolLM2, bounded: a few known_1000 facts, 3 layers, the whole Hase study in the ledger (facts,
tracing, FT edits of the MLP down-projection), then the report."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_hase_study_on_smollm2(smollm2, shared_data, tmp_path):
    from locaudit.study.hase.report import build_report
    from locaudit.study.hase.run import run_hase
    from locaudit.study.hase.spec import load_hase_spec

    src = shared_data / "rome" / "known_1000.json"
    if not src.exists():
        pytest.skip(f"{src} is absent")
    recs = json.loads(src.read_text())[:60]  # the known filter runs on 60 facts only (bounded time)
    (tmp_path / "facts.json").write_text(json.dumps(recs))
    (tmp_path / "study.yaml").write_text(
        "name: hase_bounded\nfacts: {path: facts.json, known_top_k: 3, max_facts: 5, n_neighbours: 2}\n"
        "tracing: {n_noise: 2, kinds: [mlp], grid_facts: 0}\nlayers: [0, 15, 29]\n"
        "editing: {problems: [error_injection], methods: [ft],\n"
        "  ft: {steps: 8, lr: 2.0e-3, norm_bound: 5.0e-3, batch_facts: 5}}\nanalysis: {bootstrap: 100}\n")
    spec = load_hase_spec(tmp_path / "study.yaml")
    res = run_hase(spec, tmp_path / "run", lm=smollm2, progress=False)
    assert res["counts"]["done"] == 5 and res["counts"]["failed"] == 0
    index = build_report(tmp_path / "run")
    v = json.loads((index.parent / "verdict.json").read_text())
    assert v["facts"]["used"] == 5 and v["facts"]["known"] >= 5
    assert v["verdicts"][0]["outcome"] in ("evidence for", "evidence against", "inconclusive", "no signal")
    import pandas as pd

    edits = pd.read_csv(index.parent / "edits.csv")
    assert len(edits) == 15 and edits["rewrite_score"].between(-1e9, 1.0 + 1e-6).all()
    # the MLP edit at the first layer moves the new object up for most facts (it is bounded, not a no-op)
    assert (edits[edits["layer"] == 0]["p_new_post"] > edits[edits["layer"] == 0]["p_new_pre"]).mean() >= 0.8
    tr = json.loads(next((tmp_path / "run" / "trials").glob("*/data/tracing.json")).read_text())
    assert all(0.0 <= f["p_clean"] <= 1.0 and f["p_clean"] >= f["p_corrupt"] - 0.5 for f in tr["facts"].values())
