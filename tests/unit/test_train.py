"""Trainer of optimal edits on tiny random models: learning, determinism, masks, caches, errors."""

from __future__ import annotations

import pytest
import torch

from locaudit.data.types import PreferencePair
from locaudit.edit import reference as reference_mod
from locaudit.edit import train as train_mod
from locaudit.edit.config import TrainConfig, default_lr
from locaudit.edit.lora import edit_masks
from locaudit.edit.train import TrainingError, train_edit
from locaudit.errors import ConfigError
from locaudit.heads import HeadSet
from locaudit.models.tiny import tiny_model


def toy_pairs(n: int, offset: int = 0) -> list[PreferencePair]:
    """Questions whose preferred answer follows one pattern and the rejected one another."""
    return [PreferencePair(f"q{i}", f"What is item {i}?", f"It is good {i % 4}.", f"Bad bad {i % 3}!")
            for i in range(offset, offset + n)]


BASE = dict(progress=False, reference_disk_cache=False, precision="fp32", warmup_ratio=0.0)


@pytest.fixture(autouse=True)
def _fresh_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAUDIT_CACHE", str(tmp_path / "cache"))
    reference_mod.clear_memory()
    train_mod.PREFIX_CACHE.clear()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_training_raises_margin(family):
    lm = tiny_model(family)
    pairs = toy_pairs(16)
    heads = HeadSet.all(lm.sites.n_layers, lm.sites.n_heads)
    edit, log = train_edit(lm, heads, pairs, pairs, config=dict(BASE, epochs=3, lr=1e-2))
    assert log.after["val_margin"] > log.before["val_margin"] + 0.05
    assert log.after["val_loss"] < log.before["val_loss"]
    assert len(log.steps) == 3 * 4 and all(s["loss"] > 0 for s in log.steps)
    assert edit.b.abs().sum() > 0 and edit.meta["curve"]["epochs"] == log.epochs


def test_masked_entries_stay_exactly_zero(monkeypatch):
    lm = tiny_model("qwen2")
    heads = HeadSet.parse("L1H2,L2H0")
    stack_holder = {}
    real = train_mod.train_stack  # train_edit runs train.train_stack (it no longer goes through multi.py)

    def spy(*a, **k):
        stack_holder["stack"], logs = real(*a, **k)
        return stack_holder["stack"], logs

    monkeypatch.setattr(train_mod, "train_stack", spy)
    edit, _ = train_edit(lm, heads, toy_pairs(8), None, config=dict(BASE, epochs=2, lr=5e-2, weight_decay=0.1))
    stack = stack_holder["stack"]
    b_raw = stack.b_params[0].detach()  # the raw parameter, before masking
    outside = ~stack.b_mask[0]
    assert torch.count_nonzero(b_raw[outside.expand_as(b_raw)]) == 0
    assert b_raw[(~outside).expand_as(b_raw)].abs().sum() > 0
    a_mask, b_mask = edit_masks(lm.sites, heads, True)
    assert torch.count_nonzero(edit.b * ~b_mask) == 0 and torch.count_nonzero(edit.a * ~a_mask) == 0
    assert torch.count_nonzero(edit.b[1, :, lm.sites.head_slice(2)]) > 0


def test_same_seed_same_result_different_seed_differs():
    lm = tiny_model("llama")
    heads = HeadSet.parse("L1H0,L2H3")
    cfg = dict(BASE, epochs=1, lr=1e-2)
    e1, _ = train_edit(lm, heads, toy_pairs(8), None, config=dict(cfg, seed=3))
    e2, _ = train_edit(lm, heads, toy_pairs(8), None, config=dict(cfg, seed=3))
    e3, _ = train_edit(lm, heads, toy_pairs(8), None, config=dict(cfg, seed=4))
    assert torch.equal(e1.a, e2.a) and torch.equal(e1.b, e2.b)
    assert not torch.equal(e1.b, e3.b)


def test_grad_accum_equals_larger_batch():
    lm = tiny_model("llama")
    heads = HeadSet.layer(1, lm.sites.n_heads)
    cfg = dict(BASE, epochs=1, lr=1e-2, max_grad_norm=None)
    e1, l1 = train_edit(lm, heads, toy_pairs(8), None, config=dict(cfg, batch_size=4, grad_accum=1))
    e2, l2 = train_edit(lm, heads, toy_pairs(8), None, config=dict(cfg, batch_size=2, grad_accum=2))
    assert len(l1.steps) == len(l2.steps) == 2
    torch.testing.assert_close(e1.b, e2.b, rtol=1e-4, atol=1e-6)


