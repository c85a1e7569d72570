"""evaluate_edit and held-out preferences on a tiny model with a small TruthfulQA-format dataset."""

from __future__ import annotations

import json

import pytest
import torch

from eval_fixtures import write_truthfulqa
from locaudit.data.behaviour import load_behaviour
from locaudit.data.types import PreferencePair
from locaudit.edit.iti import ITIEdit
from locaudit.errors import ConfigError, DataError
from locaudit.evaluate.klce import clear_memory_cache
from locaudit.evaluate.preferences import score_preferences
from locaudit.evaluate.runner import EvalConfig, evaluate_edit, parse_metrics
from locaudit.heads import HeadSet
from locaudit.models.tiny import tiny_model
from locaudit.models.precision import resolve_precision as _P  # resolved once, as entry points do


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAUDIT_CACHE", str(tmp_path / "cache"))
    clear_memory_cache()


@pytest.fixture
def data(tmp_path):
    return load_behaviour(f"truthfulqa:{write_truthfulqa(tmp_path / 'tqa')}", fractions=(0.4, 0.2, 0.4))


@pytest.fixture
def lm():
    return tiny_model("llama")


def iti(lm, alpha=4.0):
    L, H, D = lm.sites.shape
    heads = HeadSet.from_heads([(0, 1), (2, 2)])
    theta = torch.randn(L, H * D, generator=torch.Generator().manual_seed(0)) * heads.dim_mask(L, H, D)
    return ITIEdit(theta, alpha=alpha, heads=heads)


class FakeJudge:
    """Truthful iff the answer is non-empty; informative with probability 0.5: enough to test plumbing."""

    name = "fake-judge"

    def __init__(self):
        self.calls = 0

    def score(self, questions, answers):
        self.calls += 1
        return [{"truth": float(bool(a.strip())), "info": 0.5} for a in answers]


CFG = EvalConfig(max_new_tokens=6, progress=False, protocol="bare", kl_max_tokens=1024)


def test_full_evaluation_writes_everything(lm, data, tmp_path):
    """The default protocol (ITI's prompts, generic-text KL, thresholded True/Info), on a tiny model whose
    256-position context cuts the ITI preamble from the left (warned), so it runs everywhere."""
    judge = FakeJudge()
    cfg = EvalConfig(max_new_tokens=6, progress=False, kl_max_tokens=1024)
    assert cfg.protocol == "iti" and cfg.kl_text == "austen" and cfg.kl_answers
    res = evaluate_edit(lm, iti(lm), data, "test", "all", judge, tmp_path / "out", cfg)
    n = len(data.questions("test"))
    assert res.n_questions == n == res.n_mc == res.n_generated and res.n_pairs == len(data.pairs("test"))
    for k in ("mc1", "mc2", "kl", "ce", "pref_acc", "pref_margin", "true", "info", "true_info", "kl_answers",
              "ce_answers", "true_prob", "info_prob", "true_info_prob"):
        assert getattr(res, k) is not None, k
    assert res.protocol == "iti" and res.mc_prefix == "iti" and res.kl_text == "austen" and res.kl_text_fingerprint
    assert res.n_kl_tokens <= 1024 and res.kl != res.kl_answers and res.kl_answers > 0
    # info = 0.5 for every answer: thresholded (>= 0.5) it is 1.0, as a mean probability 0.5
    assert res.info == 1.0 and res.info_prob == 0.5 and res.judge_threshold == 0.5
    assert res.true_info == pytest.approx(res.true * res.info)
    assert res.kl > 0 and res.judge == "fake-judge" and judge.calls == 1
    assert res.edit["kind"] == "iti" and res.edit["alpha"] == 4.0
    out = tmp_path / "out"
    for f in ("result.json", "results.csv", "generations.jsonl", "mc_items.jsonl", "judgements.jsonl"):
        assert (out / f).exists(), f
    gens = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    assert [g["qid"] for g in gens] == [q.qid for q in data.questions("test")]
    evaluate_edit(lm, None, data, "test", "mc", None, out, CFG)
    assert len((out / "results.csv").read_text().splitlines()) == 3


def test_unedited_baseline_and_restoration(lm, data):
    base = evaluate_edit(lm, None, data, "val", ("mc", "kl", "pref"), config=CFG)
    assert base.kl == 0.0 and base.ce > 0 and base.edit == {"kind": "none"}
    evaluate_edit(lm, iti(lm, 8.0), data, "val", ("mc", "kl", "pref"), config=CFG)
    again = evaluate_edit(lm, None, data, "val", ("mc", "kl", "pref"), config=CFG)
    assert (again.mc1, again.mc2, again.kl, again.pref_margin) == (base.mc1, base.mc2, base.kl, base.pref_margin)
    assert sum(len(m._forward_pre_hooks) for m in lm.model.modules()) == 0


