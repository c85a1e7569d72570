"""`gen_max_questions`: generation and its judge on a fixed subset of the split's questions (True*Info as a
cheaper secondary metric), MC and KL/CE on every question; the subset is fixed by question ids alone."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import pytest

from eval_fixtures import write_truthfulqa
from locaudit.data.behaviour import load_behaviour
from locaudit.evaluate.klce import clear_memory_cache
from locaudit.evaluate.runner import EvalConfig, evaluate_edit, gen_subset
from locaudit.models.tiny import tiny_model


@dataclass
class Q:
    qid: str


def test_the_subset_is_the_lowest_hashes_in_the_splits_order() -> None:
    qs = [Q(f"q{i}") for i in range(20)]
    got = gen_subset(qs, 5)
    want = sorted(qs, key=lambda q: hashlib.sha256(q.qid.encode()).hexdigest())[:5]
    assert {q.qid for q in got} == {q.qid for q in want}
    assert [q.qid for q in got] == [q.qid for q in qs if q in want]  # the split's order kept
    assert {q.qid for q in gen_subset(qs[::-1], 5)} == {q.qid for q in got}  # whatever the order
    assert gen_subset(qs, None) == qs and gen_subset(qs, 20) == qs and gen_subset(qs, 99) == qs
    assert {q.qid for q in gen_subset(qs, 5)} != {q.qid for q in qs[:5]}  # not the first five of a sorted file


class Judge:
    name = "count-judge"

    def __init__(self):
        self.seen: list[str] = []

    def score(self, questions, answers):
        self.seen += list(questions)
        return [{"truth": 1.0, "info": 1.0} for _ in answers]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_generation_runs_on_the_subset_and_mc_on_every_question(tmp_path, monkeypatch, precision) -> None:
    monkeypatch.setenv("LOCAUDIT_CACHE", str(tmp_path / "cache"))
    clear_memory_cache()
    data = load_behaviour(f"truthfulqa:{write_truthfulqa(tmp_path / 'tqa')}", fractions=(0.4, 0.2, 0.4))
    lm = tiny_model("llama")
    test_q = data.questions("test")
    assert len(test_q) > 3
    judge = Judge()
    cfg = EvalConfig(max_new_tokens=4, progress=False, protocol="bare", kl_max_tokens=256, gen_max_questions=3,
                     precision=precision)
    res = evaluate_edit(lm, None, data, "test", ["mc", "kl", "gen"], judge, tmp_path / "out", cfg)
    assert res.n_generated == 3 and len(judge.seen) == 3
    assert res.n_mc == len(test_q) == res.n_questions
    judged = [json.loads(line)["qid"] for line in (tmp_path / "out" / "judgements.jsonl").read_text().splitlines()]
    assert judged == [q.qid for q in gen_subset(test_q, 3)]
    assert res.true_info == pytest.approx(1.0)


def test_a_study_passes_the_field_to_its_evaluations(tmp_path) -> None:
    from locaudit.study.spec import parse_study
    from locaudit.study.trials import expand

    (tmp_path / "pairs.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    base = {"name": "g", "model": {"name": "tiny:llama"}, "data": {"spec": "pairs:pairs.jsonl"},
            "localizers": {"probe": {"top_k": 2}, "random": {"n": 1}}, "iti": {"enabled": False},
            "optimal": {"taus": [0.1], "localizers": ["top"]}, "evaluation": {"metrics": ["mc", "gen"]}}
    plain = {t.key: t for t in expand(parse_study(base, tmp_path, "g.yaml"))}
    sub = expand(parse_study({**base, "evaluation": {"metrics": ["mc", "gen"], "gen_max_questions": 40}}, tmp_path,
                             "g.yaml"))
    opt = next(t for t in sub if t.kind == "optimal")
    assert opt.content["evaluation"]["gen_max_questions"] == 40
    assert opt.key not in plain  # a different evaluation is a different trial
    with pytest.raises(Exception, match="gen_max_questions"):
        parse_study({**base, "evaluation": {"gen_max_questions": 0}}, tmp_path, "g.yaml")
