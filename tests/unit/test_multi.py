"""Batched multi-edit training equals separate runs with the same seed."""

from __future__ import annotations

import pytest
import torch

from locaudit.data.types import PreferencePair
from locaudit.edit import reference as reference_mod
from locaudit.edit import train as train_mod
from locaudit.edit.multi import train_edits
from locaudit.edit.train import train_edit
from locaudit.heads import HeadSet
from locaudit.models.tiny import tiny_model


def toy_pairs(n: int, offset: int = 0) -> list[PreferencePair]:
    return [PreferencePair(f"q{i}", f"What is item {i}?", f"It is good {i % 4}.", f"Bad bad {i % 3}!")
            for i in range(offset, offset + n)]


@pytest.fixture(autouse=True)
def _fresh_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAUDIT_CACHE", str(tmp_path / "cache"))
    reference_mod.clear_memory()
    train_mod.PREFIX_CACHE.clear()


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_multi_edit_equals_separate_runs(family):
    lm = tiny_model(family, n_layers=4)
    # different layers and sizes, hence different default learning rates per edit
    heads = [HeadSet.parse("L3H1"), HeadSet.parse("L1H0,L2H3"), HeadSet.layer(2, lm.sites.n_heads), HeadSet.parse("L0H2")]
    cfg = dict(progress=False, reference_disk_cache=False, autocast=False, epochs=2, batch_size=3,
               prefix_dtype="fp32", max_grad_norm=0.05)  # small clip norm: clipping is active and per edit
    train, val = toy_pairs(9), toy_pairs(4, 50)
    together = train_edits(lm, heads, train, val, config=dict(cfg, max_parallel=4))
    assert [e.heads for e, _ in together] == heads
    assert len({lg.lr for _, lg in together}) > 1
    for hs, (e_multi, l_multi) in zip(heads, together):
        e_one, l_one = train_edit(lm, hs, train, val, config=cfg)
        assert e_one.b.abs().sum() > 0
        torch.testing.assert_close(e_multi.b, e_one.b, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(e_multi.a, e_one.a, rtol=1e-4, atol=1e-6)
        assert l_multi.after["val_loss"] == pytest.approx(l_one.after["val_loss"], rel=1e-4)
        assert [s["loss"] for s in l_multi.steps] == pytest.approx([s["loss"] for s in l_one.steps], rel=1e-4)


def test_groups_sorted_by_lowest_layer_keep_input_order():
    lm = tiny_model("llama", n_layers=4)
    heads = [HeadSet.parse(f"L{l}H{h}") for l, h in [(3, 0), (0, 1), (2, 2), (1, 3), (3, 3)]]
    out = train_edits(lm, heads, toy_pairs(4), None, config=dict(progress=False, reference_disk_cache=False,
                                                                   autocast=False, epochs=1, max_parallel=2))
    assert [e.heads for e, _ in out] == heads
    # sorted by lowest layer in groups of 2: {L0H1, L1H3}, {L2H2, L3H0}, {L3H3}
    assert [lg.lowest_layer for _, lg in out] == [2, 0, 2, 0, 3]
