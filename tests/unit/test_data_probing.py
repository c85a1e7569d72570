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


# ------------------------------------------------------------------------------------ long texts keep the answer
from locaudit.data.probing import fit_probe_text, probe_texts, render_probe_text  # noqa: E402
from locaudit.models.tiny import tiny_tokenizer  # noqa: E402
from locaudit.models.precision import resolve_precision as _P  # resolved once, as entry points do


def _long_example(q_chars=1500, r_chars=2200, answer=" (A)"):
    q = "Hello, my name is Sarah. " * (q_chars // 25) + "Which do you pick?\n (A) yes\n (B) no"
    r = "I am a professor of linguistics. " * (r_chars // 33) + "Do you agree?\n (A) Agree\n (B) Disagree"
    return ProbeExample(qid="caa-1", question=q, answer=answer.strip(), label=1, random_question=r, split="train")


@pytest.mark.parametrize("fmt", ["plain", "chat"])
def test_long_probe_text_keeps_the_answer_whole(fmt):
    tok = tiny_tokenizer()  # byte-level: one token per byte, the worst case for a 2.2k-character CAA prompt
    ex = _long_example()
    full = render_probe_text(ex, fmt, tok)
    assert len(tok(full)["input_ids"]) > 512
    text, cut = fit_probe_text(ex, fmt, tok, 512)
    n = len(tok(text, add_special_tokens=fmt == "plain")["input_ids"])
    assert n <= 512 and n >= 500  # fits, and does not cut much more than needed
    assert cut.appended > 0
    # the answer is whole, right before the (cut) appended question, whose end is kept
    assert ex.answer in text and text.endswith("\n (B) Disagree")
    a_at = text.index(ex.answer)
    assert "Which do you pick?" in text[:a_at]


def test_prompt_is_cut_from_its_start_after_the_appended_question():
    tok = tiny_tokenizer()
    ex = _long_example(q_chars=3000, r_chars=400)
    text, cut = fit_probe_text(ex, "plain", tok, 256)
    assert cut.prompt > 0 and cut.appended == len(tok(ex.random_question, add_special_tokens=False)["input_ids"]) - 16
    assert len(tok(text)["input_ids"]) <= 256
    assert "Which do you pick?\n (A) yes\n (B) no\nA: (A)\nQ: " in text  # prompt's end, answer, appended's end
    assert not text.startswith("Q: Hello")  # the prompt's start is gone


def test_short_texts_are_unchanged_and_counts_are_reported():
    tok = tiny_tokenizer()
    short = ProbeExample(qid="q", question="Why?", answer="Because.", label=1, random_question="How?", split="train")
    assert probe_text(short, "plain", tok) == render_probe_text(short, "plain", tok) == "Q: Why?\nA: Because.\nQ: How?"
    with pytest.warns(UserWarning, match=r"2 of 3 probe texts .* 2 appended question\(s\) cut"):
        texts = probe_texts([short, _long_example(), _long_example(answer="(B)")], "plain", tok, 512)
    assert texts[0] == render_probe_text(short, "plain", tok)
    assert texts[1].count("(A)") >= 1 and "\nA: (B)\nQ: " in texts[2]


def test_answer_that_cannot_fit_is_refused():
    tok = tiny_tokenizer()
    ex = ProbeExample(qid="long-answer", question="Why?", answer="x" * 600, label=1, random_question="How?")
    with pytest.raises(DataError, match="long-answer.*answer"):
        fit_probe_text(ex, "plain", tok, 512)


def test_probe_signal_survives_collection_of_long_caa_like_texts():
    """The issue's failure: texts cut from the left lost the answer, so both labels read the same activations."""
    from locaudit.localize.activations import collect_activations
    from locaudit.models.tiny import tiny_model

    lm = tiny_model("llama")
    pos, neg = _long_example(answer="(A)"), _long_example(answer="(B)")
    with pytest.warns(UserWarning, match="cut"):
        texts = probe_texts([pos, neg], "plain", lm.tokenizer, 512)
    X = collect_activations(lm, texts, batch_size=2, max_length=512, progress=False, precision=_P('fp32'))
    assert (X[0] - X[1]).abs().max() > 1e-4  # the answers differ, so do the activations