def test_preferences_against_direct_scoring(lm):
    pairs = [PreferencePair("a", "Where is Paris?", "In France", "In Spain"),
             PreferencePair("a", "Where is Paris?", "In Europe", "In Spain"),
             PreferencePair("b", "Can pigs fly?", "No", "Yes, they can")]
    res = score_preferences(lm, None, pairs, precision=_P('fp32'))

    def avg(q, a):
        p = lm.tokenizer(f"Q: {q}\nA:")["input_ids"]
        c = lm.tokenizer(" " + a, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(lm.model(input_ids=torch.tensor([p + c])).logits[0].double(), -1)
        return sum(float(lp[len(p) + i - 1, t]) for i, t in enumerate(c)) / len(c)

    ref = [avg(p.question, p.chosen) - avg(p.question, p.rejected) for p in pairs]
    assert res.margin == pytest.approx(sum(ref) / 3, abs=1e-4)
    assert res.accuracy == pytest.approx(sum(r > 0 for r in ref) / 3)
    assert res.n_pairs == 3 and res.accuracy_se is not None
    edited = score_preferences(lm, iti(lm, 8.0), pairs, precision=_P('fp32'))
    assert edited.margin != res.margin


def test_chat_format_runs(data):
    lm = tiny_model("qwen2")
    res = evaluate_edit(lm, None, data, "test", ("mc", "kl", "gen"),
                        config=EvalConfig(format="chat", max_new_tokens=4, progress=False, kl_max_tokens=512))
    assert res.format == "chat" and res.kl == 0.0 and res.kl_answers == 0.0 and res.mc2 is not None


def test_kl_text_file_and_bf16(lm, data, tmp_path):
    f = tmp_path / "text.txt"
    f.write_text("The quick brown fox jumps over the lazy dog. " * 10)
    cfg = EvalConfig(kl_text=str(f), max_length=64, progress=False, precision="bf16", kl_answers=False)
    res = evaluate_edit(lm, iti(lm), data, "test", ("kl", "ce"), config=cfg)
    assert res.n_kl_texts == 8 and res.kl > 0 and res.kl_text == "text.txt" and res.kl_answers is None


def test_old_protocol_reproduces_answer_text_kl(lm, data):
    """kl_text=None, protocol bare: KL/CE on the split's questions + best answers, as before issue 11; the
    answer-text metric of the new default is the same number."""
    old = evaluate_edit(lm, iti(lm), data, "test", ("kl", "ce"), config=EvalConfig(
        protocol="bare", kl_text=None, progress=False))
    new = evaluate_edit(lm, iti(lm), data, "test", ("kl", "ce"), config=EvalConfig(kl_max_tokens=512, progress=False))
    assert old.kl_text == "answers" and old.kl == old.kl_answers
    assert new.kl_answers == pytest.approx(old.kl) and new.ce_answers == pytest.approx(old.ce)
    with pytest.raises(DataError, match="neither a corpus name"):
        evaluate_edit(lm, None, data, "test", ("kl",), config=EvalConfig(kl_text="no-such-corpus", progress=False))


def test_errors(lm, data):
    with pytest.raises(ConfigError, match="metrics"):
        parse_metrics("mc,bleu")
    assert parse_metrics("all") == ("mc", "kl", "ce", "pref", "gen", "ab")
    with pytest.raises(ValueError, match="batch_size"):
        EvalConfig(batch_size=0)
    with pytest.raises(ConfigError, match="not an edit"):
        evaluate_edit(lm, object(), data, "test", "mc", config=CFG)

    class Short(FakeJudge):
        def score(self, questions, answers):
            return super().score(questions, answers)[:-1]

    with pytest.raises(DataError, match="returned"):
        evaluate_edit(lm, None, data, "test", "gen", Short(), config=CFG)

    class Bad(FakeJudge):
        def score(self, questions, answers):
            return [{"truth": 2.0, "info": 0.5} for _ in answers]

    with pytest.raises(DataError, match="truth"):
        evaluate_edit(lm, None, data, "test", "gen", Bad(), config=CFG)


def test_optimal_lora_edit_is_scored_the_same_way(lm, data):
    from locaudit.edit.lora import LoRAEdit, edit_masks

    heads = HeadSet.from_heads([(1, 0), (2, 3)])
    a_mask, b_mask = edit_masks(lm.sites, heads, reparam=True)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(*a_mask.shape[:1], 1, a_mask.shape[-1], generator=g) * a_mask
    b = torch.randn(*b_mask.shape[:1], 1, b_mask.shape[-1], generator=g) * b_mask
    edit = LoRAEdit(a, b, heads)
    res = evaluate_edit(lm, edit, data, "test", ("mc", "kl", "pref", "gen"), config=CFG)
    assert res.edit["kind"] == "lora" and res.kl > 0 and res.n_generated == len(data.questions("test"))
    assert evaluate_edit(lm, None, data, "test", ("kl",), config=CFG).kl == 0.0