def test_bf16_autocast_path_tracks_fp32():
    lm = tiny_model("llama")
    heads = HeadSet.all(lm.sites.n_layers, lm.sites.n_heads)
    pairs = toy_pairs(12)
    cfg = dict(BASE, epochs=2, lr=1e-2)
    _, l32 = train_edit(lm, heads, pairs, pairs, config=dict(cfg, precision="fp32"))
    _, l16 = train_edit(lm, heads, pairs, pairs, config=dict(cfg, precision="bf16"))
    assert l16.after["val_margin"] > l16.before["val_margin"]
    assert l16.after["val_loss"] == pytest.approx(l32.after["val_loss"], rel=0.02)
    for s32, s16 in zip(l32.steps, l16.steps):
        assert s16["loss"] == pytest.approx(s32["loss"], rel=0.02)


def test_reference_computed_once_and_cached_on_disk(monkeypatch):
    lm = tiny_model("llama")
    calls = []
    real = reference_mod.sequence_logps
    monkeypatch.setattr(reference_mod, "sequence_logps", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = dict(BASE, epochs=2, lr=1e-2, reference_disk_cache=True)
    train_edit(lm, HeadSet.parse("L2H1"), toy_pairs(8), toy_pairs(4, 100), config=cfg)
    assert len(calls) == 2  # train and val, once each, not per epoch
    train_edit(lm, HeadSet.parse("L0H1"), toy_pairs(8), toy_pairs(4, 100), config=cfg)
    assert len(calls) == 2  # another trial on the same data: memory cache
    reference_mod.clear_memory()
    train_edit(lm, HeadSet.parse("L1H1"), toy_pairs(8), toy_pairs(4, 100), config=cfg)
    assert len(calls) == 2  # a new process would read the disk cache


def test_nan_loss_names_step_and_batch(monkeypatch):
    lm = tiny_model("llama")
    real = train_mod.pair_loss
    n = {"calls": 0}

    def bad(*a, **k):
        n["calls"] += 1
        out = real(*a, **k)
        return out * float("nan") if n["calls"] == 3 else out

    monkeypatch.setattr(train_mod, "pair_loss", bad)
    with pytest.raises(TrainingError, match=r"optimizer step 2 \(epoch 0, micro-batch 2\) on pairs \[") as e:
        train_edit(lm, HeadSet.parse("L1H1"), toy_pairs(12), None, config=dict(BASE, epochs=1, batch_size=4))
    assert "qids" in str(e.value) and "L1H1" in str(e.value)


def test_config_validation_names_field():
    with pytest.raises(ConfigError, match="TrainConfig.tau"):
        TrainConfig.make(tau=-1)
    with pytest.raises(ConfigError, match="TrainConfig.objective"):
        TrainConfig.make(objective="kto")
    with pytest.raises(ConfigError, match="TrainConfig.bogus"):
        TrainConfig.make(bogus=1)
    for f in TrainConfig.model_fields.values():
        assert f.description


def test_default_learning_rates_follow_paper():
    assert default_lr(1, 270) == pytest.approx(2e-3)
    assert default_lr(16, 270) == pytest.approx(5e-4)
    assert default_lr(270, 270) == pytest.approx(1e-4)
    assert 5e-4 > default_lr(48, 270) > 1e-4
    lm = tiny_model("llama")
    _, log = train_edit(lm, HeadSet.parse("L1H1"), toy_pairs(4), None, config=dict(BASE, epochs=1))
    assert log.lr == pytest.approx(2e-3)


def test_sft_and_dpo_objectives_train():
    lm = tiny_model("llama")
    heads = HeadSet.all(lm.sites.n_layers, lm.sites.n_heads)
    pairs = toy_pairs(8)
    for obj in ("sft", "dpo"):
        _, log = train_edit(lm, heads, pairs, pairs, config=dict(BASE, epochs=2, lr=1e-2, objective=obj))
        assert log.after["val_loss"] < log.before["val_loss"]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bf16_weight_copies_are_bit_identical_to_autocast(family):
    from locaudit.models.fastcast import frozen_bf16_weights

    lm = tiny_model(family)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    heads = HeadSet.all(lm.sites.n_layers, lm.sites.n_heads)
    cfg = dict(BASE, epochs=1, lr=1e-2, precision="bf16")
    e1, l1 = train_edit(lm, heads, toy_pairs(8), toy_pairs(4, 40), config=dict(cfg, cast_frozen_weights=True))
    e0, l0 = train_edit(lm, heads, toy_pairs(8), toy_pairs(4, 40), config=dict(cfg, cast_frozen_weights=False))
    assert torch.equal(e1.b, e0.b) and l1.after == l0.after
    sd = lm.model.state_dict()
    assert all(torch.equal(before[k], sd[k]) and sd[k].dtype == before[k].dtype for k in before)
    with frozen_bf16_weights(lm.model):
        assert lm.sites.o_proj(0).weight.dtype == torch.bfloat16
    assert lm.sites.o_proj(0).weight.dtype == torch.float32
