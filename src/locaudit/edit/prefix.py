"""Frozen-prefix cache: run only the layers an edit can change.

An edit whose lowest layer is l leaves the hidden states entering layer l unchanged, so they are
computed once (no grad) and reused across epochs and trials; training then runs layers l..L-1 only.
The surgery (capture the states entering a layer, run only the layers above it, checkpoint them) is
models/surgery.py; it is enabled for the families whose registry card says `prefix=True`
(models/sites.py), which the tests check against the full forward; others fall back to the full forward.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from locaudit.models.batching import pad_right_tensors
from locaudit.models.loading import LoadedModel
from locaudit.models.precision import ResolvedPrecision, require_resolved
from locaudit.models.surgery import (PREFIX_FAMILIES, capture_input, checkpointed_layers,  # noqa: F401 (re-exported)
                                     prefix_supported, run_from_layer)

log = logging.getLogger(__name__)


@dataclass
class PrefixStates:
    """Hidden states entering `layer` for every sequence (2N: chosen 0..N-1, then rejected), unpadded.

    states[i]: Float[Tensor, "len_i d_model"] in `dtype`, on the CPU.
    """

    layer: int
    states: list[torch.Tensor]
    dtype: torch.dtype
    packed: bool = False  # one packed row per pair (edit/packed.py) instead of 2N sequences

    def batch(self, idx: Sequence[int], n_pairs: int, T: int, one_row: bool = False) -> torch.Tensor:
        """Float[Tensor, "2B T d_model"] right-padded with zeros: chosen of `idx`, then rejected of `idx`;
        packed: Float[Tensor, "B T d_model"], the packed rows of `idx`, or with `one_row` [1, T, d_model],
        them one after the other (edit/packed.py collate_packed)."""
        if self.packed:
            rows = [self.states[i] for i in idx]
            return pad_right_tensors([torch.cat(rows)] if one_row else rows, T, self.dtype)
        seqs = [self.states[i] for i in idx] + [self.states[n_pairs + i] for i in idx]
        return pad_right_tensors(seqs, T, self.dtype)

    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.states)


def collect_states(lm: LoadedModel, enc, layer: int, precision: ResolvedPrecision, batch_size: int = 16,
                   start: PrefixStates | None = None, progress: bool = False, packed: bool = False) -> PrefixStates:
    """No-grad pass storing the states entering `layer` for every sequence of `enc` (an EncodedPairs), or
    with `packed` for every pair's packed row (edit/packed.py; batch_size // 2 rows per forward).

    The states are stored exactly as the layers above receive them (their dtype: the residual stream of an
    fp32 model stays fp32 under bf16 autocast), so training from them equals the full forward.
    From `start` (states at a lower layer) only layers start.layer..layer-1 run.
    """
    from locaudit.edit.packed import mask_kind, pack_pairs, packed_lengths
    from locaudit.models.scoring import collate_completions

    if start is not None and start.packed != packed:
        raise ValueError("collect_states: the start states have another layout (packed vs one row per sequence)")
    seqs = enc.sequences()
    if packed:
        lens = packed_lengths(enc)
        batch_size = max(1, batch_size // 2)
        kind = mask_kind(lm.model)
    else:
        lens = [len(p) + len(c) for p, c in seqs]
    order = sorted(range(len(lens)), key=lambda i: lens[i])
    out: list[torch.Tensor | None] = [None] * len(lens)
    dev = lm.device
    it = range(0, len(order), batch_size)
    dtype = None
    precision = require_resolved(precision, "prefix")
    with torch.no_grad(), precision.compute(lm.model, lm.dtype), capture_input(lm, layer) as cap:
        ctx = run_from_layer(lm, start.layer) if start is not None and start.layer > 0 else nullcontext()
        with ctx as feed:
            for s in tqdm(it, desc=f"prefix states @ layer {layer}", disable=not progress, leave=False):
                idx = order[s: s + batch_size]
                if packed:
                    b = pack_pairs(enc, idx).to(dev)
                    ids, mask, extra = b.input_ids, b.mask_for(kind, lm.dtype), {"position_ids": b.position_ids}
                    lengths = b.lengths
                else:
                    b = collate_completions([seqs[i] for i in idx], enc.pad_id).to(dev)
                    ids, mask, extra = b.input_ids, b.attention_mask, {}
                    lengths = b.attention_mask.sum(1).tolist()
                if feed is not None:
                    feed["h"] = pad_right_tensors([start.states[i] for i in idx], ids.shape[1], start.dtype).to(dev)
                cap.forward(lm.model, ids, mask, **extra)
                h = cap.values.pop(layer)
                dtype = h.dtype
                for j, i in enumerate(idx):
                    out[i] = h[j, : lengths[j]].to("cpu").clone()
    return PrefixStates(layer, out, dtype or lm.dtype, packed)  # type: ignore[arg-type]


class PrefixCache:
    """In-memory LRU of PrefixStates keyed by (model fingerprint, data key, precision, layer).

    A request for layer l' is served from a cached lower layer l of the same data by running layers
    l..l'-1 only.
    """

    def __init__(self, max_entries: int = 2) -> None:
        self.max_entries = max_entries
        self._store: OrderedDict[tuple, PrefixStates] = OrderedDict()

    def get(self, lm: LoadedModel, enc, layer: int, precision: ResolvedPrecision,
            batch_size: int = 16, progress: bool = False, packed: bool = False) -> PrefixStates:
        precision = require_resolved(precision, "prefix")
        key = (lm.fingerprint, enc.key, precision.key, bool(packed), int(layer))
        if key in self._store:
            self._store.move_to_end(key)
            return self._store[key]
        below = [k for k in self._store if k[:4] == key[:4] and k[4] < layer]
        start = self._store[max(below, key=lambda k: k[4])] if below else None
        states = collect_states(lm, enc, layer, precision, batch_size, start, progress, packed)
        self._store[key] = states
        while len(self._store) > self.max_entries:
            self._store.popitem(last=False)
        return states

    def clear(self) -> None:
        self._store.clear()


PREFIX_CACHE = PrefixCache()


__all__ = ["PrefixStates", "PrefixCache", "PREFIX_CACHE", "collect_states",
           # the surgery, re-exported from models/surgery.py
           "PREFIX_FAMILIES", "capture_input", "checkpointed_layers", "prefix_supported", "run_from_layer"]
