"""Probe examples as ITI builds them: question, answer, then another random question appended.

ITI (`tokenized_tqa_gen_end_q`) draws one random question per question and appends it after every
answer of that question; label 1 for a correct answer, 0 for an incorrect one. Here the random
question is seeded per (seed, qid), drawn from the same split (never the question itself: ITI could
draw itself), so probe inputs never mix splits.

Text (`probe_text`):
- plain: PromptFormat's "Q: {q}\\nA: {a}" then "\\nQ: {random q}" (ITI writes "Q: q A: a Q: r" on one
  line; the newline form matches the plain prompts the edits are later applied to);
- chat: the chat template with q as user turn, a as assistant turn and the random question as a new
  user turn, cut right after the random question's text, so the last token (where activations are
  read) is the random question's last token in both formats.
"""

from __future__ import annotations

import random
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence

from locaudit.data.prompts import PromptFormat
from locaudit.data.types import ProbeExample, Question
from locaudit.errors import ConfigError, DataError


def probe_examples(questions: Sequence[Question], split_of: Mapping[str, str], seed: int = 0) -> list[ProbeExample]:
    """For each question: every correct answer (label 1) then every incorrect answer (label 0).

    `split_of` maps qid -> split for at least these questions (random questions come from the same
    split among `questions`). A split with a single question has no other question to draw: its
    random question then comes from the other questions, with a warning.
    """
    by_split: dict[str, list[Question]] = defaultdict(list)
    for q in questions:
        if q.qid not in split_of:
            raise DataError(f"probe_examples: question {q.qid!r} has no split in split_of")
        by_split[split_of[q.qid]].append(q)
    for qs in by_split.values():
        qs.sort(key=lambda q: q.qid)
    everyone = sorted(questions, key=lambda q: q.qid)
    out: list[ProbeExample] = []
    for q in questions:
        split = split_of[q.qid]
        pool = [o for o in by_split[split] if o.qid != q.qid]
        if not pool:
            pool = [o for o in everyone if o.qid != q.qid]
            if not pool:
                raise DataError("probe_examples: needs at least two questions (one to append to the other)")
            warnings.warn(
                f"split {split!r} has one question; its probe examples append a random question from another split",
                stacklevel=2,
            )
        rand = random.Random(f"locaudit-probe-{seed}-{q.qid}").choice(pool).question
        for answers, label in ((q.correct, 1), (q.incorrect, 0)):
            out.extend(
                ProbeExample(qid=q.qid, question=q.question, answer=a, label=label, random_question=rand, split=split)
                for a in answers
            )
    return out


def probe_text(ex: ProbeExample, fmt: PromptFormat | str = "plain", tokenizer=None) -> str:
    """The model text of a probe example (see the module docstring for both formats)."""
    if isinstance(fmt, str):
        fmt = PromptFormat(fmt)
    if fmt.kind == "plain":
        text = fmt.full(ex.question, ex.answer)
        return f"{text}\nQ: {ex.random_question}" if ex.random_question else text
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ConfigError("prompt format 'chat' needs a tokenizer with a chat template; use --format plain")
    msgs = [{"role": "system", "content": fmt.system}] if fmt.system else []
    msgs += [{"role": "user", "content": ex.question}, {"role": "assistant", "content": ex.answer}]
    if not ex.random_question:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    msgs.append({"role": "user", "content": ex.random_question})
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    cut = text.rfind(ex.random_question)
    if cut < 0:
        raise ConfigError("the chat template does not render the user message verbatim; use --format plain")
    return text[: cut + len(ex.random_question)]
