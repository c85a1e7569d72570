"""Batched multi-edit training equals separate runs with the same seed."""

from __future__ import annotations

import pytest
import torch

from locaudit.edit import train as train_mod
from locaudit.edit.multi import plan_groups, train_edits
from locaudit.edit.train import train_edit
from locaudit.heads import HeadSet
from locaudit.models.tiny import tiny_model
from train_fixtures import toy_pairs

pytestmark = pytest.mark.usefixtures("fresh_caches")


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_multi_edit_equals_separate_runs(family):
    lm = tiny_model(family, n_layers=4)
    # different layers and sizes, hence different default learning rates per edit
    heads = [HeadSet.parse("L3H1"), HeadSet.parse("L1H0,L2H3"), HeadSet.layer(2, lm.sites.n_heads), HeadSet.parse("L0H2")]
    cfg = dict(progress=False, reference_disk_cache=False, precision="fp32", epochs=2, batch_size=3,
               max_grad_norm=0.05)  # small clip norm: clipping is active and per edit
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
                                                                   precision="fp32", epochs=1, max_parallel=2,
                                                                   group_copy_cost=0.0))
    assert [e.heads for e, _ in out] == heads
    # sorted by lowest layer in groups of 2: {L0H1, L1H3}, {L2H2, L3H0}, {L3H3}
    assert [lg.lowest_layer for _, lg in out] == [2, 0, 2, 0, 3]
    # at the CPU's copy cost the plan changes: {L0H1, L1H3} (2 x 4 x 0.85 < 4 + 3 layers), {L2H2} alone, {L3H0, L3H3}
    out = train_edits(lm, heads, toy_pairs(4), None, config=dict(progress=False, reference_disk_cache=False,
                                                                   precision="fp32", epochs=1, max_parallel=2,
                                                                   group_copy_cost=0.85))
    assert [lg.lowest_layer for _, lg in out] == [3, 0, 2, 0, 3]


def brute_force_cost(starts, L, m, c):
    """Cheapest split of sorted `starts` into contiguous groups of <= m, by trying every cut set."""
    import itertools

    n, best = len(starts), float("inf")
    for mask in itertools.product([0, 1], repeat=n - 1):
        cuts = [0] + [i + 1 for i, b in enumerate(mask) if b] + [n]
        groups = list(zip(cuts, cuts[1:]))
        if any(j - i > m for i, j in groups):
            continue
        best = min(best, sum((L - starts[i]) * (1.0 if j - i == 1 else (j - i) * c) for i, j in groups))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_plan_groups_is_optimal_and_covers_every_edit(seed):
    import random

    rng = random.Random(seed)
    starts = sorted(rng.randrange(30) for _ in range(rng.randint(1, 9)))
    m, c = rng.randint(1, 5), rng.choice([0.0, 0.5, 0.85, 1.2])
    groups = plan_groups(starts, 30, m, c)
    assert groups[0][0] == 0 and groups[-1][1] == len(starts)
    assert all(a[1] == b[0] for a, b in zip(groups, groups[1:])) and all(0 < j - i <= m for i, j in groups)
    cost = sum((30 - starts[i]) * (1.0 if j - i == 1 else (j - i) * c) for i, j in groups)
    assert cost == pytest.approx(brute_force_cost(starts, 30, m, c))


def test_plan_groups_examples():
    # 8 single heads spread over 30 layers (CPU): nothing gained by one shared pass from layer 3
    assert len(plan_groups([3, 8, 12, 15, 19, 22, 25, 28], 30, 8, 0.85)) > 1
    assert plan_groups([5, 5, 5, 5], 30, 8, 0.85) == [(0, 4)]  # same layer: one pass
    assert plan_groups([5, 5, 5, 5], 30, 2, 0.85) == [(0, 2), (2, 4)]
    assert plan_groups([5, 5], 30, 8, 1.5) == [(0, 1), (1, 2)]  # a copy dearer than a run: never group
    with pytest.raises(ValueError, match="ascending"):
        plan_groups([3, 1], 30, 8, 0.85)


@pytest.mark.parametrize("precision,tol", [("fp32", 1e-5), ("bf16", 2e-2)])
def test_grouped_equals_separate_under_each_precision(precision, tol):
    """Grouped training equals separate training within rounding: fp32 (one GEMM over E stacked copies vs
    one copy: the BLAS blocking differs, ~1e-7 relative; not bit-identical) and bf16 (the exact prefix cache
    keeps the difference at bf16 rounding of the edited layers, not of the cached states)."""
    lm = tiny_model("llama", n_layers=4)
    heads = [HeadSet.parse("L3H1"), HeadSet.parse("L2H0,L3H3")]
    cfg = dict(progress=False, reference_disk_cache=False, precision=precision, epochs=2, batch_size=3, lr=1e-2,
               group_copy_cost=0.0)
    train, val = toy_pairs(6), toy_pairs(3, 50)
    together = train_edits(lm, heads, train, val, config=dict(cfg, max_parallel=2))
    assert len({lg.lowest_layer for _, lg in together}) == 1  # one shared pass
    for hs, (e_multi, _) in zip(heads, together):
        e_one, _ = train_edit(lm, hs, train, val, config=cfg)
        assert e_one.b.abs().sum() > 0
        scale = float(e_one.b.abs().max())
        torch.testing.assert_close(e_multi.b, e_one.b, rtol=tol, atol=tol * scale)
        torch.testing.assert_close(e_multi.a, e_one.a, rtol=tol, atol=tol * float(e_one.a.abs().max()))


def test_each_edit_is_handed_over_as_its_group_ends():
    """`on_done` sees every edit once, group by group (before the next group trains), with the returned edit:
    what lets a study save each edit at once, so a run killed part way keeps the groups already trained."""
    lm = tiny_model("llama", n_layers=4)
    heads = [HeadSet.parse(f"L{l}H{h}") for l, h in [(3, 0), (0, 1), (2, 2), (1, 3), (3, 3)]]
    seen: list[tuple[int, object, int]] = []
    calls_at_start: list[int] = []
    real_stack = train_mod.train_stack

    def counting_stack(*a, **k):  # how many edits had been handed over when each group started
        calls_at_start.append(len(seen))
        return real_stack(*a, **k)

    import locaudit.edit.multi as multi_mod

    orig = multi_mod.train_stack
    multi_mod.train_stack = counting_stack
    try:
        out = train_edits(lm, heads, toy_pairs(4), None, on_done=lambda i, e, lg: seen.append((i, e, lg.lowest_layer)),
                          config=dict(progress=False, reference_disk_cache=False, precision="fp32", epochs=1,
                                      max_parallel=2, group_copy_cost=0.0))
    finally:
        multi_mod.train_stack = orig
    assert sorted(i for i, _, _ in seen) == list(range(len(heads)))
    assert all(out[i][0] is e for i, e, _ in seen)
    assert [i for i, _, _ in seen] == [1, 3, 2, 0, 4]  # groups {L0H1, L1H3}, {L2H2, L3H0}, {L3H3}
    assert calls_at_start == [0, 2, 4]  # each group's edits were handed over before the next group started
