"""The study's optimal step scores a group's trained edits, and their dose snapshots, together
(steps.evaluation.score_many -> evaluate/shared.evaluate_edits) with the numbers each trial gets alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from eval_fixtures import write_judge_data

pytestmark = pytest.mark.usefixtures("one_thread")

STUDY = """
name: tiny-shared-eval
model: {{name: "tiny:llama"}}
precision: fp32
data: {{spec: "truthfulqa:{csv}", seed: 1}}
localizers:
  probe: {{top_k: 2}}
  random: {{n: 2}}
  single: {{n: 2, seed: 0}}
  all: true
iti: {{enabled: false}}
optimal:
  taus: [0.1]
  epochs: 1
  max_train_pairs: 8
  max_val_pairs: 4
  batch_size: 4
  batch_edits: 6
  dose_steps: [1]
evaluation: {{metrics: [mc, kl, ce], max_questions: 3, kl_max_tokens: 64}}
verdict: {{primary_metric: mc2}}
"""


def _run(tmp: Path, data: Path) -> dict:
    from locaudit.study.ledger import Ledger
    from locaudit.study.runner import run_study
    from locaudit.study.spec import load_study

    tmp.mkdir(parents=True)
    path = tmp / "study.yaml"
    path.write_text(STUDY.format(csv=data / "TruthfulQA.csv"))
    run_study(load_study(path), tmp / "run", progress=False)
    with Ledger(tmp / "run") as led:
        rows = [r for r in led.rows() if r["kind"] == "optimal"]
    assert rows and all(r["status"] == "done" for r in rows)
    return {r["key"]: r["metrics"] for r in rows}


def test_group_scored_together_equals_each_alone(tmp_path: Path, monkeypatch) -> None:
    from locaudit.study.steps import optimal
    from locaudit.study.steps.evaluation import score_split

    data = tmp_path / "data"
    data.mkdir()
    write_judge_data(data, mc=True)
    calls = []
    real = optimal.score_many

    def counting(ctx, ev, edits, *a, **k):
        calls.append(len(edits))
        return real(ctx, ev, edits, *a, **k)

    monkeypatch.setattr(optimal, "score_many", counting)
    together = _run(tmp_path / "a", data)
    assert calls and max(calls) >= 5  # the group's 6 edits (and their snapshots) in one call each

    def alone(ctx, ev, edits, split, n, metrics, outs):
        return [score_split(ctx, ev, e, split, n, metrics, o) for e, o in zip(edits, outs)]

    monkeypatch.setattr(optimal, "score_many", alone)
    each = _run(tmp_path / "b", data)
    assert set(together) == set(each)
    for key, m in together.items():
        for name in ("mc2", "mc1", "kl", "ce"):
            assert m[name] == pytest.approx(each[key][name], abs=1e-5), (key, name)
        assert m["n_dose_points"] == each[key]["n_dose_points"] >= 1
