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

Length (`max_tokens`, default 512, the collection's max_length): a text that would be longer is cut so
that the ANSWER STAYS WHOLE (cutting from the left at collection time removed CAA answers, whose
prompts reach 2.2k characters): first the appended random question loses tokens from its start (its
end, where activations are read, stays), then the question (prompt) loses tokens from its start. An
example whose answer alone does not fit is refused. `probe_texts` says how many texts were cut.
"""

from __future__ import annotations

import logging
import random
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from locaudit.data.prompts import PromptFormat
from locaudit.data.types import ProbeExample, Question
from locaudit.errors import ConfigError, DataError

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 512  # collect_activations' default max_length
MIN_APPENDED_TOKENS = 16  # the appended question keeps at least this many tokens (its end) before the prompt is cut


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


def render_probe_text(ex: ProbeExample, fmt: PromptFormat | str = "plain", tokenizer=None) -> str:
    """The model text of a probe example, uncut (see the module docstring for both formats)."""
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


@dataclass(frozen=True)
class ProbeCut:
    """Tokens removed from one probe text: from the start of the appended question and of the prompt."""

    appended: int = 0
    prompt: int = 0

    @property
    def any(self) -> bool:
        return bool(self.appended or self.prompt)


def _n_tokens(tokenizer, text: str, special: bool) -> int:
    return len(tokenizer(text, add_special_tokens=special)["input_ids"])


def _drop_start(tokenizer, text: str, k: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[k:], skip_special_tokens=False).lstrip() if k > 0 else text


def fit_probe_text(ex: ProbeExample, fmt: PromptFormat | str, tokenizer, max_tokens: int = DEFAULT_MAX_TOKENS,
                   add_special_tokens: bool = True) -> tuple[str, ProbeCut]:
    """(text, cut): the probe text in at most `max_tokens` tokens (as collect_activations tokenizes it), the
    answer whole: the appended question is cut from its start first (down to MIN_APPENDED_TOKENS), then the
    prompt from its start. Raises DataError when even that does not fit."""
    if isinstance(fmt, str):
        fmt = PromptFormat(fmt)
    if max_tokens < 1:
        raise ConfigError(f"max_tokens={max_tokens}: must be >= 1")
    special = add_special_tokens and fmt.kind == "plain"  # a chat template writes its own special tokens
    text = render_probe_text(ex, fmt, tokenizer)
    over = _n_tokens(tokenizer, text, special) - max_tokens
    if over <= 0:
        return text, ProbeCut()
    cur, cut_a, cut_p = ex, 0, 0
    n_rand = len(tokenizer(ex.random_question, add_special_tokens=False)["input_ids"]) if ex.random_question else 0
    n_q = len(tokenizer(ex.question, add_special_tokens=False)["input_ids"])
    for _ in range(64):  # decode / re-encode is not exactly additive: correct until it fits
        if over <= 0:
            return text, ProbeCut(cut_a, cut_p)
        room_a = max(0, n_rand - MIN_APPENDED_TOKENS - cut_a)
        if room_a > 0:
            cut_a += min(room_a, over)
        elif cut_p < n_q - 1:
            cut_p += min(n_q - 1 - cut_p, over)
        else:
            break
        cur = replace(ex, random_question=_drop_start(tokenizer, ex.random_question, cut_a) if ex.random_question
                      else ex.random_question, question=_drop_start(tokenizer, ex.question, cut_p))
        text = render_probe_text(cur, fmt, tokenizer)
        over = _n_tokens(tokenizer, text, special) - max_tokens
    if over <= 0:
        return text, ProbeCut(cut_a, cut_p)
    n_ans = len(tokenizer(ex.answer, add_special_tokens=False)["input_ids"])
    raise DataError(f"probe example of question {ex.qid!r}: its answer ({n_ans} tokens) does not fit in "
                    f"max_length={max_tokens} tokens even with the question and the appended question cut; "
                    "raise --max-length (collect) / the study's max_length")


def probe_texts(examples: Sequence[ProbeExample], fmt: PromptFormat | str, tokenizer,
                max_tokens: int = DEFAULT_MAX_TOKENS, add_special_tokens: bool = True) -> list[str]:
    """The texts of `examples`, each fitted to `max_tokens` with its answer whole (`fit_probe_text`); one
    warning says how many were cut, and where."""
    texts, cuts = [], []
    for ex in examples:
        t, c = fit_probe_text(ex, fmt, tokenizer, max_tokens, add_special_tokens)
        texts.append(t)
        cuts.append(c)
    n_cut = sum(c.any for c in cuts)
    if n_cut:
        n_a, n_p = sum(c.appended > 0 for c in cuts), sum(c.prompt > 0 for c in cuts)
        warnings.warn(
            f"{n_cut} of {len(cuts)} probe texts are longer than {max_tokens} tokens and were cut, answers kept "
            f"whole: {n_a} appended question(s) cut at the start ({sum(c.appended for c in cuts)} tokens), "
            f"{n_p} prompt(s) cut at the start ({sum(c.prompt for c in cuts)} tokens)",
            stacklevel=2,
        )
    return texts


def probe_text(ex: ProbeExample, fmt: PromptFormat | str = "plain", tokenizer=None,
               max_tokens: int | None = DEFAULT_MAX_TOKENS) -> str:
    """The model text of a probe example; with a tokenizer, fitted to `max_tokens` with the answer whole
    (`fit_probe_text`; None: uncut). For counts of what was cut, use `probe_texts`."""
    if tokenizer is None or max_tokens is None:
        return render_probe_text(ex, fmt, tokenizer)
    text, cut = fit_probe_text(ex, fmt, tokenizer, max_tokens)
    if cut.any:
        warnings.warn(f"probe texts longer than {max_tokens} tokens are cut (the appended question first, then "
                      "the prompt's start; answers kept whole); probe_texts() counts them", stacklevel=2)
    return text
