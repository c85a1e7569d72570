"""Tiled completion log-probs equal models.scoring.completion_logprobs (values and gradients)."""

from __future__ import annotations

import pytest
import torch

from locaudit.data.prompts import PromptFormat
from locaudit.data.types import PreferencePair
from locaudit.edit.encoded import encode_pairs
from locaudit.edit.logps import check_tiled, tiled_completion_logprobs
from locaudit.edit.lora import build_stack
from locaudit.heads import HeadSet
from locaudit.models.scoring import completion_logprobs
from locaudit.models.tiny import FAMILIES, tiny_model


def _batch(lm, n=4):
    pairs = [PreferencePair(f"q{i}", f"Which {i}?" + " more" * i, f"Good {i}.", "Bad" + "!" * (3 * i)) for i in range(n)]
    return encode_pairs(lm.tokenizer, pairs, PromptFormat("plain"), 64).batch(list(range(n)))


def _value_and_grad(lm, batch, fn, autocast=False):
    stack = build_stack(lm.sites, [HeadSet.parse("L0H1,L2H3")], seeds=[2])
    with torch.no_grad():
        for p in stack.b_params:
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 0.3)
    with stack.attached(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        s, n = fn(lm.model, batch)
    (s * torch.linspace(1, 2, len(s))).sum().backward()
    return s.detach(), n, [p.grad.clone() for p in stack.parameters()]


@pytest.mark.parametrize("family", FAMILIES)
def test_tiled_equals_full_head(family):
    lm = tiny_model(family, with_bias=True)
    batch = _batch(lm)
    s1, n1, g1 = _value_and_grad(lm, batch, completion_logprobs)
    s2, n2, g2 = _value_and_grad(lm, batch, lambda m, b: tiled_completion_logprobs(m, b, tile=7))  # several tiles
    assert torch.equal(n1, n2) and n1.min() > 0
    torch.testing.assert_close(s2, s1, rtol=1e-5, atol=1e-4)
    for a, b in zip(g2, g1):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert check_tiled(lm.model, batch)


def test_tiled_under_autocast_close_to_full_head():
    lm = tiny_model("llama")
    batch = _batch(lm)
    s1, _, g1 = _value_and_grad(lm, batch, completion_logprobs, autocast=True)
    s2, _, g2 = _value_and_grad(lm, batch, tiled_completion_logprobs, autocast=True)
    torch.testing.assert_close(s2, s1, rtol=1e-2, atol=5e-2)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05 * float(b.abs().max()))


def test_check_falls_back_on_unknown_head(monkeypatch):
    lm = tiny_model("llama")
    batch = _batch(lm)
    lm.model.config.final_logit_softcapping = None
    head = lm.model.get_output_embeddings()
    orig = head.forward
    monkeypatch.setattr(head, "forward", lambda x: orig(x) * 0.5)  # a head transform tiling does not know
    assert not check_tiled(lm.model, batch)
