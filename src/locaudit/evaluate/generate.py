"""Batched greedy answers with an edit applied at every position (prompt and each new token).

Prompts are left-padded so that every sequence's next token sits in the last column; `model.generate`
keeps the KV cache (which holds keys/values of the EDITED model, since the edit was active while the
prompt was encoded) and derives position ids from the attention mask. A stopping criterion ends each
sequence at a stop string (the end of the answer's line in the plain format, whose answers are one
line each; the end token in chat), which is then stripped from the answer.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from locaudit.data.prompts import PromptFormat
from locaudit.data.types import Question
from locaudit.edit.base import Edit
from locaudit.errors import DataError
from locaudit.io import read_jsonl, write_text_atomic
from locaudit.evaluate.view import edited
from locaudit.models.batching import add_special_tokens_for, pad_id, pad_left
from locaudit.models.loading import LoadedModel
from locaudit.models.precision import ResolvedPrecision, require_resolved
from locaudit.models.prefix_cache import PrefixState, cache_kwarg, shared_prefix

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationRecord:
    """One generated answer, keyed by question id."""

    qid: str
    question: str
    answer: str


@contextmanager
def padding_side(tokenizer, side: str) -> Iterator[None]:
    old = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        yield
    finally:
        tokenizer.padding_side = old


@contextmanager
def truncation_side(tokenizer, side: str) -> Iterator[None]:
    old = getattr(tokenizer, "truncation_side", "right")
    tokenizer.truncation_side = side
    try:
        yield
    finally:
        tokenizer.truncation_side = old


def context_limit(lm: LoadedModel, max_length: int) -> int:
    """`max_length`, or the model's context length (max_position_embeddings / n_positions) if shorter."""
    cfg = getattr(lm.model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        n = getattr(cfg, name, None)
        if isinstance(n, int) and n > 0:
            return min(max_length, n)
    return max_length


def _stop_at(text: str, stops: Sequence[str]) -> int | None:
    """Index of the first stop string after the answer has begun (leading whitespace, such as the newline
    some models emit right after "A:", does not count), else None."""
    start = len(text) - len(text.lstrip())
    hits = [i for s in stops if s and (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None


def strip_stop(text: str, stops: Sequence[str]) -> str:
    """Cut `text` at the first stop string (after the answer has begun) and strip surrounding whitespace."""
    cut = _stop_at(text, stops)
    return text[:cut].strip()


class _StopOnStrings:
    """Per-sequence stopping criterion: True once the generated text contains a stop string."""

    def __init__(self, tokenizer, prompt_len: int, stops: Sequence[str]) -> None:
        self.tokenizer, self.prompt_len, self.stops = tokenizer, prompt_len, [s for s in stops if s]

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        new = input_ids[:, self.prompt_len:]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=False)
        return torch.tensor([_stop_at(t, self.stops) is not None for t in texts], device=input_ids.device)


def _generation_config(lm: LoadedModel, max_new_tokens: int):
    from transformers import GenerationConfig

    tok = lm.tokenizer
    eos = getattr(tok, "eos_token_id", None)
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                            eos_token_id=eos, pad_token_id=tok.pad_token_id, use_cache=True)


def greedy_generate(
    lm: LoadedModel,
    prompts: Sequence[str],
    max_new_tokens: int = 50,
    stops: Sequence[str] = (),
    batch_size: int = 16,
    add_special_tokens: bool = True,
    progress: bool = True,
    max_prompt_tokens: int | None = None,
    share_prefix: bool = True,
    copies: int = 1,
) -> list[str]:
    """Greedy continuations of `prompts` (batched, left-padded), cut at the first stop string.

    Runs under whatever edit the caller has applied; batches are formed from length-sorted prompts.
    `max_prompt_tokens`: longer prompts lose their start (the question at the end is kept), with a warning.
    `share_prefix`: a prefix common to all prompts (ITI's instruction and QA primer) runs once, and each
    batch continues from a copy of its KV cache, padded after it (models/prefix_cache.py): the same
    answers for a fraction of the prompt compute.
    `copies` > 1: every batch runs `copies` times stacked along the batch axis (copy c = rows c*b..(c+1)*b-1, as
    edit/lora.LoRAStack routes a stack of edits); the answers are then [copy c's answers..., for c in copies],
    i.e. `copies * len(prompts)` strings, copy-major.
    """
    from transformers import StoppingCriteriaList

    tok, model = lm.tokenizer, lm.model
    config = _generation_config(lm, max_new_tokens)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    C = max(1, int(copies))
    out: list[str] = [""] * (C * len(prompts))
    bar = tqdm(total=C * len(prompts), desc="generate", unit="answer", disable=not progress)
    trunc = {"truncation": True, "max_length": max_prompt_tokens} if max_prompt_tokens else {}
    if max_prompt_tokens:
        n_long = sum(len(x) > max_prompt_tokens for x in tok(list(prompts), add_special_tokens=add_special_tokens)["input_ids"])
        if n_long:
            log.warning("%d of %d prompts exceed %d tokens (the model's context less the answer): their start is "
                        "cut", n_long, len(prompts), max_prompt_tokens)
    with padding_side(tok, "left"), truncation_side(tok, "left"), torch.no_grad():
        if share_prefix and len(prompts) > 1:
            ids = tok(list(prompts), add_special_tokens=add_special_tokens, **trunc)["input_ids"]
            state = shared_prefix(model, ids, device=lm.device, rows=C)
            if state is not None:
                _generate_from_prefix(lm, state, ids, order, out, config, stops, batch_size, bar, C)
                bar.close()
                return out
        for s in range(0, len(order), batch_size):
            idx = order[s: s + batch_size]
            enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True,
                      add_special_tokens=add_special_tokens, **trunc).to(lm.device)
            T = enc["input_ids"].shape[1]
            stopping = StoppingCriteriaList([_StopOnStrings(tok, T, stops)]) if stops else None
            gen = model.generate(input_ids=enc["input_ids"].repeat(C, 1), attention_mask=enc["attention_mask"].repeat(C, 1),
                                 generation_config=config, stopping_criteria=stopping)
            _collect(tok, gen[:, T:], idx, len(prompts), out, stops)
            bar.update(C * len(idx))
    bar.close()
    return out


