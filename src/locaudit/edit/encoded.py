"""Preference pairs as token ids, and training batches of them.

Each pair is tokenized once (prompt and completion separately, by `models.scoring.encode_completions`,
so prompt tokens never count). A batch of B pairs is one forward of 2B sequences, chosen then rejected
(TRL's concatenated forward). `key` is a content hash that keys the reference and prefix caches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from locaudit.data.prompts import PromptFormat
from locaudit.data.types import PreferencePair
from locaudit.errors import DataError
from locaudit.io import stable_hash
from locaudit.models.batching import add_special_tokens_for, pad_id  # noqa: F401 (add_special_tokens_for re-exported)
from locaudit.models.scoring import CompletionBatch, collate_completions, encode_completions

Encoded = tuple[list[int], list[int]]  # (prompt ids, completion ids)


@dataclass
class EncodedPairs:
    """Token ids of every pair's chosen and rejected (prompt, completion), and a content key."""

    pairs: list[PreferencePair]
    chosen: list[Encoded]
    rejected: list[Encoded]
    key: str
    pad_id: int

    def __len__(self) -> int:
        return len(self.pairs)

    def sequences(self) -> list[Encoded]:
        """All 2N sequences: chosen 0..N-1, then rejected 0..N-1."""
        return self.chosen + self.rejected

    def batch(self, idx: Sequence[int]) -> CompletionBatch:
        """Right-padded batch of 2B sequences: chosen of `idx`, then rejected of `idx`."""
        return collate_completions([self.chosen[i] for i in idx] + [self.rejected[i] for i in idx], self.pad_id)


def encode_pairs(tokenizer, pairs: Sequence[PreferencePair], fmt: PromptFormat, max_length: int = 256,
                 model_key: str = "") -> EncodedPairs:
    """Tokenize pairs in `fmt`. Raises DataError on an empty pair list or an empty completion."""
    pairs = list(pairs)
    if not pairs:
        raise DataError("no preference pairs to train or evaluate on (the split is empty)")
    prompts = [fmt.prompt(p.question, tokenizer) for p in pairs]
    special = add_special_tokens_for(fmt, tokenizer, prompts[0])
    chosen = encode_completions(tokenizer, prompts, [fmt.completion(p.chosen) for p in pairs], max_length, special)
    rejected = encode_completions(tokenizer, prompts, [fmt.completion(p.rejected) for p in pairs], max_length,
                                  special)
    for i, (c, r) in enumerate(zip(chosen, rejected)):
        if not c[1] or not r[1]:
            side = "chosen" if not c[1] else "rejected"
            raise DataError(f"pair {i} (qid {pairs[i].qid!r}): the {side} answer is empty after tokenization")
    pad = pad_id(tokenizer)
    key = stable_hash({"model": model_key, "fmt": [fmt.kind, fmt.system], "max_length": max_length,
                       "ids": [chosen, rejected]})
    return EncodedPairs(pairs, chosen, rejected, key, int(pad))


def replicate(batch: CompletionBatch, n: int) -> CompletionBatch:
    """The batch repeated n times along the batch axis (one copy per edit of a stack)."""
    if n == 1:
        return batch
    return CompletionBatch(*(t.repeat(n, *([1] * (t.dim() - 1))) for t in
                             (batch.input_ids, batch.attention_mask, batch.completion_mask, batch.prompt_lengths)))


def length_sorted(enc: EncodedPairs) -> list[int]:
    """Pair indices sorted by their longest sequence (limits padding in no-grad passes)."""
    return sorted(range(len(enc)), key=lambda i: max(sum(map(len, enc.chosen[i])), sum(map(len, enc.rejected[i]))))


def as_tensor_lengths(enc: EncodedPairs) -> torch.Tensor:
    """Long[Tensor, "2N"]: token length of each sequence (chosen then rejected)."""
    return torch.tensor([len(p) + len(c) for p, c in enc.sequences()], dtype=torch.long)
