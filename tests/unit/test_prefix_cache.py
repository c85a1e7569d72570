"""A shared prompt prefix run once (models/prefix_cache.py) gives the numbers of running every full prompt."""

from __future__ import annotations

import pytest
import torch

from locaudit.models.prefix_cache import cache_kwarg, common_prefix_len, shared_prefix
from locaudit.models.tiny import tiny_model

PREFIX = "Interpret each question literally, and as a question about the real world.\n\n" * 2


def test_common_prefix_len() -> None:
    assert common_prefix_len([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix_len([[1, 2, 3]]) == 0 and common_prefix_len([[5], [6]]) == 0


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_continuations_match_full_prompts(family: str) -> None:
    lm = tiny_model(family)
    tok, model = lm.tokenizer, lm.model
    qs = ["Q: Is the sky blue?\nA:", "Q: Why?\nA:", "Q: What is the capital of France, and why?\nA:"]
    ids = [tok(PREFIX + q)["input_ids"] for q in qs]
    state = shared_prefix(model, ids)
    assert state is not None and len(state) >= len(tok(PREFIX)["input_ids"]) - 1
    P = len(state)
    rest = [x[P:] for x in ids]
    T, B, pad = max(map(len, rest)), len(rest), 0
    inp = torch.full((B, T), pad)
    att = torch.zeros((B, P + T), dtype=torch.long)
    att[:, :P] = 1
    for r, x in enumerate(rest):  # padding between prefix and question (left of the question)
        inp[r, T - len(x):] = torch.tensor(x)
        att[r, P + T - len(x):] = 1
    with torch.no_grad():
        pos = (att.cumsum(-1) - 1).clamp(min=0)[:, P:]
        out = model(input_ids=inp, attention_mask=att, position_ids=pos, use_cache=True,
                    **{cache_kwarg(model): state.cache_for(B)})
        for r, x in enumerate(ids):
            full = model(input_ids=torch.tensor([x])).logits[0, -1]
            assert torch.allclose(out.logits[r, -1], full, atol=1e-5), (family, r)
    # generation from the cache equals generation from the full, left-padded prompts
    g = dict(max_new_tokens=6, do_sample=False, pad_token_id=pad)
    tok.padding_side = "left"
    enc = tok([PREFIX + q for q in qs], return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = model.generate(**enc, **g)[:, enc.input_ids.shape[1]:]
        full_in = torch.cat([torch.tensor([state.ids] * B), inp], dim=1)
        got = model.generate(input_ids=full_in, attention_mask=att, **g,
                             **{cache_kwarg(model): state.cache_for(B)})[:, P + T:]
    assert torch.equal(ref, got)
    # the state itself is untouched by its copies
    assert state.cache_for(1) is not state.cache


def test_short_prefix_is_not_shared() -> None:
    lm = tiny_model("llama")
    ids = [lm.tokenizer("ab" + q)["input_ids"] for q in ("x", "y")]
    assert shared_prefix(lm.model, ids) is None
