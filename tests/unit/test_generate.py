"""Generation: batched greedy equals one-at-a-time and a cache-free loop; the edit acts; stops; files."""

from __future__ import annotations

import pytest
import torch

from locaudit.data.prompts import PromptFormat
from locaudit.data.types import Question
from locaudit.edit.iti import ITIEdit
from locaudit.errors import DataError
from locaudit.evaluate.generate import (
    generate_answers, greedy_generate, load_generations, strip_stop,
)
from locaudit.heads import HeadSet
from locaudit.models.tiny import tiny_model
from locaudit.models.precision import resolve_precision as _P  # resolved once, as entry points do

PROMPTS = ["Q: Hi?\nA:", "Q: What is the tallest mountain on Earth?\nA:", "Q: Why?\nA:",
           "Q: Who wrote Hamlet, the play?\nA:"]


def questions():
    return [Question(f"q{i}", p[3:-3], "b", ("b",), ("c",)) for i, p in enumerate(PROMPTS)]


def edit_for(lm, alpha=8.0):
    L, H, D = lm.sites.shape
    heads = HeadSet.from_heads([(0, 0), (1, 2)])
    theta = torch.randn(L, H * D, generator=torch.Generator().manual_seed(1)) * heads.dim_mask(L, H, D)
    return ITIEdit(theta, alpha=alpha, heads=heads, n_heads=H)


def manual_greedy(lm, prompt, n):
    """Reference: recompute the full sequence each step, no cache, no padding."""
    ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for _ in range(n):
            nxt = lm.model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], 1)
            if nxt.item() == lm.tokenizer.eos_token_id:
                break
    return lm.tokenizer.decode(ids[0, len(lm.tokenizer(prompt)["input_ids"]):], skip_special_tokens=True)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "opt"])
def test_batched_equals_one_at_a_time(family):
    lm = tiny_model(family)
    batched = greedy_generate(lm, PROMPTS, max_new_tokens=12, batch_size=4, progress=False)
    single = [greedy_generate(lm, [p], max_new_tokens=12, batch_size=1, progress=False)[0] for p in PROMPTS]
    assert batched == single
    assert any(batched)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_edited_generation_matches_cache_free_loop(family):
    lm = tiny_model(family)
    edit = edit_for(lm)
    with edit.applied(lm):
        got = greedy_generate(lm, PROMPTS[:2], max_new_tokens=10, batch_size=2, progress=False)
        ref = [manual_greedy(lm, p, 10).strip() for p in PROMPTS[:2]]
    assert got == ref


def test_edit_changes_generations_and_model_is_restored():
    lm = tiny_model("llama")
    base = generate_answers(lm, None, questions(), max_new_tokens=12, progress=False, precision=_P('fp32'))
    edited = generate_answers(lm, edit_for(lm), questions(), max_new_tokens=12, progress=False, precision=_P('fp32'))
    assert [r.answer for r in base] != [r.answer for r in edited]
    assert sum(len(m._forward_pre_hooks) for m in lm.model.modules()) == 0
    again = generate_answers(lm, None, questions(), max_new_tokens=12, progress=False, precision=_P('fp32'))
    assert again == base
    assert [r.qid for r in base] == [q.qid for q in questions()]


def test_stop_strings_cut_and_stop_early():
    lm = tiny_model("llama")
    full = greedy_generate(lm, PROMPTS[:1], max_new_tokens=16, progress=False)[0]
    stop = full[4:6]
    cut = greedy_generate(lm, PROMPTS[:1], max_new_tokens=16, stops=[stop], progress=False)[0]
    assert cut == full[: full.find(stop)].strip()


def test_strip_stop():
    assert strip_stop(" Paris.\nQ: next", ["\nQ:", "\n\n"]) == "Paris."
    assert strip_stop(" a\n\nb\nQ:", ["\nQ:", "\n\n"]) == "a"
    assert strip_stop(" plain ", []) == "plain"
    assert strip_stop("\n Paris.\nB: Rome.", ["\n"]) == "Paris."  # a leading newline is not the answer's end
    assert strip_stop(" Paris.\nB: Rome.", PromptFormat("plain").stop_strings()) == "Paris."


def test_chat_format_generates():
    lm = tiny_model("qwen2")
    recs = generate_answers(lm, None, questions()[:2], fmt=PromptFormat("chat"), max_new_tokens=8, progress=False, precision=_P('fp32'))
    assert len(recs) == 2 and all("<|end|>" not in r.answer for r in recs)


def test_jsonl_roundtrip_and_errors(tmp_path):
    recs = generate_answers(tiny_model("llama"), None, questions(), max_new_tokens=4, progress=False,
                            out_path=tmp_path / "gen.jsonl", precision=_P('fp32'))
    assert load_generations(tmp_path / "gen.jsonl") == recs
    (tmp_path / "bad.jsonl").write_text('{"qid": "1", "question": "x"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1.*answer"):
        load_generations(tmp_path / "bad.jsonl")
    (tmp_path / "bad2.jsonl").write_text('{"qid": "1"\n')
    with pytest.raises(DataError, match="bad2.jsonl:1"):
        load_generations(tmp_path / "bad2.jsonl")
