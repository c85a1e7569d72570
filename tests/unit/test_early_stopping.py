"""Early stopping on validation (TrainConfig.eval_every) and dose snapshots (snapshot_steps) on tiny models:
the edit returned is the best-validation state, per edit inside a multi-edit pass, under fp32 and bf16; with
both off, training is bit-for-bit what it was."""

from __future__ import annotations

import pytest
import torch

from locaudit.edit import train as train_mod
from locaudit.edit.config import TrainConfig
from locaudit.edit.lora import build_stack
from locaudit.edit.multi import train_edits
from locaudit.edit.stopping import EarlyStopping
from locaudit.edit.train import train_edit
from locaudit.errors import ConfigError
from locaudit.heads import HeadSet
from locaudit.models.tiny import tiny_model
from train_fixtures import toy_pairs as pairs

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_caches")


BASE = dict(progress=False, reference_disk_cache=False, epochs=3, batch_size=2, warmup_ratio=0.0)


def test_stopper_keeps_the_best_state_and_stops_after_patience() -> None:
    lm = tiny_model("llama", n_layers=2)
    stack = build_stack(lm.sites, [HeadSet.parse("L0H0"), HeadSet.parse("L1H1")])
    stop = EarlyStopping(stack, patience=2, min_delta=0.01)
    curves = [[5.0, 4.0, 3.0, 3.5, 4.0, 5.0], [5.0, 4.995, 4.99, 4.985, 4.98, 4.0]]  # edit 1: tiny steps only
    for step in range(6):
        with torch.no_grad():
            for e in range(2):
                for p in stack.edit_parameters(e):
                    p.fill_(float(step))
        stop.update(step, [curves[0][step], curves[1][step]])
    assert stop.best_step == [2, 0] and stop.best_loss == [3.0, 5.0]
    assert stop.stopped_at == [4, 2]  # two evaluations without a 0.01 improvement
    assert stop.all_stopped
    stop.restore_best()
    assert all(float(p.detach().max()) == 2.0 for p in stack.edit_parameters(0))
    assert all(float(p.detach().abs().max()) == 0.0 for p in stack.edit_parameters(1))


def test_evaluations_inside_the_warmup_do_not_count_against_patience() -> None:
    lm = tiny_model("llama", n_layers=2)
    flat = [5.0] * 12
    for count_from, stop_at in ((0, 2), (5, 6), (11, None)):
        stack = build_stack(lm.sites, [HeadSet.parse("L0H0")])
        stop = EarlyStopping(stack, patience=2, count_from=count_from)
        for step, loss in enumerate(flat):
            stop.update(step, [loss])
        assert stop.stopped_at == [stop_at] and stop.best_step == [0]
    stack = build_stack(lm.sites, [HeadSet.parse("L0H0")])  # an improvement after the warm-up resets the count
    stop = EarlyStopping(stack, patience=2, count_from=3)
    for step, loss in enumerate([5.0, 5.0, 5.0, 5.0, 4.0, 4.0, 4.0, 4.0]):
        stop.update(step, [loss])
    assert stop.best_step == [4] and stop.stopped_at == [6]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_an_edit_that_gains_nothing_trains_through_its_warmup(precision) -> None:
    """min_delta = 1 makes every evaluation count as no improvement. 6 pairs in micro-batches of 2 for 4 epochs:
    12 steps, the first 6 of them warm-up. Patience 2 then stops the edit at step 7 (its evaluations at steps 6 and 7),
    not at step 2 inside the warm-up where the learning rate is still a fraction of the one chosen."""
    lm = tiny_model("llama", n_layers=2)
    cfg = dict(BASE, precision=precision, warmup_ratio=0.5, eval_every=1, patience=2, max_epochs=4, min_delta=1.0)
    edit, lg = train_edit(lm, HeadSet.parse("L0H1"), pairs(6), pairs(3, 40), config=cfg)
    made = TrainConfig.make(**{k: v for k, v in cfg.items() if k != "precision"})
    assert made.total_steps(6) == 12 and made.warmup_steps(6) == 6 and made.earliest_stop(6) == 7
    assert lg.patience_from == 6 and lg.stopped_step == 7 and lg.best["step"] == 0
    assert [s["step"] for s in lg.steps] == list(range(7))  # it trained until its stop, no step after it
    assert lg.to_dict()["patience_from"] == 6 and edit.meta["curve"]["patience_from"] == 6
    assert float(edit.b.abs().max()) == 0.0  # the state kept is the unedited one


