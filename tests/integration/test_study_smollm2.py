"""A miniature study on the real SmolLM2 model, end to end (collect, probe, ITI, optimal edits,
evaluation, statistics, report); bounded to about a minute on 2 CPU cores."""

from __future__ import annotations

from pathlib import Path

import pytest

from locaudit.study.ledger import Ledger
from locaudit.study.report import build_report
from locaudit.study.runner import run_study
from locaudit.study.spec import load_study
from locaudit.study.trials import expand

STUDY = """
name: smollm2-mini
model: {{name: smollm2-135m-instruct, dtype: fp32, device: cpu}}
data: {{spec: "truthfulqa:{csv}", max_questions: 10}}
localizers: {{probe: {{top_k: 4}}, random: {{n: 2}}, single: {{n: 1}}}}
iti: {{alphas: [10.0]}}
optimal: {{taus: [0.2], epochs: 1, max_train_pairs: 8, max_val_pairs: 4, batch_edits: 5,
          lr: {{top: [2.0e-3], random: [2.0e-3], single: [5.0e-3], all: [5.0e-4]}}}}
evaluation: {{metrics: [mc, kl, ce, gen], judge: "reference:bleu", max_questions: 3, max_new_tokens: 12,
             autocast: bf16, kl_max_tokens: 256}}
"""


@pytest.mark.slow
def test_mini_study_on_smollm2(tmp_path: Path, shared_data: Path, smollm2) -> None:
    csv = shared_data / "truthfulqa" / "data" / "v1" / "TruthfulQA.csv"
    (tmp_path / "study.yaml").write_text(STUDY.format(csv=csv))
    spec = load_study(tmp_path / "study.yaml")
    n = len(expand(spec))
    s = run_study(spec, tmp_path / "run", progress=False)
    assert s.done == n and s.failed == 0, s.line()
    with Ledger(tmp_path / "run") as led:
        rows = {r["name"]: r for r in led.rows()}
    base = rows["baseline"]["metrics"]
    from locaudit.data import load_behaviour

    n_test = len(load_behaviour(f"truthfulqa:{csv}", max_questions=10).questions("test"))
    assert base["kl"] == pytest.approx(0.0, abs=1e-6) and 0 <= base["mc2"] <= 1
    assert base["n_generated"] == min(3, n_test) > 0
    iti = [r for name, r in rows.items() if name.startswith("iti ")]
    assert all(r["metrics"]["kl"] > 0 for r in iti)  # an edit at alpha 10 moves the distribution
    opt = [r for name, r in rows.items() if name.startswith("optimal ")]
    assert len(opt) == 5 and all((tmp_path / "run" / r["artifacts"]["edit"] / "edit.safetensors").exists() for r in opt)
    rep = build_report(tmp_path / "run", n_resamples=199)
    assert rep.verdict["primary_metric"] == "true"
    assert {"hist_iti", "hist_optimal", "kl_mc", "probe_heatmap"} <= set(rep.figures)
