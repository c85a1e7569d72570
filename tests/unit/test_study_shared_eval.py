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
precision: {precision}
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
evaluation: {{metrics: [mc, kl, ce], max_questions: 3, kl_max_tokens: 64{extra}}}
verdict: {{primary_metric: mc2}}
"""


def _run(tmp: Path, data: Path, precision: str = "fp32", extra: str = "", retry: bool = False,
         done: bool = True) -> dict:
    from locaudit.study.ledger import Ledger
    from locaudit.study.runner import run_study
    from locaudit.study.spec import load_study

    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "study.yaml"
    path.write_text(STUDY.format(csv=data / "TruthfulQA.csv", precision=precision, extra=extra))
    run_study(load_study(path), tmp / "run", progress=False, retry_failed=retry)
    with Ledger(tmp / "run") as led:
        rows = [r for r in led.rows() if r["kind"] == "optimal"]
    assert rows and all(r["status"] == "done" for r in rows) == done
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

    def alone(ctx, ev, edits, split, n, metrics, outs, sources=None):
        return [score_split(ctx, ev, e, split, n, metrics, o) for e, o in zip(edits, outs)]

    monkeypatch.setattr(optimal, "score_many", alone)
    each = _run(tmp_path / "b", data)
    assert set(together) == set(each)
    for key, m in together.items():
        for name in ("mc2", "mc1", "kl", "ce"):
            assert m[name] == pytest.approx(each[key][name], abs=1e-5), (key, name)
        assert m["n_dose_points"] == each[key]["n_dose_points"] >= 1


class Killed(RuntimeError):
    pass


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_scoring_killed_part_way_keeps_its_finished_chunks(tmp_path: Path, monkeypatch, precision: str) -> None:
    """A group's edits are scored `score_chunk` at a time and each chunk's scores are kept: a run killed while
    scoring goes on from the chunk it was in, and ends with the numbers of a run never killed."""
    from locaudit.evaluate import shared
    from locaudit.study.steps.evaluation import SCORED_FILE

    data = tmp_path / "data"
    data.mkdir()
    write_judge_data(data, mc=True)
    real = shared.evaluate_edits
    sizes: list[int] = []

    def dies_in_the_third_chunk(lm, edits, *a, **k):
        sizes.append(len(edits))
        if len(sizes) == 3:
            raise Killed("killed while scoring")
        return real(lm, edits, *a, **k)

    monkeypatch.setattr(shared, "evaluate_edits", dies_in_the_third_chunk)
    chunked = ", score_chunk: 2"
    _run(tmp_path / "a", data, precision, chunked, done=False)  # the killed run's group is not done
    assert sizes[:2] == [2, 2]  # the group's 6 edits in chunks of 2
    kept = sorted((tmp_path / "a" / "run" / "shared" / "scores").glob(f"*/{SCORED_FILE}"))
    assert len(kept) == 4 and all((k.parent / "mc_items.jsonl").is_file() for k in kept)

    sizes.clear()
    monkeypatch.setattr(shared, "evaluate_edits", lambda lm, edits, *a, **k: sizes.append(len(edits)) or real(lm, edits, *a, **k))
    bad = kept[0]
    bad.write_text(bad.read_text()[:20])  # a truncated record is scored again
    resumed = _run(tmp_path / "a", data, precision, chunked, retry=True)
    assert sizes[:2] == [2, 1]  # the final edits: the two the kill lost and the one whose record was truncated

    monkeypatch.setattr(shared, "evaluate_edits", real)
    clean = _run(tmp_path / "b", data, precision)  # one chunk, never killed
    assert set(resumed) == set(clean)
    tol = 1e-5 if precision == "fp32" else 2e-2
    for key, m in clean.items():
        for name in ("mc2", "mc1", "kl", "ce"):
            assert resumed[key][name] == pytest.approx(m[name], abs=tol), (key, name)
        assert resumed[key]["n_dose_points"] == m["n_dose_points"]
    n_snapshots = sum(int(m["n_dose_points"]) - 1 for m in clean.values())  # the final point is the edit itself
    assert n_snapshots >= 6 and sum(sizes[2:]) == n_snapshots and max(sizes[2:]) == 2  # in chunks of 2 as well