def test_the_earliest_stop_counts_from_the_first_check_after_the_warmup() -> None:
    cfg = TrainConfig.make(batch_size=4, max_epochs=4, eval_every=16, patience=3, warmup_ratio=0.1)
    assert cfg.total_steps(1024) == 1024 and cfg.warmup_steps(1024) == 103
    assert cfg.earliest_stop(1024) == 112 + 2 * 16  # checks at 112, 128, 144
    assert cfg.model_copy(update={"warmup_ratio": 0.0}).earliest_stop(1024) == 48  # checks at 16, 32, 48
    assert cfg.model_copy(update={"eval_every": None}).earliest_stop(1024) == 2 * 256  # epochs (2) without it
    assert cfg.model_copy(update={"patience": 100}).earliest_stop(1024) == 1024  # never before the cap


def test_a_curve_stopped_inside_its_warmup_by_the_old_count_is_stale() -> None:
    from locaudit.edit.stopping import stopped_in_warmup

    evals = [{"step": s, "val_loss": 25.0} for s in range(0, 65, 16)]
    old = {"evals": evals, "stopped_step": 64}
    assert stopped_in_warmup(old, warmup_steps=103, patience=3)
    assert not stopped_in_warmup(old, warmup_steps=32, patience=3)  # its 3 counted checks (32, 48, 64) after it
    assert stopped_in_warmup(old, warmup_steps=33, patience=3)
    assert not stopped_in_warmup({**old, "patience_from": 103}, warmup_steps=103, patience=3)  # today's count
    assert not stopped_in_warmup({"evals": evals, "stopped_step": None}, warmup_steps=103, patience=3)
    late = {"evals": [{"step": s} for s in range(0, 193, 16)], "stopped_step": 192}
    assert not stopped_in_warmup(late, warmup_steps=103, patience=3)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_returned_edit_is_the_best_validation_snapshot(precision) -> None:
    """Validation on the training pairs with a high learning rate and a wide IPO target (tau = 2: a gap of 0.25)
    overshoots: the loss falls, then rises. The edit returned is the snapshot at the best evaluated step."""
    lm = tiny_model("llama", n_layers=2)
    train = pairs(6)
    total = 3 * 3
    cfg = dict(BASE, precision=precision, tau=2.0, lr=0.05, eval_every=1, patience=100,
               snapshot_steps=list(range(1, total + 1)))
    edit, log = train_edit(lm, HeadSet.parse("L0H1,L1H0"), train, train, config=cfg)
    losses = [e["val_loss"] for e in log.evals]
    assert [e["step"] for e in log.evals] == list(range(total + 1))
    best = min(range(len(losses)), key=lambda i: losses[i])
    assert log.best["step"] == best and log.after["val_loss"] == pytest.approx(losses[best])
    assert 0 < best < total and losses[-1] > losses[best]  # the case the test is about: a rise after the best
    a, b = log.snapshots[best]
    assert torch.equal(edit.a, a) and torch.equal(edit.b, b)
    assert sorted(log.snapshots) == list(range(1, total + 1))
    d = log.to_dict()
    assert d["best"]["step"] == best and d["snapshot_steps"] == list(range(1, total + 1)) and "snapshots" not in d
    assert edit.meta["config"]["eval_every"] == 1  # the curve and its settings are in the edit's meta
    assert [e["step"] for e in edit.meta["curve"]["evals"]] == list(range(total + 1))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_each_edit_of_a_pass_stops_on_its_own(precision) -> None:
    lm = tiny_model("llama", n_layers=3)
    heads = [HeadSet.parse("L0H1"), HeadSet.parse("L1H0,L2H2"), HeadSet.parse("L2H3")]
    train = pairs(6)
    cfg = dict(BASE, precision=precision, tau=2.0, eval_every=1, patience=2, max_epochs=6,
               snapshot_steps=list(range(1, 19)), max_parallel=3, group_copy_cost=0.0)
    out = train_edits(lm, heads, train, train, config=cfg, lrs=[0.2, 1e-4, 0.05])
    assert len({lg.lowest_layer for _, lg in out}) == 1  # one pass
    for edit, lg in out:
        losses = {e["step"]: e["val_loss"] for e in lg.evals}
        best = min(losses, key=losses.get)
        assert lg.best["step"] == best
        if best == 0:
            assert float(edit.b.abs().max()) == 0.0  # no step beat the unedited model: the identity edit
        else:
            a, b = lg.snapshots[best]
            assert torch.equal(edit.a, a) and torch.equal(edit.b, b)
        if lg.stopped_step is not None:  # patience ran out: its curve ends there, no snapshot after it
            assert max(losses) == lg.stopped_step and lg.stopped_step - best == 2
            assert all(s <= lg.stopped_step for s in lg.snapshots)
    assert out[0][1].stopped_step is not None  # the edit with the high learning rate overshoots and stops
    if all(lg.stopped_step is not None for _, lg in out):
        assert out[0][1].steps_run == max(lg.stopped_step for _, lg in out)  # the pass ended with the last one


