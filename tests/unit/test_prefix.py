"""Frozen-prefix cache: running layers l.. on cached states equals the full forward (loss and grads)."""

from __future__ import annotations

import pytest
import torch

from locaudit.data.prompts import PromptFormat
from locaudit.data.types import PreferencePair
from locaudit.edit import reference as reference_mod
from locaudit.edit import train as train_mod
from locaudit.edit.config import TrainConfig
from locaudit.edit.encoded import encode_pairs
from locaudit.edit.lora import build_stack
from locaudit.edit.objectives import ipo_loss
from locaudit.edit.prefix import PrefixCache, collect_states, run_from_layer
from locaudit.edit.train import StackRunner, train_edit
from locaudit.heads import HeadSet
from locaudit.models.tiny import FAMILIES, tiny_model
from locaudit.models.precision import resolve_precision as _P  # resolved once, as entry points do


def toy_pairs(n: int) -> list[PreferencePair]:
    return [PreferencePair(f"q{i}", f"Which {i}?" + " pad" * (i % 3), f"Good {i % 4}.", f"Bad{'!' * (i % 5)}")
            for i in range(n)]


@pytest.fixture(autouse=True)
def _fresh_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAUDIT_CACHE", str(tmp_path / "cache"))
    reference_mod.clear_memory()
    train_mod.PREFIX_CACHE.clear()


def _loss_and_grads(lm, heads_list, enc, use_prefix: bool):
    cfg = TrainConfig(precision="fp32", frozen_prefix=use_prefix, progress=False)
    stack = build_stack(lm.sites, heads_list, seeds=[1] * len(heads_list))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # non-zero b so that gradients reach a too
        for p in stack.b_params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    runner = StackRunner(lm, stack, cfg, _P(cfg.precision))
    assert runner.use_prefix == use_prefix
    states = runner.states(enc) if use_prefix else None
    ref = reference_mod.reference_logps(lm, enc, _P('fp32'), disk=False)
    idx = [3, 0, 5]
    with runner.session():
        pol = runner.logps(enc, idx, states)
        loss = ipo_loss(pol, ref.index(idx), 0.1).mean(-1).sum()
        loss.backward()
    grads = [p.grad.clone() for p in stack.parameters()]
    return pol, loss.detach(), grads


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_equals_full_forward(family):
    lm = tiny_model(family, n_layers=4, with_bias=True)
    enc = encode_pairs(lm.tokenizer, toy_pairs(6), PromptFormat("plain"), 64)
    heads = [HeadSet.parse("L2H1,L3H0")]
    p_full, l_full, g_full = _loss_and_grads(lm, heads, enc, False)
    p_pre, l_pre, g_pre = _loss_and_grads(lm, heads, enc, True)
    torch.testing.assert_close(p_pre.chosen, p_full.chosen, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p_pre.rejected, p_full.rejected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l_pre, l_full, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_pre, g_full):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # the model is restored: full layer list, config untouched
    assert len(lm.sites.layer_list) == 4
    assert lm.sites.layer_list is lm.sites.layer_list and len(list(lm.model.modules()))


def test_gemma2_layer_types_sliced_and_restored():
    lm = tiny_model("gemma2", n_layers=4)
    lt = list(lm.model.config.layer_types)
    with run_from_layer(lm, 2) as feed:
        assert lm.model.config.layer_types == lt[2:]
        assert len(lm.model.model.layers) == 2
        assert isinstance(feed, dict)
    assert lm.model.config.layer_types == lt and len(lm.model.model.layers) == 4


def test_multi_edit_prefix_equals_full():
    lm = tiny_model("llama", n_layers=4)
    enc = encode_pairs(lm.tokenizer, toy_pairs(6), PromptFormat("plain"), 64)
    heads = [HeadSet.parse("L2H1"), HeadSet.parse("L3H0,L3H2"), HeadSet.parse("L1H3")]
    _, l_full, g_full = _loss_and_grads(lm, heads, enc, False)
    _, l_pre, g_pre = _loss_and_grads(lm, heads, enc, True)
    torch.testing.assert_close(l_pre, l_full, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_pre, g_full):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_cache_advances_from_lower_layer():
    lm = tiny_model("qwen2", n_layers=4)
    enc = encode_pairs(lm.tokenizer, toy_pairs(5), PromptFormat("plain"), 64)
    direct = collect_states(lm, enc, 3, _P('fp32'))
    cache = PrefixCache()
    low = cache.get(lm, enc, 1, _P("fp32"))
    assert low.layer == 1
    high = cache.get(lm, enc, 3, _P("fp32"))  # served from layer 1's states
    assert cache.get(lm, enc, 3, _P("fp32")) is high
    for a, b in zip(direct.states, high.states):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert len(high.states) == 10 and high.states[0].shape[-1] == lm.sites.d_model


