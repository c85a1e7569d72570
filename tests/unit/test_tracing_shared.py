"""Causal tracing's shared computation (method="shared": each row runs only above its first restored layer, and
from its restored position on, on the corrupted run's states and KV cache) equals the straightforward one
(method="full": every row through the whole model, which tests/unit/test_tracing.py checks against independent
hooks), for every kind, both measures, the (layer x position) grid, under fp32 and bf16."""

from __future__ import annotations

import pytest
import torch

from locaudit.localize.tracing import TraceConfig, _corrupted_run, trace_fact
from locaudit.models.precision import resolve_precision
from locaudit.models.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT, SUBJECT, TARGET = "The Eiffel Tower is in", "Eiffel Tower", "Paris"
# Both sides run at the same precision; only how rows are batched (and, with shared positions, the attention's
# key length) differs, so fp32 agrees to rounding. Under bf16 autocast each matmul rounds its output to bf16,
# and a different batch shape may round differently: one bf16 ulp (2^-8 relative) of a probability.
# Measured on CPU (tiny llama, gpt2, gemma3, opt, qwen2, gpt_neox, gptj): bit-identical except fraction values
# under fp32 (<= 2e-5: a fraction divides a probability's rounding by |p_clean - p_corrupt|, of a half's samples
# for the split halves, hence 10x the tolerance for fractions).
TOL = {"fp32": 1e-5, "bf16": 4e-3}
FRACTION = 10


def _close(a: list, b: list, tol: float, what: str) -> None:
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    assert torch.equal(ta.isnan(), tb.isnan()), what
    ok = ~ta.isnan()
    if ok.any():  # tolerances are of a probability, or of the largest value where that is larger (fractions)
        scale = max(1.0, float(ta[ok].abs().max()))
        assert float((ta[ok] - tb[ok]).abs().max()) <= tol * scale, (what, a, b)


def _compare(full, shared, tol: float, measure: str) -> None:
    assert shared.p_clean == full.p_clean and shared.subject == full.subject
    assert shared.p_corrupt == pytest.approx(full.p_corrupt, abs=tol)
    ftol = tol * (FRACTION if measure == "fraction" else 1)
    assert shared.noise_top == full.noise_top
    assert set(shared.effects) == set(full.effects) and set(shared.grid) == set(full.grid)
    for kind in full.effects:
        _close(full.effects[kind], shared.effects[kind], ftol, ("effects", kind))
        for h in range(len(full.halves.get(kind, []))):
            _close(full.halves[kind][h], shared.halves[kind][h], ftol, ("halves", kind, h))
        for l, row in enumerate(full.grid.get(kind, [])):  # grid: differences of probabilities
            _close(row, shared.grid[kind][l], tol, ("grid", kind, l))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text", "opt"])
def test_shared_equals_full(family, precision):
    lm = tiny_model(family, n_layers=4, with_bias=True)
    pr = resolve_precision(precision)
    for measure in ("diff", "fraction"):
        # window 2 (clipped at both ends), a layer subset, 3 samples (odd: halves of 1), max_rows splitting groups
        cfg = TraceConfig(n_noise=3, window=2, seed=5, max_rows=7, measure=measure, fraction_positions="all")
        kw = dict(layers=[0, 1, 3], grid=True, precision=pr)
        full = trace_fact(lm, PROMPT, SUBJECT, TARGET, cfg, method="full", **kw)
        for share in (True, False):
            shared = trace_fact(lm, PROMPT, SUBJECT, TARGET, cfg, method="shared", share_positions=share, **kw)
            _compare(full, shared, TOL[precision], measure)
    # a one-token subject at position 0 kept clean, max over the subject and the last token, Hase's settings
    cfg = TraceConfig(n_noise=4, kinds=["mlp", "hidden"], window=3, seed=1, measure="fraction", clean_pos0=True,
                      fraction_positions="subject_and_last")
    for prompt, subject in (("X is a city in", "X"), ("A " + PROMPT, SUBJECT)):
        full = trace_fact(lm, prompt, subject, TARGET, cfg, method="full", precision=pr)
        _compare(full, trace_fact(lm, prompt, subject, TARGET, cfg, precision=pr), TOL[precision], "fraction")


def _rows_through_layers(lm, fn) -> int:
    """Token-rows (batch x positions) that pass through decoder layers while fn() runs: the FLOP count's unit."""
    n = [0]

    def count(_m, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        n[0] += h.shape[0] * h.shape[1] if h.dim() == 3 else h.shape[0]
    hs = [layer.register_forward_pre_hook(count, with_kwargs=True) for layer in lm.sites.layer_list]
    try:
        fn()
    finally:
        for h in hs:
            h.remove()
    return n[0]


def test_shared_computes_less_and_uses_the_kv_cache():
    lm = tiny_model("llama", n_layers=6)
    pr = resolve_precision("fp32")
    cfg = TraceConfig(n_noise=4, kinds=["mlp"], window=3, measure="fraction", fraction_positions="subject_and_last")
    ids = torch.tensor([lm.tokenizer(PROMPT)["input_ids"]])
    corrupted = _corrupted_run(lm, ids, torch.zeros(4, 3, lm.sites.d_model), (4, 7), pr, share_positions=True)
    assert corrupted.cache is not None and len(corrupted.pre) == 6
    cost = {(m, s): _rows_through_layers(lm, lambda: trace_fact(lm, PROMPT, SUBJECT, TARGET, cfg, precision=pr,
                                                                method=m, share_positions=s))
            for m, s in (("full", True), ("shared", False), ("shared", True))}
    # clean run + every row through all 6 layers, vs from each window's first layer, vs from its position too
    assert cost[("shared", True)] < cost[("shared", False)] < 0.75 * cost[("full", True)]
    assert cost[("shared", True)] < 0.6 * cost[("full", True)]
    # the model is left as it was: every layer, no hooks
    assert len(lm.sites.layer_list) == 6
    assert all(not layer._forward_pre_hooks and not layer._forward_hooks for layer in lm.sites.layer_list)