def test_disabled_is_bitwise_unchanged() -> None:
    lm = tiny_model("llama", n_layers=2)
    heads = HeadSet.parse("L0H1,L1H0")
    train, val = pairs(6), pairs(3, 40)
    cfg = dict(BASE, precision="fp32")
    e0, l0 = train_edit(lm, heads, train, val, config=cfg)
    e1, l1 = train_edit(lm, heads, train, val, config=dict(cfg, snapshot_steps=[0.5, 3]))  # snapshots only
    assert torch.equal(e0.a, e1.a) and torch.equal(e0.b, e1.b)
    assert l0.steps == l1.steps and l0.epochs == l1.epochs
    assert sorted(l1.snapshots) == [3, 4]  # 9 planned steps: half of them is step round(4.5) = 4
    # the records of a run without the new settings are what they were before them
    assert set(l0.to_dict()) == {"heads", "lr", "steps", "epochs", "before", "seconds", "n_train", "n_val",
                                 "lowest_layer", "frozen_prefix", "tiled_logps", "packed_pairs",
                                 "gradient_checkpointing", "diverged"}
    assert not set(TrainConfig.NEW_FIELDS) & set(e0.meta["config"])
    assert TrainConfig().key_dump() == {k: v for k, v in TrainConfig().model_dump().items()
                                        if k not in TrainConfig.NEW_FIELDS}


def test_early_stopping_needs_validation_pairs() -> None:
    lm = tiny_model("llama", n_layers=2)
    with pytest.raises(ConfigError, match="eval_every"):
        train_edit(lm, HeadSet.parse("L0H1"), pairs(4), None, config=dict(BASE, precision="fp32", eval_every=1))


def test_snapshot_steps_are_checked() -> None:
    with pytest.raises(ConfigError, match="snapshot_steps"):
        TrainConfig.make(snapshot_steps=[1.5])
    assert TrainConfig.make(snapshot_steps=[0.5, 2]).resolved_snapshots(9) == [2, 4]
    assert TrainConfig.make(snapshot_steps=[0.01, 20]).resolved_snapshots(9) == [1]


def test_learning_curves_figure(tmp_path) -> None:
    """The report's figure reads the curve as make_edit records it in the edit's meta."""
    from locaudit.study.figures_training import curve_points, learning_curves

    lm = tiny_model("llama", n_layers=2)
    out = train_edits(lm, [HeadSet.parse("L0H1"), HeadSet.parse("L1H0")], pairs(6), pairs(3, 40),
                      config=dict(BASE, precision="fp32", eval_every=2, patience=2))
    curves = [(e.heads.name, "random", e.meta["curve"]) for e, _ in out]
    xs, ys, kept = curve_points(curves[0][2])
    assert xs[0] == 0 and xs == sorted(xs) and kept == (out[0][1].best["step"], pytest.approx(out[0][1].best["val_loss"]))
    assert learning_curves(curves, tmp_path / "lc.png").is_file()
    assert learning_curves([("x", "top", {"epochs": [], "steps": []})], tmp_path / "none.png") is None