def _collect(tok, new_ids: torch.Tensor, idx: list[int], n: int, out: list[str], stops: Sequence[str]) -> None:
    """Decode a batch of `copies * len(idx)` rows (copy-major) into out[c * n + i]."""
    texts = tok.batch_decode(new_ids, skip_special_tokens=False)
    for r, t in enumerate(texts):
        out[(r // len(idx)) * n + idx[r % len(idx)]] = strip_stop(_drop_special(t, tok), stops)


def _generate_from_prefix(lm: LoadedModel, state: PrefixState, ids: list[list[int]], order: list[int], out: list[str],
                          config, stops: Sequence[str], batch_size: int, bar, copies: int = 1) -> None:
    """Greedy answers for prompts that all start with `state`'s prefix: [prefix][pad...][rest of prompt]; `state`
    has one cache row per copy."""
    from transformers import StoppingCriteriaList

    tok, model = lm.tokenizer, lm.model
    P, pad = len(state), pad_id(tok)
    kw = cache_kwarg(model)
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        rest = [ids[i][P:] for i in idx]
        B, T = len(idx), max(len(r) for r in rest)
        tail, tail_mask = pad_left(rest, pad)  # [prefix][pad...][rest of prompt]
        inp = torch.cat([torch.tensor([state.ids] * B, dtype=torch.long), tail], 1).repeat(copies, 1)
        att = torch.cat([torch.ones((B, P), dtype=torch.long), tail_mask], 1).repeat(copies, 1)
        stopping = StoppingCriteriaList([_StopOnStrings(tok, P + T, stops)]) if stops else None
        # cache_for repeats each row B times: copy c's prefix row serves its block of B prompts
        gen = model.generate(input_ids=inp.to(lm.device), attention_mask=att.to(lm.device), generation_config=config,
                             stopping_criteria=stopping, **{kw: state.cache_for(B)})
        _collect(tok, gen[:, P + T:], idx, len(ids), out, stops)
        bar.update(copies * B)


def _drop_special(text: str, tok) -> str:
    """Remove padding (and cut at the end token), keeping every other character of the answer."""
    eos = getattr(tok, "eos_token", None)
    if eos and eos in text:
        text = text[: text.index(eos)]
    pad = getattr(tok, "pad_token", None)
    if pad:
        text = text.replace(pad, "")
    return text


def generate_answers(
    lm: LoadedModel,
    edit: Edit | None,
    questions: Sequence[Question],
    fmt: PromptFormat = PromptFormat("plain"),
    max_new_tokens: int = 50,
    batch_size: int = 16,
    out_path: str | Path | None = None,
    progress: bool = True,
    *, precision: ResolvedPrecision,
    max_length: int | None = None,
) -> list[GenerationRecord]:
    """Greedy answers to `questions` with `edit` applied at every position; optionally saved as JSONL.

    `max_length`: prompt + answer tokens at most (default: the model's context); longer prompts lose their start."""
    with edited(lm, edit, precision=precision):
        answers = answer_texts(lm, questions, fmt, max_new_tokens, batch_size, progress, max_length)
    records = [GenerationRecord(q.qid, q.question, a) for q, a in zip(questions, answers)]
    if out_path is not None:
        save_generations(records, out_path)
    return records


def answer_texts(lm: LoadedModel, questions: Sequence[Question], fmt: PromptFormat, max_new_tokens: int,
                 batch_size: int, progress: bool = True, max_length: int | None = None, copies: int = 1) -> list[str]:
    """Greedy answers to `questions` in `fmt` under whatever edit and precision the caller has applied
    (`greedy_generate`, `copies` copy-major blocks of answers)."""
    prompts = [fmt.prompt(q.question, lm.tokenizer) for q in questions]
    if not prompts:
        return []
    special = add_special_tokens_for(fmt, lm.tokenizer, prompts[0])
    limit = context_limit(lm, max_length or 10**9)
    return greedy_generate(lm, prompts, max_new_tokens, fmt.stop_strings(lm.tokenizer), batch_size, special, progress,
                           max_prompt_tokens=max(limit - max_new_tokens, 1) if limit < 10**9 else None, copies=copies)


def save_generations(records: Sequence[GenerationRecord], path: str | Path) -> Path:
    """Write records as JSONL (qid, question, answer), atomically."""
    path = Path(path)
    write_text_atomic(path, "".join(json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in records))
    return path


def load_generations(path: str | Path) -> list[GenerationRecord]:
    """Read a JSONL file written by `save_generations`; a bad line is named by number and field."""
    path = Path(path)
    out = []
    for n, d in read_jsonl(path):
        missing = [k for k in ("qid", "question", "answer") if not isinstance(d, dict) or k not in d]
        if missing:
            raise DataError(f"{path}:{n}: missing field(s) {missing}")
        out.append(GenerationRecord(str(d["qid"]), str(d["question"]), str(d["answer"])))
    return out
