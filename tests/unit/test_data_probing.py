"""ITI probe examples: labels, the appended random question (same split, never itself, seeded), texts."""

from __future__ import annotations

import pytest

from locaudit.data import ProbeExample, PromptFormat, Question, probe_examples, probe_text
from locaudit.errors import ConfigError, DataError


def make_questions(n):
    return [Question(qid=f"q{i:02d}", question=f"Question {i}?", best_answer=f"right {i}",
                     correct=(f"right {i}", f"also right {i}"), incorrect=(f"wrong {i}",)) for i in range(n)]


def test_labels_and_random_question_rules():
    qs = make_questions(20)
    split_of = {q.qid: ("train" if i < 12 else "val" if i < 16 else "test") for i, q in enumerate(qs)}
    exs = probe_examples(qs, split_of, seed=0)
    assert len(exs) == 20 * 3
    by_text = {q.question: q for q in qs}
    for q in qs:
        mine = [e for e in exs if e.qid == q.qid]
        assert [(e.answer, e.label) for e in mine] == [(a, 1) for a in q.correct] + [(a, 0) for a in q.incorrect]
        rand = {e.random_question for e in mine}
        assert len(rand) == 1  # one random question per question, as ITI does
        (r,) = rand
        assert r != q.question
        assert split_of[by_text[r].qid] == split_of[q.qid] == mine[0].split
    assert exs == probe_examples(qs, split_of, seed=0)
    assert exs == sorted(probe_examples(list(reversed(qs)), split_of, seed=0), key=lambda e: qs.index(
        next(q for q in qs if q.qid == e.qid)))
    other = probe_examples(qs, split_of, seed=1)
    assert [e.random_question for e in exs] != [e.random_question for e in other]


def test_singleton_split_falls_back_with_warning():
    qs = make_questions(3)
    split_of = {"q00": "train", "q01": "train", "q02": "val"}
    with pytest.warns(UserWarning, match="split 'val' has one question"):
        exs = probe_examples(qs, split_of)
    assert all(e.random_question != "Question 2?" for e in exs if e.qid == "q02")
    with pytest.raises(DataError, match="at least two questions"):
        probe_examples(qs[:1], {"q00": "train"})
    with pytest.raises(DataError, match="'q02' has no split"):
        probe_examples(qs, {"q00": "train", "q01": "train"})


EX = ProbeExample(qid="q", question="Is it cold?", answer="Yes it is", label=1, random_question="Where is Paris?")


def test_plain_text_extends_the_prompt_format():
    fmt = PromptFormat("plain")
    text = probe_text(EX, fmt)
    assert text == "Q: Is it cold?\nA: Yes it is\nQ: Where is Paris?"
    assert text.startswith(fmt.full(EX.question, EX.answer))
    assert probe_text(EX, "plain") == text


def test_chat_text_ends_with_the_random_question():
    from locaudit.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    fmt = PromptFormat("chat")
    text = probe_text(EX, fmt, tok)
    assert text.endswith("Where is Paris?")
    assert text.startswith(fmt.full(EX.question, EX.answer, tok))
    assert text.count("Is it cold?") == 1 and "Yes it is" in text
    with pytest.raises(ConfigError, match="needs a tokenizer with a chat template"):
        probe_text(EX, fmt, None)