def test_a_long_pass_logs_its_progress(monkeypatch, caplog) -> None:
    """A pass logs where it is at early-stopping checks (at most every PROGRESS_EVERY_S) and when it ends: a
    study's group of edits that trains for an hour is not silent."""
    lm = tiny_model("llama", n_layers=2)
    cfg = dict(BASE, eval_every=1, patience=100)
    monkeypatch.setattr(train_mod, "PROGRESS_EVERY_S", 0.0)
    with caplog.at_level("INFO", logger="locaudit.edit.train"):
        train_edit(lm, HeadSet.parse("L0H1"), pairs(4), pairs(4), config=cfg)
    lines = [r.getMessage() for r in caplog.records]
    checks = [m for m in lines if "validation IPO loss" in m]
    assert len(checks) == 3 * 2 + 1 and "step 6 of at most 6" in checks[-1] and "0 of 1 edit(s) stopped" in checks[-1]
    assert any("trained 6 step(s)" in m for m in lines)
    caplog.clear()
    monkeypatch.setattr(train_mod, "PROGRESS_EVERY_S", 1e9)
    with caplog.at_level("INFO", logger="locaudit.edit.train"):
        train_edit(lm, HeadSet.parse("L0H1"), pairs(4), pairs(4), config=cfg)
    assert not [r for r in caplog.records if "validation IPO loss" in r.getMessage()]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_stopped_edits_leave_the_batch_with_the_numbers_of_separate_runs(precision, monkeypatch) -> None:
    """Once early stopping stops an edit of a pass, the batch carries copies for the other edits only (the rest of
    the pass costs less), and every edit is still what training it alone gives: same best step, same parameters
    within the rounding of a differently sized GEMM."""
    lm = tiny_model("llama", n_layers=3)
    heads = [HeadSet.parse("L0H1"), HeadSet.parse("L1H0,L2H2"), HeadSet.parse("L2H3")]
    lrs = [0.2, 1e-4, 0.05]
    train = pairs(6)
    cfg = dict(BASE, precision=precision, tau=2.0, eval_every=1, patience=2, max_epochs=6, max_parallel=3,
               group_copy_cost=0.0)
    copies: list[int] = []
    real = train_mod.StackRunner.logps

    def counting(self, enc, idx, states):
        copies.append(self.stack.n_active)
        return real(self, enc, idx, states)

    monkeypatch.setattr(train_mod.StackRunner, "logps", counting)
    out = train_edits(lm, heads, train, train, config=cfg, lrs=lrs)
    stops = [lg.stopped_step for _, lg in out]
    assert stops[0] is not None and any(s is None or s > stops[0] for s in stops)  # one edit stops before another
    assert copies[0] == 3 and min(copies) < 3 and copies == sorted(copies, reverse=True)
    for (edit, lg), hs, lr in zip(out, heads, lrs):
        if lg.stopped_step is not None:  # no training step after its stop
            assert all(s["step"] < lg.stopped_step for s in lg.steps)
        alone, lg1 = train_edit(lm, hs, train, train, config=dict(cfg, lr=lr, max_parallel=1))
        assert lg.best["step"] == lg1.best["step"] and lg.stopped_step == lg1.stopped_step
        tol = 1e-4 if precision == "fp32" else 2e-2
        torch.testing.assert_close(edit.b, alone.b, rtol=tol, atol=tol * max(1e-6, float(alone.b.abs().max())))
        torch.testing.assert_close(edit.a, alone.a, rtol=tol, atol=tol * float(alone.a.abs().max()))


def test_set_active_checks_its_subset() -> None:
    lm = tiny_model("llama", n_layers=2)
    stack = build_stack(lm.sites, [HeadSet.parse("L0H0"), HeadSet.parse("L1H1"), HeadSet.parse("L1H0")])
    stack.set_active([0, 2])
    assert stack.n_active == 2
    stack.set_active([0, 1, 2])
    assert stack.active is None and stack.n_active == 3
    for bad in ([], [2, 0], [0, 0], [3], [-1]):
        with pytest.raises(ConfigError, match="set_active"):
            stack.set_active(bad)