def test_training_with_prefix_equals_without():
    lm = tiny_model("llama", n_layers=4)
    pairs = toy_pairs(8)
    cfg = dict(progress=False, reference_disk_cache=False, precision="fp32", epochs=2, lr=1e-2)
    e1, l1 = train_edit(lm, HeadSet.parse("L3H1"), pairs, pairs, config=dict(cfg, frozen_prefix=True))
    e0, l0 = train_edit(lm, HeadSet.parse("L3H1"), pairs, pairs, config=dict(cfg, frozen_prefix=False))
    assert l1.frozen_prefix and not l0.frozen_prefix and l1.lowest_layer == 3
    torch.testing.assert_close(e1.b, e0.b, rtol=1e-3, atol=1e-6)
    assert l1.after["val_loss"] == pytest.approx(l0.after["val_loss"], rel=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
@pytest.mark.parametrize("prefix", [False, True])
def test_gradient_checkpointing_same_result(family, prefix):
    lm = tiny_model(family, n_layers=4)
    pairs = toy_pairs(6)
    cfg = dict(progress=False, reference_disk_cache=False, precision="fp32", epochs=1, lr=1e-2,
               frozen_prefix=prefix)
    e1, l1 = train_edit(lm, HeadSet.parse("L2H1,L3H0"), pairs, pairs, config=dict(cfg, gradient_checkpointing=True))
    e0, l0 = train_edit(lm, HeadSet.parse("L2H1,L3H0"), pairs, pairs, config=dict(cfg, gradient_checkpointing=False))
    assert l1.frozen_prefix == prefix
    torch.testing.assert_close(e1.b, e0.b, rtol=1e-4, atol=1e-6)
    assert len(lm.sites.layer_list) == 4 and all(type(m).__name__ != "_Checkpointed" for m in lm.model.modules())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prefix_policy_at_zero_edit_equals_reference(family, precision):
    """At b = 0 the edit is the identity, so the policy's log-probs from the cached prefix states must equal
    the reference's full forward at the same precision, to the bit: the cache stores the states in the dtype
    the layers above receive (fp32 residual stream under bf16 autocast), never rounded."""
    from locaudit.edit.prefix import collect_states
    from locaudit.models.precision import resolve_precision

    lm = tiny_model(family, n_layers=4, with_bias=True)
    enc = encode_pairs(lm.tokenizer, toy_pairs(6), PromptFormat("plain"), 64)
    prec = resolve_precision(precision, "cpu")
    states = collect_states(lm, enc, 2, prec, batch_size=4)
    assert states.dtype == torch.float32  # the residual stream of an fp32 model, also under bf16 autocast
    stack = build_stack(lm.sites, [HeadSet.parse("L2H1,L3H0")], seeds=[1])
    assert all(float(p.detach().abs().sum()) == 0 for p in stack.b_params)  # b starts at zero
    runner = StackRunner(lm, stack, TrainConfig(precision=precision, frozen_prefix=True, progress=False,
                                                gradient_checkpointing=False), prec)
    assert runner.use_prefix and runner.precision.name == precision
    idx = list(range(len(enc)))
    full = StackRunner(lm, stack, TrainConfig(precision=precision, frozen_prefix=False, progress=False,
                                              gradient_checkpointing=False), prec)
    with torch.no_grad():
        with runner.session():
            pol = runner.logps(enc, idx, states)
        with full.session():
            ref = full.logps(enc, idx, None)
    assert torch.equal(pol.chosen, ref.chosen) and torch.equal(pol.rejected, ref.rejected)
