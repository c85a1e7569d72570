"""Real SmolLM2 on TruthfulQA: collect head activations for a few hundred probe examples, probe, print the best heads."""

import time

import pytest
import torch
from locaudit.models.precision import resolve_precision as _P  # resolved once, as entry points do

pytestmark = pytest.mark.slow


def test_collect_and_probe_truthfulqa(smollm2, shared_data, tmp_path, monkeypatch):
    from locaudit.data.behaviour import load_behaviour
    from locaudit.localize.activations import ActivationSet, collect_activations, collect_probe_activations
    from locaudit.localize.probe import probe_activations

    monkeypatch.setenv("LOCAUDIT_CACHE", str(tmp_path / "cache"))  # after the model fixture: only activations here
    csv = shared_data / "truthfulqa" / "data" / "v1" / "TruthfulQA.csv"
    data = load_behaviour(f"truthfulqa:{csv}", seed=0, max_questions=24)
    t = time.perf_counter()
    acts = collect_probe_activations(smollm2, data, "plain", out_dir=tmp_path / "acts", batch_size=32,
                                     precision=_P('auto'), progress=False)
    took = time.perf_counter() - t
    N = len(acts)
    assert 120 <= N <= 400 and acts.shape[1:] == (30, 9, 64)
    assert torch.isfinite(acts.heads).all() and acts.heads.abs().sum() > 0
    assert {e["split"] for e in acts.examples} == {"train", "val", "test"}
    print(f"\ncollected {N} examples in {took:.1f} s ({N / took:.1f} examples/s, precision auto)")

    # the batched, padded rows (auto: bf16 where fast, else fp32) match one-at-a-time fp32 collection up to bf16 precision
    few = [0, N // 2, N - 1]
    ref = collect_activations(smollm2, [acts.examples[i]["text"] for i in few], batch_size=1, progress=False, precision=_P('fp32'))
    rel = (acts.heads[few] - ref).norm() / ref.norm()
    assert rel < 0.05, f"relative difference {rel:.3f}"

    t = time.perf_counter()
    again = collect_probe_activations(smollm2, data, "plain", batch_size=32, precision=_P('auto'),
                                      progress=False)
    assert time.perf_counter() - t < 5 and torch.equal(again.heads, acts.heads)  # read from the cache

    res = probe_activations(ActivationSet.load(tmp_path / "acts"))
    res.save(tmp_path / "probe")
    assert res.train_acc.mean() > res.val_acc.mean()  # probes fit their train split
    assert res.val_acc.max() > 0.6  # some head carries truthfulness signal above chance
    print("best heads (val acc):", ", ".join(f"L{l}H{h} {res.val_acc[l, h]:.2f}" for l, h in res.ranking()[:10]))
    assert (tmp_path / "probe" / "probe_heatmap.png").stat().st_size > 5000
