"""A training pass killed part way goes on from its last checkpoint (edit/resume.py) and ends exactly where an
uninterrupted pass ends: parameters, training curves, early stopping and dose snapshots, under fp32 and bf16."""

from __future__ import annotations

import logging

import pytest
import torch

from locaudit.edit import resume as resume_mod
from locaudit.edit import train as train_mod
from locaudit.edit.multi import train_edits
from locaudit.heads import HeadSet
from locaudit.models.tiny import tiny_model
from train_fixtures import toy_pairs as pairs

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_caches")


class Killed(Exception):
    """Stands for the process being killed."""


HEADS = [HeadSet.parse("L0H1"), HeadSet.parse("L0H0,L2H2"), HeadSet.parse("L1H3")]
LRS = [0.2, 1e-3, 0.05]
# 8 pairs in micro-batches of 2, 2 per optimizer step: 2 steps an epoch; early stopping checks every step
CFG = dict(progress=False, reference_disk_cache=False, batch_size=2, grad_accum=2, warmup_ratio=0.25, tau=2.0,
           eval_every=1, patience=3, max_epochs=6, snapshot_steps=[0.25, 0.5], max_parallel=3, group_copy_cost=0.0)


def run(lm, precision, resume_dir=None, kill_after=None, lrs=LRS, monkeypatch=None, cfg=None):
    """train_edits on the tiny model; with kill_after, the process 'dies' at that forward of the training loop."""
    if kill_after is not None:
        calls = [0]
        real = train_mod.StackRunner.logps

        def dying(self, enc, idx, states):
            if torch.is_grad_enabled():  # a training forward (validation runs without grad)
                calls[0] += 1
                if calls[0] > kill_after:
                    raise Killed()
            return real(self, enc, idx, states)

        monkeypatch.setattr(train_mod.StackRunner, "logps", dying)
    try:
        return train_edits(lm, HEADS, pairs(8), pairs(4, 50), config=dict(cfg or CFG, precision=precision), lrs=lrs,
                           resume_dir=resume_dir)
    finally:
        if kill_after is not None:
            monkeypatch.undo()


def same(a, b) -> None:
    for (ea, la), (eb, lb) in zip(a, b):
        assert torch.equal(ea.a, eb.a) and torch.equal(ea.b, eb.b)
        assert la.steps == lb.steps and la.evals == lb.evals and la.epochs == lb.epochs
        assert la.best == lb.best and la.stopped_step == lb.stopped_step and la.steps_run == lb.steps_run
        assert sorted(la.snapshots) == sorted(lb.snapshots)
        for s in la.snapshots:
            assert all(torch.equal(x, y) for x, y in zip(la.snapshots[s], lb.snapshots[s]))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("kill_after", [3, 4, 13])  # mid-epoch; at an epoch end; edit 0 two checks past its best
