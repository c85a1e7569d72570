"""Tracing's alternative corruptions and compared settings: symmetric token replacement equals a run on the
replaced tokens (by hand, with and without position 0 kept clean, gpt2's added position embeddings included);
replacements have the subject's length and place, never the fact's own, and a fact without one is NaN; a Hase
study's `tracing.compare` traces each setting (a noise scale equals tracing with that scale; flipping clean_pos0
re-traces only the facts whose subject starts at position 0)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from locaudit.data.facts import object_ids, subject_token_span
from locaudit.localize.tracing import TraceConfig, str_replacements, trace_fact, trace_facts
from locaudit.models.precision import resolve_precision
from locaudit.models.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
P = resolve_precision("fp32")


def F(prompt, subject, target):
    return SimpleNamespace(prompt=prompt, subject=subject, target=target)


def _p_by_hand(lm, ids, answer):
    with torch.no_grad():
        return float(lm.model(input_ids=torch.tensor([ids])).logits[0, -1].float().softmax(-1)[answer])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("clean_pos0", [False, True])
@pytest.mark.parametrize("method", ["shared", "full"])
def test_symmetric_replacement_is_the_replaced_run(family, clean_pos0, method):
    lm = tiny_model(family, n_layers=3)
    tok = lm.tokenizer
    for prompt, subject in (("Paris is a city in", "Paris is"), ("The city of Paris is in", "city of")):
        ids = list(tok(prompt)["input_ids"])
        s0, s1 = subject_token_span(tok, prompt, subject)
        g = torch.Generator().manual_seed(1)
        reps = [torch.randint(5, 200, (s1 - s0,), generator=g).tolist() for _ in range(4)]
        cfg = TraceConfig(corruption="str", n_noise=4, kinds=["mlp"], window=1, measure="diff",
                          clean_pos0=clean_pos0)
        t = trace_fact(lm, prompt, subject, "France", cfg, precision=P, replacements=reps, method=method)
        answer = object_ids(tok, "France")[0]
        hand = []
        for r in reps:
            x = list(ids)
            x[s0:s1] = r
            if clean_pos0 and s0 == 0:
                x[0] = ids[0]  # the attention sink keeps its token
            hand.append(_p_by_hand(lm, x, answer))
        assert t.p_corrupt == pytest.approx(sum(hand) / len(hand), abs=1e-5)
        assert t.pos0_noised == (s0 == 0 and not clean_pos0)


def test_replacements_same_length_and_place():
    lm = tiny_model("llama", n_layers=2)
    tok = lm.tokenizer
    facts = [F("Paris is in", "Paris", "France"), F("Oslo is in", "Oslo", "Norway"),
             F("The town of Oslo lies in", "Oslo", "Norway"), F("The town of Lima lies in", "Lima", "Peru"),
             F("Constantinople was in", "Constantinople", "Turkey")]
    reps = str_replacements(tok, facts, 6, seed=0)
    spans = [subject_token_span(tok, f.prompt, f.subject) for f in facts]
    own = [tuple(tok(f.prompt)["input_ids"][a:b]) for f, (a, b) in zip(facts, spans)]
    for i, rs in enumerate(reps):
        for r in rs:
            assert len(r) == spans[i][1] - spans[i][0] and tuple(r) != own[i]
            # the same place (at position 0 or not) as some fact whose subject it is
            assert any(own[j] == tuple(r) and (spans[j][0] == 0) == (spans[i][0] == 0) for j in range(len(facts)))
    assert reps == str_replacements(tok, facts, 6, seed=0) and all(len(r) in (0, 6) for r in reps)
    lonely = [i for i, r in enumerate(reps) if not r]
    assert lonely, "the long subject has no partner of its length"
    t = trace_facts(lm, facts, TraceConfig(corruption="str", n_noise=2, kinds=["mlp"], window=1), precision=P,
                    progress=False)
    for i in lonely:
        assert math.isnan(t[i].p_corrupt) and all(math.isnan(v) for v in t[i].effects["mlp"])


def test_compare_settings_validated():
    c = TraceConfig(compare=[{"noise_scale": 1.5}, {"corruption": "str"}], grid_facts=2)
    v = c.variant(0)
    assert v.noise_scale == 1.5 and v.compare == [] and v.grid_facts == 0 and c.variant(1).corruption == "str"
    assert "compare" not in TraceConfig().key_dump() and "corruption" not in TraceConfig().key_dump()
    for bad in ({"bogus": 1}, {"compare": []}, {}, {"noise_scale": -1.0}):
        with pytest.raises(ValueError):
            TraceConfig(compare=[bad])


def test_study_traces_compared_settings():
    from locaudit.data.facts import Fact
    from locaudit.study.hase import steps
    from locaudit.study.hase.spec import HaseSpec

    lm = tiny_model("llama", n_layers=3)
    facts = [Fact(str(i), s, p, o) for i, (s, p, o) in enumerate([
        ("Paris", "Paris is a city in", "France"), ("Oslo", "The town of Oslo lies in", "Norway"),
        ("Rome", "Rome is a city in", "Italy"), ("Lima", "The town of Lima lies in", "Peru")])]
    spec = HaseSpec.model_validate({"name": "t", "facts": {"path": "x"}, "tracing": {
        "n_noise": 2, "kinds": ["mlp"], "window": 1, "measure": "fraction", "noise_from": "subject", "clean_pos0": True,
        "compare": [{"noise_scale": 1.5}, {"clean_pos0": False}]}})
    out = steps.run_tracing(lm, spec, facts, [0, 1, 2], P, progress=False)
    assert [c["settings"] for c in out["compare"]] == [{"noise_scale": 1.5}, {"clean_pos0": False}]
    direct = trace_facts(lm, facts, spec.tracing.variant(0), [0, 1, 2], precision=P, progress=False)
    for f, t in zip(facts, direct):
        assert out["compare"][0]["facts"][f.id]["effects"]["mlp"] == pytest.approx(t.effects["mlp"], abs=0, nan_ok=True)
    flip = out["compare"][1]
    at0 = [f.id for f in facts if subject_token_span(lm.tokenizer, f.prompt, f.subject)[0] == 0]
    assert flip["n_retraced"] == len(at0) == 2 and flip["position0"]["n_noised"] == 2
    full = trace_facts(lm, facts, spec.tracing.variant(1), [0, 1, 2], precision=P, progress=False)
    for f, t in zip(facts, full):  # re-traced or reused, each equals tracing every fact with position 0 noised
        got = flip["facts"][f.id]["effects"]["mlp"]
        assert got == pytest.approx(t.effects["mlp"], abs=1e-6, nan_ok=True)
        if f.id not in at0:
            assert got == out["facts"][f.id]["effects"]["mlp"]
