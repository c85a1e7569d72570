"""A prefix shared by many prompts, run once: its KV cache, copied for every batch that continues it.

Evaluation prompts often start with the same long text (ITI's protocol puts a 216-token instruction and
six-shot QA primer before every question). Running that prefix once per call, under whatever edit is
active, and continuing every question from a copy of its KV cache gives the same numbers as running
each full prompt (positions continue from the prefix; the attention mask covers prefix + the rest)
while the prefix costs one forward pass instead of one per question.

Callers put the prefix first and any padding AFTER it (between prefix and question), marked 0 in the
attention mask; models that derive position ids from the mask (every family locaudit supports) then
give each real token the position it has in the unpadded prompt.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Sequence

import torch

MIN_PREFIX = 16  # shorter shared prefixes are not worth a cache copy per batch


def common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of token id lists (0 for fewer than two)."""
    if len(seqs) < 2:
        return 0
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs[1:]):
            return i
    return n


def cache_kwarg(model) -> str:
    """The forward / generate argument that takes a KV cache: `cache` (transformers 5) or `past_key_values`."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


@dataclass
class PrefixState:
    """ids: the prefix's token ids; cache: its KV cache (batch 1); last_logits: Float[Tensor, "vocab"]
    at its last position (predicting the token after it)."""

    ids: list[int]
    cache: object
    last_logits: torch.Tensor

    def __len__(self) -> int:
        return len(self.ids)

    def cache_for(self, batch: int):
        """A copy of the cache repeated `batch` times along the batch dimension (the original stays intact)."""
        c = copy.deepcopy(self.cache)
        if batch > 1:
            c.batch_repeat_interleave(batch)
        return c


def run_prefix(model, ids: Sequence[int], device=None, rows: int = 1) -> PrefixState:
    """Run `ids` once (no grad) and keep its KV cache; call inside the edit and precision contexts that
    the continuations will run under. `rows` > 1: as many identical rows (one per copy of a stacked edit batch,
    edit/lora.LoRAStack), so the cache has `rows` rows; last_logits is then that of the first row."""
    device = device or next(model.parameters()).device
    x = torch.tensor([list(ids)] * rows, dtype=torch.long, device=device)
    with torch.no_grad():
        out = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=True)
    cache = out["cache"] if "cache" in out else out.past_key_values
    return PrefixState(list(ids), cache, out.logits[0, -1].detach())


def shared_prefix(model, seqs: Sequence[Sequence[int]], min_len: int = MIN_PREFIX, device=None,
                  rows: int = 1) -> PrefixState | None:
    """The common prefix of `seqs` run once (`rows` rows, see run_prefix), or None when it is shorter than `min_len`
    tokens. One token is always left to each sequence, so every continuation has an input of its own."""
    n = common_prefix_len(seqs)
    n = min(n, min((len(s) for s in seqs), default=0) - 1)
    if n < min_len:
        return None
    return run_prefix(model, list(seqs[0][:n]), device, rows)