def test_a_killed_pass_resumes_to_the_uninterrupted_result(precision, kill_after, tmp_path, monkeypatch) -> None:
    lm = tiny_model("llama", n_layers=3)
    whole = run(lm, precision)
    assert any(lg.stopped_step is not None for _, lg in whole)  # early stopping is part of what is resumed
    with pytest.raises(Killed):
        run(lm, precision, tmp_path / "passes", kill_after, monkeypatch=monkeypatch)
    saved = list((tmp_path / "passes").glob("pass-*/pass.safetensors"))
    assert len(saved) == 1  # the pass checkpointed before it died
    resumed = run(lm, precision, tmp_path / "passes")
    same(whole, resumed)
    at = (kill_after // 2)  # micro-batches trained before the kill, 2 per step: the last checkpointed step
    assert [lg.resumed_at for _, lg in resumed] == [[at]] * 3
    assert resumed[0][0].meta["curve"]["resumed_at"] == [at]
    assert not list((tmp_path / "passes").glob("pass-*"))  # removed once the edits are returned


def test_a_checkpoint_of_another_pass_is_not_used(tmp_path, monkeypatch, caplog) -> None:
    """Different learning rates make another pass: its checkpoint is ignored and this one starts from step 0."""
    lm = tiny_model("llama", n_layers=3)
    with pytest.raises(Killed):
        run(lm, "fp32", tmp_path / "p", 5, monkeypatch=monkeypatch)
    other = [0.1, 1e-3, 0.05]
    fresh = run(lm, "fp32", tmp_path / "p", lrs=other)
    assert all(lg.resumed_at == [] for _, lg in fresh)
    same(run(lm, "fp32", lrs=other), fresh)
    assert len(list((tmp_path / "p").glob("pass-*"))) == 1  # the other pass's checkpoint is left alone


def test_an_unreadable_checkpoint_restarts_the_pass(tmp_path, monkeypatch, caplog) -> None:
    lm = tiny_model("llama", n_layers=3)
    with pytest.raises(Killed):
        run(lm, "fp32", tmp_path / "p", 5, monkeypatch=monkeypatch)
    (f,) = (tmp_path / "p").glob("pass-*/pass.safetensors")
    f.write_bytes(f.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="locaudit.edit.resume"):
        again = run(lm, "fp32", tmp_path / "p")
    assert any("cannot resume" in r.getMessage() and str(f) in r.getMessage() for r in caplog.records)
    assert all(lg.resumed_at == [] for _, lg in again)
    same(run(lm, "fp32"), again)


def test_without_early_stopping_it_checkpoints_every_few_steps(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(train_mod, "RESUME_EVERY_STEPS", 2)
    lm = tiny_model("llama", n_layers=2)
    cfg = dict(progress=False, reference_disk_cache=False, batch_size=2, epochs=2, precision="fp32")
    heads = [HeadSet.parse("L0H1"), HeadSet.parse("L1H0")]
    whole = train_edits(lm, heads, pairs(8), None, config=cfg, lrs=[0.05, 0.05])
    real = train_mod.StackRunner.logps
    calls = [0]

    def dying(self, enc, idx, states):
        calls[0] += 1
        if calls[0] > 7:
            raise Killed()
        return real(self, enc, idx, states)

    monkeypatch.setattr(train_mod.StackRunner, "logps", dying)
    with pytest.raises(Killed):
        train_edits(lm, heads, pairs(8), None, config=cfg, lrs=[0.05, 0.05], resume_dir=tmp_path)
    monkeypatch.setattr(train_mod.StackRunner, "logps", real)
    resumed = train_edits(lm, heads, pairs(8), None, config=cfg, lrs=[0.05, 0.05], resume_dir=tmp_path)
    same(whole, resumed)
    assert resumed[0][1].resumed_at == [6]  # 7 steps done; the last checkpoint after step 6


def test_state_keeps_non_finite_floats_and_int_keys() -> None:
    x = {"a": [float("nan"), float("inf"), -float("inf"), 1.5], "b": {3: "x"}, "c": None}
    y = resume_mod._dec(resume_mod._enc(x))
    assert y["a"][0] != y["a"][0] and y["a"][1:] == [float("inf"), -float("inf"), 1.5]
    assert y["b"] == {3: "x"} and y["c"] is None


def test_a_later_attempt_plans_the_same_passes(tmp_path, monkeypatch) -> None:
    """An attempt skips the edits an earlier one saved but plans them with the rest (`skip`), so the pass that was
    killed is the same group of edits again and resumes from its checkpoint; the result is the uninterrupted one."""
    lm = tiny_model("llama", n_layers=3)
    heads = [HeadSet.parse("L0H1"), HeadSet.parse("L0H2"), HeadSet.parse("L0H3"), HeadSet.parse("L0H0,L1H1")]
    lrs = [0.05, 0.02, 0.01, 0.03]
    cfg = dict(CFG, precision="fp32", max_parallel=2)
    whole = train_edits(lm, heads, pairs(8), pairs(4, 50), config=cfg, lrs=lrs)
    passes: list[list[str]] = []
    real_stack, real_logps = train_mod.train_stack, train_mod.StackRunner.logps
    import locaudit.edit.multi as multi_mod

    def recording(lm_, hs, *a, **k):
        passes.append([h.name for h in hs])
        return real_stack(lm_, hs, *a, **k)

    calls = [0]

    def dying(self, enc, idx, states):
        if torch.is_grad_enabled() and len(passes) == 2:  # inside the second pass
            calls[0] += 1
            if calls[0] > 3:
                raise Killed()
        return real_logps(self, enc, idx, states)

    monkeypatch.setattr(multi_mod, "train_stack", recording)
    monkeypatch.setattr(train_mod.StackRunner, "logps", dying)
    saved = {}
    with pytest.raises(Killed):
        train_edits(lm, heads, pairs(8), pairs(4, 50), config=cfg, lrs=lrs, resume_dir=tmp_path,
                    on_done=lambda i, e, lg: saved.setdefault(i, (e, lg)))
    assert len(passes) == 2 and len(saved) == 2  # the first pass's edits were saved, the second pass was killed
    monkeypatch.setattr(train_mod.StackRunner, "logps", real_logps)
    passes.clear()
    again = train_edits(lm, heads, pairs(8), pairs(4, 50), config=cfg, lrs=lrs, resume_dir=tmp_path, skip=list(saved))
    assert all(again[i] is None for i in saved) and len(passes) == 1
    rest = [i for i in range(4) if i not in saved]
    assert all(again[i][1].resumed_at == [1] for i in rest)  # 3 micro-batches: the checkpoint after step 1
    same([whole[i] for i in rest], [again[i] for i in rest])
    same([whole[i] for i in saved], [saved[i] for i in saved])


WARM = dict(CFG, warmup_ratio=0.5)  # 12 steps, the first 6 of them warm-up


def _as_saved_before_the_warmup_rule(path, change) -> None:
    """Rewrite a pass checkpoint as locaudit wrote it before patience skipped the warm-up (no count_from),
    then apply `change` to its early-stopping record."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["locaudit_pass"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    stopper = meta["info"]["stopper"]
    del stopper["count_from"]
    change(stopper)
    save_file(tensors, str(path), metadata={"locaudit_pass": json.dumps(meta)})


def _warm_run(lm, resume_dir=None, kill_after=None, monkeypatch=None):
    return run(lm, "fp32", resume_dir, kill_after, monkeypatch=monkeypatch, cfg=WARM)


def test_an_older_checkpoint_counts_its_warmup_evaluations_again(tmp_path, monkeypatch) -> None:
    """A checkpoint saved inside the warm-up by the old count (evaluations there counted against patience) resumes
    with each edit's count taken again from its curve: the pass ends where an uninterrupted one does."""
    lm = tiny_model("llama", n_layers=3)
    whole = _warm_run(lm)
    with pytest.raises(Killed):
        _warm_run(lm, tmp_path / "p", 8, monkeypatch)  # 4 steps done, inside the 6-step warm-up
    (f,) = (tmp_path / "p").glob("pass-*/pass.safetensors")
    _as_saved_before_the_warmup_rule(f, lambda s: s.update(bad=[2 if at is None else b
                                                               for b, at in zip(s["bad"], s["stopped_at"])]))
    resumed = _warm_run(lm, tmp_path / "p")
    assert [lg.resumed_at for _, lg in resumed] == [[4]] * 3
    same(whole, resumed)


def test_an_older_checkpoint_with_an_edit_stopped_in_its_warmup_trains_the_pass_again(tmp_path, monkeypatch,
                                                                                        caplog) -> None:
    lm = tiny_model("llama", n_layers=3)
    whole = _warm_run(lm)
    with pytest.raises(Killed):
        _warm_run(lm, tmp_path / "p", 8, monkeypatch)
    (f,) = (tmp_path / "p").glob("pass-*/pass.safetensors")
    _as_saved_before_the_warmup_rule(f, lambda s: s.update(stopped_at=[None, 3, None]))  # edit 1, by the old count
    with caplog.at_level(logging.WARNING, logger="locaudit.edit.train"):
        again = _warm_run(lm, tmp_path / "p")
    assert any("not resuming" in r.getMessage() and "warm-up" in r.getMessage() for r in caplog.records)
    assert all(lg.resumed_at == [] for _, lg in again)
    same(whole, again)
