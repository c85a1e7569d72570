"""Batching token sequences: right padding with a mask, and length-sorted batches.

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


def length_sorted_batches(lengths: Sequence[int], batch_size: int, longest_first: bool = True) -> list[list[int]]:
    """Indices grouped in batches of `batch_size`, sorted by length (ties by index).

    Longest first puts the memory peak at the start, where an out-of-memory error costs least.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sign = -1 if longest_first else 1
    order = sorted(range(len(lengths)), key=lambda i: (sign * lengths[i], i))
    return [order[s: s + batch_size] for s in range(0, len(order), batch_size)]
