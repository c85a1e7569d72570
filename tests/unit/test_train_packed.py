"""Packed pairs (chosen and rejected sharing one forward of their prompt) give the unpacked log-probs."""

from __future__ import annotations

import pytest
import torch

from locaudit.data.prompts import PromptFormat
from locaudit.data.types import PreferencePair
from locaudit.edit.encoded import encode_pairs
from locaudit.edit.logps import tiled_completion_logprobs
from locaudit.edit.lora import build_stack
from locaudit.edit.packed import check_packed, collate_packed, common_prefix, pack_pair, pack_pairs, packed_logprobs
from locaudit.heads import HeadSet
from locaudit.models.scoring import completion_logprobs
from locaudit.models.tiny import FAMILIES, tiny_model


def _pairs(n=4):
    # answers sharing their first words (the shared prefix extends into the completions) and not
    return [PreferencePair(f"q{i}", f"Which {i}?" + " more" * i, f"It is good {i}.", "It is bad" + "!" * (3 * i))
            if i % 2 else PreferencePair(f"q{i}", f"Why {i}?", f"Good {i}.", "No" + "?" * i) for i in range(n)]


def _enc(lm, n=4):
    return encode_pairs(lm.tokenizer, _pairs(n), PromptFormat("plain"), 64)


def _value_and_grad(lm, fn):
    stack = build_stack(lm.sites, [HeadSet.parse("L0H1,L2H3")], seeds=[2])
    with torch.no_grad():
        for p in stack.b_params:
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 0.3)
    with stack.attached():
        s, n = fn()
    (s * torch.linspace(1, 2, len(s))).sum().backward()
    return s.detach(), n, [p.grad.clone() for p in stack.parameters()]


def test_pack_pair_layout():
    p = pack_pair(([1, 2, 3], [4, 5]), ([1, 2, 3], [4, 6, 7]))
    assert p.ids == [1, 2, 3, 4, 5, 6, 7] and p.shared == 4 and p.split == 5
    assert p.positions == [0, 1, 2, 3, 4, 4, 5]
    assert p.chosen == ([2, 3], [4, 5])  # token 4 predicted by row 2, token 5 by row 3
    assert p.rejected == ([2, 3, 5], [4, 6, 7])  # token 6 by the shared row 3, token 7 by row 5
    b = collate_packed([p], pad=0)
    allowed = b.allowed[0]
    assert not allowed[5, 4] and allowed[5, 3] and allowed[6, 5] and allowed[4, 3]  # rejected never sees chosen
    assert common_prefix([1, 2], [1, 2]) == 2 and common_prefix([], [1]) == 0


# one family per way of reading positions and masks: rotary (llama, qwen2), rotary with local layers
# (gemma3_text), learned absolute positions (gpt2, opt), parallel residual (gpt_neox); the trainer checks
# every other model at run time (check_packed) and falls back where packing differs
PACK_FAMILIES = [f for f in ("llama", "qwen2", "gemma3_text", "gpt2", "opt", "gpt_neox") if f in FAMILIES]


@pytest.mark.parametrize("family", PACK_FAMILIES)
def test_packed_equals_unpacked_values_and_gradients(family):
    lm = tiny_model(family, with_bias=True)
    enc = _enc(lm)
    idx = list(range(len(enc)))
    s1, n1, g1 = _value_and_grad(lm, lambda: completion_logprobs(lm.model, enc.batch(idx)))
    s2, n2, g2 = _value_and_grad(lm, lambda: packed_logprobs(lm.model, pack_pairs(enc, idx)))
    assert torch.equal(n1, n2) and n1.min() > 0
    torch.testing.assert_close(s2, s1, rtol=1e-5, atol=1e-4)
    for a, b in zip(g2, g1):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert check_packed(lm.model, enc, tiled_completion_logprobs)


def test_packed_under_sdpa_and_replicated():
    lm = tiny_model("llama")
    lm.model.config._attn_implementation = "sdpa"
    enc = _enc(lm)
    idx = [2, 0, 3]
    with torch.no_grad():
        s1, n1 = completion_logprobs(lm.model, enc.batch(idx))
        s2, n2 = packed_logprobs(lm.model, pack_pairs(enc, idx).replicate(2))
    assert torch.equal(n2, n1.repeat(2))
    torch.testing.assert_close(s2, s1.repeat(2), rtol=1e-5, atol=1e-4)


