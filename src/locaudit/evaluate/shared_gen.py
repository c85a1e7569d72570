"""Greedy answers of many edits in one batch: the edits' copies of each question batch run together.

`generate_answers` runs one edit at a time: every decoding step reads all the model's weights for a batch of
`batch_size` questions. Here up to `edits_together` optimal (LoRA) edits, and the unedited model, are stacked
(edit/lora.LoRAStack): a batch carries one block of the same `batch_size` questions per edit, block e going
through edit e's delta only, so a decoding step reads the weights once for all of them and runs a matrix product
`edits_together` times taller. On a GPU that is the difference between a few rows and a full tile; on a CPU the
per-step overhead (weights read, Python, the stopping check) is shared the same way.

Each block sees exactly what the edit's own run sees: the same prompts, length-sorted into the same question
batches, the same left padding, the shared instruction/primer prefix run once per edit (here: once for all
edits, one row each) and continued from its KV cache. So the answers are those of `generate_answers` up to the
float rounding of other matmul shapes, which can flip a greedy choice only where two tokens' logits tie within
rounding (tests/unit/test_shared_gen.py checks each chosen token against the edit's own logits).

Edits of other kinds (ITI, anything else) and a group of only unedited entries run through `generate_answers`.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from tqdm.auto import tqdm

from locaudit.data.prompts import PromptFormat
from locaudit.data.types import Question
from locaudit.edit.base import Edit, NoEdit
from locaudit.edit.lora import LoRAEdit, LoRAStack, build_stack
from locaudit.evaluate.generate import (GenerationRecord, _drop_special, _generation_config, _StopOnStrings,
                                        context_limit, generate_answers, padding_side, strip_stop, truncation_side)
from locaudit.models.batching import add_special_tokens_for, pad_id, pad_left
from locaudit.models.loading import LoadedModel
from locaudit.models.precision import ResolvedPrecision, require_resolved
from locaudit.models.prefix_cache import MIN_PREFIX, PrefixState, cache_kwarg, common_prefix_len

log = logging.getLogger(__name__)


def _unedited(edit: Edit | None) -> bool:
    return edit is None or isinstance(edit, NoEdit)


def plan_groups(edits: Sequence[Edit | None], edits_together: int) -> list[list[int]]:
    """Indices of `edits` in the groups that generate together: LoRA edits of the same rank and form
    (reparameterised or plain), up to `edits_together` per group, the unedited entries joining the first groups
    with room; every other edit (and unedited entries when no LoRA edit exists) alone."""
    k = max(1, int(edits_together))
    by_form: dict[tuple[int, bool], list[int]] = {}
    alone: list[list[int]] = []
    plain = [i for i, e in enumerate(edits) if _unedited(e)]
    for i, e in enumerate(edits):
        if isinstance(e, LoRAEdit):
            by_form.setdefault((e.rank, bool(e.reparam)), []).append(i)
        elif not _unedited(e):
            alone.append([i])
    groups = [members[s: s + k] for members in by_form.values() for s in range(0, len(members), k)]
    for g in groups:  # the unedited model rides along where a group has room (its copy adds exactly zero)
        while plain and len(g) < k:
            g.append(plain.pop(0))
    alone += [[i] for i in plain]
    return [sorted(g) for g in groups] + alone


def stack_for(lm: LoadedModel, edits: Sequence[Edit | None]) -> LoRAStack:
    """A frozen stack with one copy per entry of `edits` (LoRA edits of one rank and form; None = zero delta)."""
    loras = [e for e in edits if isinstance(e, LoRAEdit)]
    if not loras or any(not isinstance(e, LoRAEdit) and not _unedited(e) for e in edits):
        raise ValueError("stack_for: LoRA edits (and unedited entries) only, at least one LoRA edit")
    ref = loras[0]
    if any(e.rank != ref.rank or bool(e.reparam) != bool(ref.reparam) for e in loras):
        raise ValueError("stack_for: LoRA edits of one rank and form only")
    heads, params = [], []
    for e in edits:
        if isinstance(e, LoRAEdit):
            e.check(lm.sites)
            heads.append(e.heads)
            params.append((e.a, e.b))
        else:  # zero parameters: the delta is exactly zero, whatever the head set
            heads.append(ref.heads)
            params.append((torch.zeros_like(ref.a), torch.zeros_like(ref.b)))
    st = build_stack(lm.sites, heads, ref.rank, ref.reparam, params=params, trainable=False)
    return st.to(lm.sites.weight(0).device)


def generate_many(
    lm: LoadedModel,
    edits: Sequence[Edit | None],
    questions: Sequence[Question],
    fmt: PromptFormat = PromptFormat("plain"),
    max_new_tokens: int = 50,
    batch_size: int = 16,
    *, precision: ResolvedPrecision,
    max_length: int | None = None,
    edits_together: int = 8,
    progress: bool = True,
) -> list[list[GenerationRecord]]:
    """`[generate_answers(lm, e, questions, fmt, max_new_tokens, batch_size, precision=, max_length=) for e in
    edits]`, with LoRA edits generated `edits_together` at a time (module doc). Batches hold `batch_size`
    questions per edit, so `edits_together * batch_size` sequences."""
    prec = require_resolved(precision, "generate_many")
    edits = list(edits)
    out: list[list[GenerationRecord] | None] = [None] * len(edits)
    groups = plan_groups(edits, edits_together)
    bar = tqdm(total=len(edits) * len(questions), desc="generate (edits together)", unit="answer",
               disable=not progress)
    for g in groups:
        if len(g) == 1:
            out[g[0]] = generate_answers(lm, edits[g[0]], questions, fmt, max_new_tokens, batch_size, progress=False,
                                         precision=prec, max_length=max_length)
        else:
            answers = _generate_stacked(lm, [edits[i] for i in g], questions, fmt, max_new_tokens, batch_size, prec,
                                        max_length, bar)
            for i, a in zip(g, answers):
                out[i] = [GenerationRecord(q.qid, q.question, x) for q, x in zip(questions, a)]
        bar.update(len(questions) if len(g) == 1 else 0)
    bar.close()
    return [o if o is not None else [] for o in out]


def _generate_stacked(lm: LoadedModel, edits: Sequence[Edit | None], questions: Sequence[Question],
                      fmt: PromptFormat, max_new_tokens: int, batch_size: int, prec: ResolvedPrecision,
                      max_length: int | None, bar) -> list[list[str]]:
    """Answers [edit][question] of a stack of edits, batched and padded as evaluate/generate.greedy_generate."""
    tok, model = lm.tokenizer, lm.model
    prompts = [fmt.prompt(q.question, tok) for q in questions]
    E = len(edits)
    out = [[""] * len(prompts) for _ in range(E)]
    if not prompts:
        return out
    special = add_special_tokens_for(fmt, tok, prompts[0])
    stops = fmt.stop_strings(tok)
    limit = context_limit(lm, max_length or 10**9)
    max_prompt = max(limit - max_new_tokens, 1) if limit < 10**9 else None
    trunc = {"truncation": True, "max_length": max_prompt} if max_prompt else {}
    config = _generation_config(lm, max_new_tokens)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # greedy_generate's batches
    stack = stack_for(lm, edits)
    with padding_side(tok, "left"), truncation_side(tok, "left"), torch.no_grad(), \
            prec.compute(lm.model, lm.dtype), stack.attached():
        ids = tok(list(prompts), add_special_tokens=special, **trunc)["input_ids"]
        n = min(common_prefix_len(ids), min(len(s) for s in ids) - 1) if len(ids) > 1 else 0
        state = _run_prefix_rows(model, ids[0][:n], E, lm.device) if n >= MIN_PREFIX else None
        for s in range(0, len(order), batch_size):
            idx = order[s: s + batch_size]
            if state is not None:
                inp, att, kw = _from_prefix(model, state, [ids[i] for i in idx], pad_id(tok), E)
            else:
                enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=special,
                          **trunc)
                inp, att, kw = enc["input_ids"].repeat(E, 1), enc["attention_mask"].repeat(E, 1), {}
            T = inp.shape[1]
            from transformers import StoppingCriteriaList

            stopping = StoppingCriteriaList([_StopOnStrings(tok, T, stops)]) if stops else None
            gen = model.generate(input_ids=inp.to(lm.device), attention_mask=att.to(lm.device),
                                 generation_config=config, stopping_criteria=stopping, **kw)
            texts = tok.batch_decode(gen[:, T:], skip_special_tokens=False)
            for r, t in enumerate(texts):  # block-major rows: edit r // b, question idx[r % b]
                out[r // len(idx)][idx[r % len(idx)]] = strip_stop(_drop_special(t, tok), stops)
            bar.update(E * len(idx))
    return out


def _run_prefix_rows(model, ids: Sequence[int], rows: int, device) -> PrefixState:
    """The shared prefix run once per stacked edit (one row each): its KV cache [rows, ...]."""
    x = torch.tensor([list(ids)] * rows, dtype=torch.long, device=device)
    o = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=True)
    cache = o["cache"] if "cache" in o else o.past_key_values
    return PrefixState(list(ids), cache, o.logits[:, -1].detach())


def _from_prefix(model, state: PrefixState, prompts: list[list[int]], pad: int, E: int):
    """Inputs [prefix][pad...][rest of prompt] for E blocks of these prompts, and a copy of the prefix cache
    with each edit's row repeated once per prompt (block-major, as LoRAStack reads the batch)."""
    P, b = len(state), len(prompts)
    tail, tail_mask = pad_left([p[P:] for p in prompts], pad)
    inp = torch.cat([torch.tensor([state.ids] * b, dtype=torch.long), tail], 1).repeat(E, 1)
    att = torch.cat([torch.ones((b, P), dtype=torch.long), tail_mask], 1).repeat(E, 1)
    return inp, att, {cache_kwarg(model): state.cache_for(b)}


__all__ = ["generate_many", "plan_groups", "stack_for"]
