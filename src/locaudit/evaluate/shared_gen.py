"""Greedy answers of many edits in one batch: the edits' copies of each question batch run together.

`generate_answers` runs one edit at a time: every decoding step reads all the model's weights for a batch of
`batch_size` questions. Here up to `edits_together` optimal (LoRA) edits, and the unedited model, are stacked
(edit/lora.LoRAStack): a batch carries one block of the same `batch_size` questions per edit, block e going
through edit e's delta only, so a decoding step reads the weights once for all of them and runs a matrix product
`edits_together` times taller. On a GPU that is the difference between a few rows and a full tile; on a CPU the
per-step overhead (weights read, Python, the stopping check) is shared the same way.

Each block sees exactly what the edit's own run sees: `generate_answers`'s own code runs (evaluate/generate.py,
`copies` = the number of stacked edits): the same prompts, length-sorted into the same question batches, the same
left padding, the shared instruction/primer prefix run once per edit (one row each) and continued from its KV cache. So the answers are those of `generate_answers` up to the
float rounding of other matmul shapes, which can flip a greedy choice only where two tokens' logits tie within
rounding (tests/unit/test_shared_gen.py checks each chosen token against the edit's own logits).

Edits of other kinds (ITI, anything else) and a group of only unedited entries run through `generate_answers`.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from locaudit.data.prompts import PromptFormat
from locaudit.data.types import Question
from locaudit.edit.base import Edit, NoEdit
from locaudit.edit.lora import LoRAEdit, LoRAStack, build_stack
from locaudit.evaluate.generate import GenerationRecord, answer_texts, generate_answers
from locaudit.evaluate.view import edited
from locaudit.models.loading import LoadedModel
from locaudit.models.precision import ResolvedPrecision, require_resolved

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


class _Stacked:
    """The edits of a LoRAStack as one Edit (edit/base.py protocol) for `edited`: copy e of a batch gets edit e."""

    def __init__(self, stack: LoRAStack) -> None:
        self.stack = stack

    @contextmanager
    def applied(self, lm: LoadedModel) -> Iterator[None]:
        with self.stack.attached():
            yield

    def describe(self) -> dict:
        return {"kind": "lora-stack", "n_edits": self.stack.n_edits}


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
    out: list[list[GenerationRecord]] = [[] for _ in edits]
    for g in tqdm(plan_groups(edits, edits_together), desc="generate (edits together)", unit="group",
                  disable=not progress):
        if len(g) == 1:
            out[g[0]] = generate_answers(lm, edits[g[0]], questions, fmt, max_new_tokens, batch_size, progress=False,
                                         precision=prec, max_length=max_length)
            continue
        with edited(lm, _Stacked(stack_for(lm, [edits[i] for i in g])), precision=prec):
            texts = answer_texts(lm, questions, fmt, max_new_tokens, batch_size, False, max_length, copies=len(g))
        n = len(questions)
        for c, i in enumerate(g):
            out[i] = [GenerationRecord(q.qid, q.question, a) for q, a in zip(questions, texts[c * n:(c + 1) * n])]
    return out


__all__ = ["generate_many", "plan_groups", "stack_for"]
