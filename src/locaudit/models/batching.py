"""Batching token sequences: right (or left) padding with a mask, and length-sorted batches.

Every forward pass over several texts in locaudit pads on the right (real tokens keep positions
0..n-1, so a batch gives the same numbers as one text at a time up to float error) and groups texts of
similar length so that little compute is spent on padding.
"""

from __future__ import annotations

from typing import Sequence

import torch


def pad_id(tokenizer) -> int:
    """The id used for padding: the tokenizer's pad token, else 0 (masked out either way)."""
    pid = getattr(tokenizer, "pad_token_id", None)
    return int(pid) if pid is not None else 0


def pad_right(seqs: Sequence[Sequence[int]], pad: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists into (ids Long[B, T], attention_mask Long[B, T]); T = longest or `length`.

    The mask is 1 on real tokens and 0 on padding.
    """
    B = len(seqs)
    T = max((len(s) for s in seqs), default=0) if length is None else int(length)
    if any(len(s) > T for s in seqs):
        raise ValueError(f"pad_right: a sequence is longer than length={T}")
    ids = torch.full((B, T), int(pad), dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for r, s in enumerate(seqs):
        n = len(s)
        if n:
            ids[r, :n] = torch.as_tensor(list(s), dtype=torch.long)
            mask[r, :n] = 1
    return ids, mask


def pad_left(seqs: Sequence[Sequence[int]], pad: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists into (ids Long[B, T], attention_mask Long[B, T]): each row ends with its last real token
    (for generation, where every row continues from the same last position; e.g. after a shared cached prefix)."""
    ids, mask = pad_right([list(s)[::-1] for s in seqs], pad, length)
    return ids.flip(1), mask.flip(1)


def length_sorted_batches(lengths: Sequence[int], batch_size: int, longest_first: bool = True) -> list[list[int]]:
    """Indices grouped in batches of `batch_size`, sorted by length (ties by index).

    Longest first puts the memory peak at the start, where an out-of-memory error costs least.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sign = -1 if longest_first else 1
    order = sorted(range(len(lengths)), key=lambda i: (sign * lengths[i], i))
    return [order[s: s + batch_size] for s in range(0, len(order), batch_size)]


PAD_WASTE = 1.25  # a length chunk closes before its padded size exceeds this x its real tokens


def length_chunks(lengths: Sequence[int], max_size: int, waste: float = PAD_WASTE, min_size: int = 4) -> list[list[int]]:
    """Indices in ascending length, cut into chunks of at most `max_size` whose padded size (count x longest)
    stays within `waste` x their real tokens; a chunk may exceed it while it has fewer than `min_size`
    members (tiny forwards cost more in overhead than their padding). For the many continuations of one
    cached prompt, where padding costs as much as real tokens and one global length sort is impossible."""
    if max_size < 1:
        raise ValueError(f"max_size must be >= 1, got {max_size}")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    out: list[list[int]] = []
    cur: list[int] = []
    real = 0
    for i in order:
        n = int(lengths[i])
        if cur and (len(cur) >= max_size or (len(cur) >= min_size and (len(cur) + 1) * n > waste * (real + n))):
            out.append(cur)
            cur, real = [], 0
        cur.append(i)
        real += n
    if cur:
        out.append(cur)
    return out


def pad_right_tensors(seqs: Sequence[torch.Tensor], length: int | None = None,
                      dtype: torch.dtype | None = None) -> torch.Tensor:
    """Right-pad per-sequence tensors Float[Tensor, "len_i ..."] with zeros into Float[Tensor, "B T ..."].

    T = the longest or `length`; the dtype is the first tensor's unless given.
    """
    if not seqs:
        raise ValueError("pad_right_tensors: no sequences")
    T = max(int(s.shape[0]) for s in seqs) if length is None else int(length)
    if any(s.shape[0] > T for s in seqs):
        raise ValueError(f"pad_right_tensors: a sequence is longer than length={T}")
    out = torch.zeros(len(seqs), T, *seqs[0].shape[1:], dtype=dtype or seqs[0].dtype)
    for r, s in enumerate(seqs):
        out[r, : s.shape[0]] = s
    return out


def add_special_tokens_for(fmt, tokenizer, prompt: str) -> bool:
    """Whether to add the tokenizer's special tokens to `prompt` (a PromptFormat's prompt text): yes,
    unless a chat template already wrote its BOS into it (`fmt.kind == "chat"`)."""
    bos = getattr(tokenizer, "bos_token", None)
    return not (getattr(fmt, "kind", None) == "chat" and bos and prompt.startswith(bos))
