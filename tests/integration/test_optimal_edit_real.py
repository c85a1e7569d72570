"""Real SmolLM2 on a small TruthfulQA subset: an IPO edit raises held-out preference accuracy."""

from __future__ import annotations

import random

import pytest

pytestmark = pytest.mark.slow


def test_ipo_edit_raises_heldout_preference_accuracy(smollm2, shared_data, tmp_path, monkeypatch):
    from locaudit.data.behaviour import load_behaviour
    from locaudit.edit.lora import LoRAEdit
    from locaudit.edit.train import train_edit
    from locaudit.heads import HeadSet

    monkeypatch.setenv("LOCAUDIT_CACHE", str(tmp_path / "cache"))
    csv = shared_data / "truthfulqa" / "data" / "v1" / "TruthfulQA.csv"
    if not csv.exists():
        pytest.skip(f"{csv} is absent")
    bd = load_behaviour(f"truthfulqa:{csv}", seed=0, max_questions=120)
    train = random.Random(0).sample(bd.pairs("train"), 48)
    val = random.Random(1).sample(bd.pairs("val"), 32)
    L, H = smollm2.sites.n_layers, smollm2.sites.n_heads
    # two late layers (18 heads): the frozen prefix runs only layers 20..29, which bounds the test's time.
    # lr is ~20x the paper's for this size: 24 steps here instead of the paper's thousands.
    heads = HeadSet.parse("L20,L24", L, H)
    edit, log = train_edit(smollm2, heads, train, val,
                           config=dict(epochs=2, lr=1e-2, progress=False, reference_disk_cache=False))
    assert log.frozen_prefix and log.lowest_layer == 20
    assert log.after["val_accuracy"] > log.before["val_accuracy"]
    assert log.after["val_margin"] > log.before["val_margin"]
    edit.save(tmp_path / "edit")
    again = LoRAEdit.load(tmp_path / "edit")
    assert again.heads == heads and again.meta["curve"]["epochs"][-1]["val_accuracy"] == log.after["val_accuracy"]
