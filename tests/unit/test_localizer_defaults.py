"""Head localizers that locate behaviour: the defaults (contrast corruption, completion positions, 48 pairs), position
0 never noised (the former noise is kept behind noise_pos0), and the top-K stability between disjoint pair sets,
by hand and as the localizers record it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from locaudit.data.types import PreferencePair
from locaudit.errors import DataError
from locaudit.localize.corruptions import PatchingConfig, batch_noise, collate_completions, prompt_noise
from locaudit.localize.stability import topk_stability
from locaudit.models.precision import resolve_precision
from locaudit.models.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
PAIRS = [PreferencePair(f"q{i}", f"What is {i} plus {i}?", f"It is {2 * i}.", f"Maybe {i + 7} or so")
         for i in range(6)]


def test_defaults_locate_behaviour():
    c = PatchingConfig()
    assert (c.corruption, c.positions, c.noise_pos0, c.resolved_direction) == ("contrast", "completion", False, "noise")
    assert c.max_pairs >= 48


def test_position_0_is_never_noised_unless_asked():
    batch = collate_completions([([5, 6, 7], [8]), ([5, 9], [8, 8]), ([5, 6, 7], [3]), ([5, 9], [4])], 0)
    z = batch_noise(batch, [0, 1], 4, seed=3, scale=2.0)
    old = batch_noise(batch, [0, 1], 4, seed=3, scale=2.0, pos0=True)
    assert torch.equal(z[:, 0], torch.zeros(4, 4))
    assert torch.equal(z[:, 1:], old[:, 1:])  # the other positions keep their draw
    assert torch.equal(old[0, :3], prompt_noise(0, 3, 4, 3) * 2.0) and old[0, 0].abs().sum() > 0
    assert torch.equal(z[0, 3:], torch.zeros(z.shape[1] - 3, 4))  # completions and padding: never


def test_stability_by_hand():
    # identical pairs: both halves rank the same heads, overlap 1, Spearman 1
    g = torch.Generator().manual_seed(0)
    one = torch.randn(1, 3, 4, generator=g)
    s = topk_stability(one.repeat(6, 1, 1), k=3)
    assert s["overlap"] == 1.0 and s["jaccard"] == 1.0 and s["spearman"] == pytest.approx(1.0)
    assert s["half_pairs"] == 3 and s["chance"] == pytest.approx(3 / 12)
    # two pairs that agree on nothing: pair 0 ranks L0H0 > L0H1 > ..., pair 1 the reverse
    a = torch.arange(12, dtype=torch.float32).view(1, 3, 4).flip(-1).flip(-2)  # L0H0 = 11, ..., L2H3 = 0
    per = torch.cat([a, 11 - a])
    s = topk_stability(per, k=2)
    assert s["overlap"] == 0.0 and s["jaccard"] == 0.0 and s["spearman"] == pytest.approx(-1.0)
    assert {tuple(s["top_a"]), tuple(s["top_b"])} == {("L0H0", "L0H1"), ("L2H2", "L2H3")}
    assert s["layer_hist"]["a"] in ([2, 0, 0], [0, 0, 2]) and sum(s["layer_hist"]["all"]) == 2
    # signed ranking: a head with a large negative effect ranks last, not first
    neg = torch.zeros(4, 1, 3)
    neg[:, 0, 0], neg[:, 0, 1] = -5.0, 1.0
    assert topk_stability(neg, k=1, rank_by="signed")["top_all"] == ["L0H1"]
    assert topk_stability(neg, k=1)["top_all"] == ["L0H0"]
    with pytest.raises(DataError, match="at least 2"):
        topk_stability(neg[:1], k=1)


@pytest.mark.parametrize("method", ["patching", "attribution"])
def test_localizers_record_stability(method):
    from locaudit.localize.attribution import attribution_patching
    from locaudit.localize.patching import activation_patching

    lm = tiny_model("llama", n_layers=2)
    fn = activation_patching if method == "patching" else attribution_patching
    eff = fn(lm, PAIRS, PatchingConfig(top_k=3), progress=False, precision=resolve_precision("fp32"))
    st = eff.meta["stability"]
    assert st["k"] == 3 and st["n_pairs"] == 6 and 0 <= st["overlap"] <= 1
    assert st == topk_stability(eff.per_example, 3, "abs", 0)
    top = [f"L{l}H{h}" for l, h in eff.top(3).heads]
    assert sorted(st["top_all"]) == sorted(top)
    assert eff.meta["corruption"] == "contrast" and eff.meta["positions"] == "completion"
    assert np.isfinite(eff.effect.numpy()).all() and eff.effect.abs().max() > 0