def test_check_packed_refuses_what_it_cannot_pack():
    lm = tiny_model("llama")
    enc = _enc(lm)
    lm.model.config._attn_implementation = "flash_attention_2"
    assert not check_packed(lm.model, enc, completion_logprobs)
    lm.model.config._attn_implementation = "eager"
    lm.model.config.sliding_window = 4  # shorter than the pairs: a local layer would need its own mask
    assert not check_packed(lm.model, enc, completion_logprobs)
    lm.model.config.sliding_window = None
    assert check_packed(lm.model, enc, completion_logprobs)
    # a forward that ignores the custom mask (it would let rejected tokens see the chosen ones) is caught
    assert not check_packed(lm.model, enc, lambda m, b: tuple(x + 1 for x in completion_logprobs(m, b)))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_prefix_policy_at_zero_edit_equals_packed_full_forward(family, precision, tmp_path, monkeypatch):
    """At b = 0, the packed policy run from the cached packed prefix states equals the packed full forward to
    the bit, and the packed reference (other batches) to float rounding."""
    from locaudit.edit import reference as reference_mod
    from locaudit.edit.config import TrainConfig
    from locaudit.edit.prefix import collect_states
    from locaudit.edit.train import StackRunner
    from locaudit.models.precision import resolve_precision

    monkeypatch.setenv("LOCAUDIT_CACHE", str(tmp_path))
    reference_mod.clear_memory()
    lm = tiny_model(family, n_layers=4, with_bias=True)
    enc = _enc(lm, 6)
    prec = resolve_precision(precision, "cpu")
    states = collect_states(lm, enc, 2, prec, batch_size=4, packed=True)
    assert states.packed and len(states.states) == len(enc) and states.dtype == torch.float32
    stack = build_stack(lm.sites, [HeadSet.parse("L2H1,L3H0")], seeds=[1])
    runners = [StackRunner(lm, stack, TrainConfig(precision=precision, frozen_prefix=p, progress=False,
                                                  gradient_checkpointing=False), prec) for p in (True, False)]
    for r in runners:
        r.choose_logp_fn(enc)
        assert r.packed and r.tiled
    idx = list(range(len(enc)))
    with torch.no_grad():
        with runners[0].session():
            pol = runners[0].logps(enc, idx, states)
        with runners[1].session():
            full = runners[1].logps(enc, idx, None)
    assert torch.equal(pol.chosen, full.chosen) and torch.equal(pol.rejected, full.rejected)
    ref = reference_mod.reference_logps(lm, enc, prec, batch_size=4, disk=False, tiled=True, packed=True)
    tol = dict(rtol=1e-5, atol=1e-4) if precision == "fp32" else dict(rtol=2e-2, atol=0.1)
    torch.testing.assert_close(pol.chosen[0], ref.chosen, **tol)
    torch.testing.assert_close(pol.rejected[0], ref.rejected, **tol)
    unpacked = reference_mod.reference_logps(lm, enc, prec, batch_size=4, disk=False, tiled=True)
    torch.testing.assert_close(unpacked.chosen, ref.chosen, **tol)


def test_training_packed_equals_unpacked(tmp_path, monkeypatch):
    from locaudit.edit.train import train_edit

    monkeypatch.setenv("LOCAUDIT_CACHE", str(tmp_path))
    lm = tiny_model("llama", n_layers=4)
    pairs = _pairs(8)
    cfg = dict(progress=False, reference_disk_cache=False, precision="fp32", epochs=2, lr=1e-2)
    e1, l1 = train_edit(lm, HeadSet.parse("L1H1,L3H2"), pairs, pairs, config=dict(cfg, packed_pairs=True))
    e0, l0 = train_edit(lm, HeadSet.parse("L1H1,L3H2"), pairs, pairs, config=dict(cfg, packed_pairs=False))
    assert l1.packed_pairs and not l0.packed_pairs and l1.frozen_prefix
    assert float(e0.b.abs().sum()) > 0
    torch.testing.assert_close(e1.b, e0.b, rtol=1e-3, atol=1e-6)
    assert l1.after["val_loss"] == pytest.approx(l0.after["val_loss"], rel=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt_neox"])
def test_one_row_equals_row_per_pair(family):
    if family not in FAMILIES:
        pytest.skip(f"{family} has no tiny configuration here")
    lm = tiny_model(family, with_bias=True)
    enc = _enc(lm)
    idx = [3, 1, 0, 2]
    s1, n1, g1 = _value_and_grad(lm, lambda: packed_logprobs(lm.model, pack_pairs(enc, idx)))
    s2, n2, g2 = _value_and_grad(lm, lambda: packed_logprobs(lm.model, pack_pairs(enc, idx, one_row=True)))
    b = pack_pairs(enc, idx, one_row=True)
    assert b.input_ids.shape[0] == 1 and b.lengths == [sum(pack_pairs(enc, idx).lengths)] and b.n_pairs == 4
    assert torch.equal(n2, n1)
    torch.testing.assert_close(s2, s1, rtol=1e-5, atol=1e-4)
    for a, c in zip(g2, g1):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # the unedited model: copies of one row give the row's values
        s0, _ = packed_logprobs(lm.model, b)
        s3, n3 = packed_logprobs(lm.model, b.replicate(3))
    assert torch.equal(n3, n1.repeat(3))
    torch.testing.assert_close(s3, s0.repeat(3), rtol=1e-5, atol=1e-4)


def test_checkpointing_auto_only_where_activations_exceed_the_budget(tmp_path, monkeypatch):
    from locaudit.edit import train as train_mod
    from locaudit.edit.train import activation_bytes, train_edit

    monkeypatch.setenv("LOCAUDIT_CACHE", str(tmp_path))
    lm = tiny_model("llama", n_layers=4)
    pairs = _pairs(6)
    cfg = dict(progress=False, reference_disk_cache=False, precision="fp32", epochs=1, lr=1e-2)
    _, log = train_edit(lm, HeadSet.parse("L0H1"), pairs, config=cfg)
    assert log.gradient_checkpointing is False  # a few KB of activations
    _, log = train_edit(lm, HeadSet.parse("L0H1"), pairs, config=dict(cfg, gradient_checkpointing=True))
    assert log.gradient_checkpointing is True
    monkeypatch.setattr(train_mod, "memory_budget", lambda: 1000)
    e1, log = train_edit(lm, HeadSet.parse("L0H1"), pairs, config=cfg)
    assert log.gradient_checkpointing is True
    e0, log = train_edit(lm, HeadSet.parse("L0H1"), pairs, config=dict(cfg, gradient_checkpointing=False))
    assert log.gradient_checkpointing is False
    torch.testing.assert_close(e1.b, e0.b, rtol=1e-4, atol=1e-6)  # checkpointing changes memory, not results
    assert activation_bytes(lm, 100, 4) == 100 * 4 * (16 * 32 + 4 * lm.model.config.intermediate_size) * 4
