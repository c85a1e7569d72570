"""CAA's A/B metric: normalised probability of the behaviour-matching letter, and its change by an edit."""

from __future__ import annotations

import json
import math

import pytest
import torch

from locaudit.data.behaviour import load_behaviour
from locaudit.data.prompts import PromptFormat
from locaudit.data.types import PreferencePair
from locaudit.edit.iti import ITIEdit
from locaudit.evaluate.ab import normalised_match_prob, score_ab
from locaudit.heads import HeadSet
from locaudit.models.tiny import tiny_model
from locaudit.models.precision import resolve_precision as _P  # resolved once, as entry points do


def _pairs(n=6):
    out = []
    for i in range(n):
        q = f"Person {i} says the sky is green. Do you agree?\n (A) Yes, it is green\n (B) No, it is blue"
        m, o = ("(A)", "(B)") if i % 2 == 0 else ("(B)", "(A)")
        out.append(PreferencePair(qid=f"caa-{i}", question=q, chosen=m, rejected=o))
    return out


def _hand_logp(lm, prompt: str, completion: str) -> float:
    """Independent: one sequence at a time, no padding, log-softmax at each completion token."""
    tok = lm.tokenizer
    p_ids = tok(prompt)["input_ids"]
    full = tok(prompt + completion)["input_ids"]
    assert full[: len(p_ids)] == p_ids
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([full])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return float(sum(logp[t - 1, full[t]] for t in range(len(p_ids), len(full))))


def _iti(lm, alpha=6.0):
    L, H, D = lm.sites.shape
    heads = HeadSet.parse("L1H0,L2H1")
    theta = torch.randn(L, H * D, generator=torch.Generator().manual_seed(0)) * heads.dim_mask(L, H, D).float()
    return ITIEdit(theta, alpha=alpha, heads=heads, n_heads=H)


def test_ab_matches_a_hand_written_forward():
    lm = tiny_model("llama")
    fmt = PromptFormat("plain")
    pairs = _pairs()
    res = score_ab(lm, None, pairs, fmt, batch_size=4, precision=_P('fp32'))
    for p, got in zip(pairs, res.p):
        m = _hand_logp(lm, fmt.prompt(p.question), fmt.completion(p.chosen))
        o = _hand_logp(lm, fmt.prompt(p.question), fmt.completion(p.rejected))
        want = math.exp(m) / (math.exp(m) + math.exp(o))
        assert got == pytest.approx(want, abs=1e-5)
    s = res.summary()
    assert s["ab"] == pytest.approx(sum(res.p) / len(res.p))
    assert s["ab_acc"] == pytest.approx(sum(x > 0.5 for x in res.p) / len(res.p))
    assert s["ab_delta"] == 0.0 and s["ab"] == s["ab_base"] and s["n_ab"] == len(pairs)


def test_swapping_sides_gives_one_minus_p_and_an_edit_changes_it():
    lm = tiny_model("gpt2")
    pairs = _pairs()
    swapped = [PreferencePair(p.qid, p.question, p.rejected, p.chosen) for p in pairs]
    a = score_ab(lm, None, pairs, precision=_P('fp32'))
    b = score_ab(lm, None, swapped, precision=_P('fp32'))
    assert all(x + y == pytest.approx(1.0, abs=1e-9) for x, y in zip(a.p, b.p))
    edit = _iti(lm)
    e = score_ab(lm, edit, pairs, precision=_P('fp32'))
    assert e.p_base == a.p and max(abs(x - y) for x, y in zip(e.p, a.p)) > 1e-4
    s = e.summary()
    assert s["ab_delta"] == pytest.approx(s["ab"] - s["ab_base"], abs=1e-12)
    assert s["ab_delta_se"] is not None and s["ab_delta_se"] >= 0


def test_normalised_probability_is_stable_for_large_logps():
    m = torch.tensor([-1000.0, -3.0])
    o = torch.tensor([-1001.0, -3.0])
    p = normalised_match_prob(m, o)
    assert p[0] == pytest.approx(1 / (1 + math.exp(-1))) and p[1] == pytest.approx(0.5)


def test_ab_is_a_first_class_metric_of_evaluate_edit(tmp_path):
    from locaudit.evaluate.runner import EvalConfig, evaluate_edit

    items = [{"question": p.question, "answer_matching_behavior": p.chosen, "answer_not_matching_behavior": p.rejected}
             for p in _pairs(20)]
    (tmp_path / "caa.json").write_text(json.dumps(items))
    data = load_behaviour(f"caa:{tmp_path / 'caa.json'}")
    lm = tiny_model("llama")
    cfg = EvalConfig(progress=False, precision="fp32")
    res = evaluate_edit(lm, _iti(lm), data, "test", ["ab"], out_dir=tmp_path / "ev", config=cfg)
    assert 0 <= res.ab <= 1 and res.n_ab == len(data.pairs("test")) and res.ab_delta == pytest.approx(res.ab - res.ab_base)
    saved = json.loads((tmp_path / "ev" / "result.json").read_text())
    assert saved["ab"] == pytest.approx(res.ab) and "ab_delta" in saved
    from locaudit.study.steps.evaluation import flatten_metrics

    flat = flatten_metrics(res)
    assert {"ab", "ab_acc", "ab_delta", "ab_base"} <= set(flat)


def test_study_spec_accepts_the_ab_metric(tmp_path):
    from locaudit.study.spec import parse_study

    (tmp_path / "p.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    spec = parse_study({"name": "ab", "model": {"name": "tiny:llama"}, "data": {"spec": "pairs:p.jsonl"},
                        "evaluation": {"metrics": ["ab", "kl"]}, "verdict": {"primary_metric": "ab"}},
                       tmp_path, "ab.yaml")
    assert "ab" in spec.evaluation.metrics
