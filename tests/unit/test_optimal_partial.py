"""A study's optimal group trains in passes (edit/multi.py plans them by lowest layer): each pass's edits are
saved the moment it ends, so a run that dies in a later pass keeps them, and the rerun trains only the rest,
with the numbers an uninterrupted run gives."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from eval_fixtures import write_judge_data

pytestmark = pytest.mark.usefixtures("one_thread")

STUDY = """
name: tiny-partial
model: {{name: "tiny:llama"}}
precision: fp32
data: {{spec: "truthfulqa:{csv}", seed: 1}}
localizers:
  probe: {{top_k: 2}}
  random: {{n: 3}}
  all: true
iti: {{enabled: false}}
optimal:
  taus: [0.1]
  epochs: 1
  max_train_pairs: 8
  max_val_pairs: 4
  batch_size: 4
  batch_edits: 5
  train_options: {{max_parallel: 2}}
evaluation: {{metrics: [mc], max_questions: 3}}
verdict: {{primary_metric: mc2}}
"""


class Killed(RuntimeError):
    pass


def _rows(run: Path) -> dict:
    from locaudit.study.ledger import Ledger

    with Ledger(run) as led:
        return {r["key"]: r for r in led.rows() if r["kind"] == "optimal"}


def _spec(tmp_path: Path, options: str | None = None):
    """The tiny study with its data written under tmp_path; `options` replaces its train_options."""
    from locaudit.study.spec import load_study

    data = tmp_path / "data"
    data.mkdir()
    write_judge_data(data, mc=True)
    spec_path = tmp_path / "study.yaml"
    text = STUDY.format(csv=data / "TruthfulQA.csv")
    spec_path.write_text(text.replace("{max_parallel: 2}", options) if options else text)
    return load_study(spec_path)


def _die_in_the_second_pass(monkeypatch, passes: list[int]):
    """Make the group's second training pass 'die' (each pass's edit count goes into `passes`); returns the real
    train_stack."""
    from locaudit.edit import multi

    real = multi.train_stack

    def dies_in_the_second_pass(lm, heads, *a, **k):
        passes.append(len(heads))
        if len(passes) == 2:
            raise Killed("killed in the second pass")
        return real(lm, heads, *a, **k)

    monkeypatch.setattr(multi, "train_stack", dies_in_the_second_pass)
    return real


def test_passes_trained_before_a_kill_are_kept(tmp_path: Path, monkeypatch) -> None:
    from locaudit.edit import multi
    from locaudit.study.runner import run_study
    from locaudit.study.steps.optimal import TRAINED_MARKER

    spec = _spec(tmp_path)
    passes: list[int] = []
    real = _die_in_the_second_pass(monkeypatch, passes)
    first = run_study(spec, tmp_path / "run", progress=False)
    assert first.failed > 0 and len(passes) == 2
    kept = sorted((tmp_path / "run" / "shared").glob(f"optimal-*/{TRAINED_MARKER}"))
    assert len(kept) == passes[0] >= 1  # the first pass's edits, saved before the second pass started

    passes.clear()
    monkeypatch.setattr(multi, "train_stack", lambda lm, heads, *a, **k: passes.append(len(heads)) or real(lm, heads, *a, **k))
    again = run_study(spec, tmp_path / "run", progress=False, retry_failed=True)  # (a SIGKILL leaves them running: rerun)
    assert again.failed == 0
    assert sum(passes) == 5 - len(kept)  # only the edits the kill lost are trained again
    resumed = _rows(tmp_path / "run")
    assert all(r["status"] == "done" for r in resumed.values())

    monkeypatch.setattr(multi, "train_stack", real)
    clean = run_study(spec, tmp_path / "clean", progress=False)
    assert clean.failed == 0
    for key, r in _rows(tmp_path / "clean").items():  # the same numbers as a run never killed
        assert resumed[key]["metrics"]["mc2"] == pytest.approx(r["metrics"]["mc2"], abs=1e-6), key


def test_a_pass_killed_part_way_goes_on_from_its_checkpoint(tmp_path: Path, monkeypatch) -> None:
    """With early stopping, a pass checkpoints after every check (edit/resume.py): a run killed inside a pass
    resumes it at its last checkpoint, not at step 0, and ends with the numbers of a run never killed."""
    import json

    from locaudit.edit import train as train_mod
    from locaudit.study.runner import run_study
    from locaudit.study.spec import load_study

    data = tmp_path / "data"
    data.mkdir()
    write_judge_data(data, mc=True)
    spec_path = tmp_path / "study.yaml"
    spec_path.write_text(STUDY.format(csv=data / "TruthfulQA.csv").replace(
        "{max_parallel: 2}", "{max_parallel: 2, eval_every: 1, patience: 5}"))
    spec = load_study(spec_path)
    real = train_mod.StackRunner.logps
    calls = [0]

    def dies_after_a_step(self, enc, idx, states):
        if torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] == 2:  # the second training forward of the first pass: step 1 is checkpointed
                raise Killed("killed inside the first pass")
        return real(self, enc, idx, states)

    monkeypatch.setattr(train_mod.StackRunner, "logps", dies_after_a_step)
    first = run_study(spec, tmp_path / "run", progress=False)
    assert first.failed > 0
    assert len(list((tmp_path / "run" / "shared" / "passes").glob("pass-*/pass.safetensors"))) == 1
    monkeypatch.setattr(train_mod.StackRunner, "logps", real)
    again = run_study(spec, tmp_path / "run", progress=False, retry_failed=True)
    assert again.failed == 0
    metas = [json.loads(p.read_text()) for p in (tmp_path / "run" / "shared").glob("optimal-*/meta.json")]
    assert len(metas) == 5 and 1 <= sum(m["curve"].get("resumed_at") == [1] for m in metas) <= 2  # the first pass
    assert not list((tmp_path / "run" / "shared" / "passes").glob("pass-*"))  # removed with its edits saved
    resumed = _rows(tmp_path / "run")
    clean = run_study(spec, tmp_path / "clean", progress=False)
    assert clean.failed == 0
    for key, r in _rows(tmp_path / "clean").items():
        assert resumed[key]["metrics"]["mc2"] == pytest.approx(r["metrics"]["mc2"], abs=1e-6), key
        assert resumed[key]["metrics"]["train_val_loss"] == pytest.approx(r["metrics"]["train_val_loss"], abs=1e-7), key


def test_an_edit_stopped_inside_its_warmup_by_the_old_count_is_trained_again(tmp_path: Path, monkeypatch,
                                                                              caplog) -> None:
    """Early-stopping evaluations inside the learning-rate warm-up no longer count against patience. A saved edit
    whose curve says the old count stopped it there (no `patience_from`, its counted checks before the warm-up's
    end) is not what its settings mean now: the rerun trains its pass again and ends with a clean run's numbers."""
    import json
    import logging

    from locaudit.edit import multi
    from locaudit.io import write_checksums
    from locaudit.study.runner import run_study

    # 8 pairs in batches of 4, 4 epochs: 8 steps, the first 4 warm-up
    spec = _spec(tmp_path, "{max_parallel: 2, eval_every: 1, patience: 1, max_epochs: 4, warmup_ratio: 0.5}")
    passes: list[int] = []
    real = _die_in_the_second_pass(monkeypatch, passes)
    assert run_study(spec, tmp_path / "run", progress=False).failed > 0
    metas = sorted((tmp_path / "run" / "shared").glob("optimal-*/meta.json"))
    assert len(metas) == passes[0] >= 1
    for m in metas:  # as the first pass's edits would have been saved by the old count
        meta = json.loads(m.read_text())
        assert meta["curve"]["patience_from"] == 4
        del meta["curve"]["patience_from"]
        meta["curve"].update(stopped_step=1, evals=meta["curve"]["evals"][:2])
        m.write_text(json.dumps(meta))
        write_checksums(m.parent)  # a sound folder: only its curve says it is stale

    passes.clear()
    monkeypatch.setattr(multi, "train_stack", lambda lm, heads, *a, **k: passes.append(len(heads)) or real(lm, heads, *a, **k))
    with caplog.at_level(logging.WARNING, logger="locaudit.study.steps.optimal"):
        again = run_study(spec, tmp_path / "run", progress=False, retry_failed=True)
    assert again.failed == 0 and sum(passes) == 5  # the first pass is trained again with the two the kill lost
    assert sum("learning-rate warm-up" in r.getMessage() for r in caplog.records) == len(metas)
    assert all(json.loads(m.read_text())["curve"]["patience_from"] == 4 for m in metas)
    resumed = _rows(tmp_path / "run")
    monkeypatch.setattr(multi, "train_stack", real)
    assert run_study(spec, tmp_path / "clean", progress=False).failed == 0
    for key, r in _rows(tmp_path / "clean").items():
        assert resumed[key]["metrics"]["mc2"] == pytest.approx(r["metrics"]["mc2"], abs=1e-6), key
