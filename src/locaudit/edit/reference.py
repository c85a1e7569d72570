"""Reference log-probs of the frozen model, computed once per dataset and cached.

Key: model fingerprint + encoded pairs (content, format, max_length) + precision + log-prob function and
layout (one row per sequence, or packed pairs: edit/packed.py; the policy uses the same, so that an edit
at b = 0 reproduces the reference exactly). The cache lives in
memory and on disk (cache_dir("reference")/<key>.safetensors), so no epoch, trial or process pays for
the reference forward twice.
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from locaudit.edit.encoded import EncodedPairs
from locaudit.edit.logps import tiled_completion_logprobs
from locaudit.edit.objectives import PairLogps
from locaudit.edit.packed import pack_pairs, packed_lengths, packed_logprobs
from locaudit.io import atomic_path, cache_dir, stable_hash
from locaudit.models.loading import LoadedModel
from locaudit.models.precision import ResolvedPrecision, require_resolved
from locaudit.models.scoring import collate_completions, completion_logprobs

log = logging.getLogger(__name__)

_MEMORY: dict[str, PairLogps] = {}


def sequence_logps(lm: LoadedModel, enc: EncodedPairs, precision: ResolvedPrecision, batch_size: int = 8,
                   progress: bool = False, tiled: bool = False, packed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """No-grad summed completion log-probs and token counts of all 2N sequences (length-sorted batches);
    `tiled` uses edit.logps.tiled_completion_logprobs (same values, less memory); `packed` runs each pair
    as one packed row (batch_size // 2 pairs per forward)."""
    if packed:
        return _packed_logps(lm, enc, precision, batch_size, progress)
    fn = tiled_completion_logprobs if tiled else completion_logprobs
    seqs = enc.sequences()
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]) + len(seqs[i][1]))
    sums = torch.zeros(len(seqs))
    counts = torch.zeros(len(seqs), dtype=torch.long)
    dev = lm.device
    with torch.no_grad(), require_resolved(precision, "reference").compute(lm.model, lm.dtype):
        for s in tqdm(range(0, len(order), batch_size), desc="reference log-probs", disable=not progress,
                      leave=False):
            idx = order[s: s + batch_size]
            b = collate_completions([seqs[i] for i in idx], enc.pad_id).to(dev)
            lp, n = fn(lm.model, b)
            sums[idx] = lp.float().cpu()
            counts[idx] = n.cpu()
    return sums, counts


def _packed_logps(lm: LoadedModel, enc: EncodedPairs, precision: ResolvedPrecision, batch_size: int,
                  progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(enc)
    lens = packed_lengths(enc)
    order = sorted(range(n), key=lambda i: lens[i])
    per = max(1, batch_size // 2)
    sums = torch.zeros(2 * n)
    counts = torch.zeros(2 * n, dtype=torch.long)
    with torch.no_grad(), require_resolved(precision, "reference").compute(lm.model, lm.dtype):
        for s in tqdm(range(0, n, per), desc="reference log-probs", disable=not progress, leave=False):
            idx = order[s: s + per]
            lp, k = packed_logprobs(lm.model, pack_pairs(enc, idx, one_row=None).to(lm.device))
            rows = torch.tensor(idx + [n + i for i in idx])
            sums[rows] = lp.float().cpu()
            counts[rows] = k.cpu()
    return sums, counts


def reference_logps(lm: LoadedModel, enc: EncodedPairs, precision: ResolvedPrecision, batch_size: int = 8,
                    disk: bool = True, progress: bool = False, tiled: bool = False, packed: bool = False) -> PairLogps:
    """The frozen model's PairLogps of `enc`, from memory, disk, or one batched no-grad pass."""
    from safetensors.torch import load_file, save_file

    precision = require_resolved(precision, "reference")
    spec = {"model": lm.fingerprint, "data": enc.key, "precision": precision.key, "tiled": bool(tiled)}
    if packed:  # a key of its own; unpacked runs keep the keys they had
        spec["packed"] = True
    key = stable_hash(spec)
    if key in _MEMORY:
        return _MEMORY[key]
    path = cache_dir("reference") / f"{key}.safetensors" if disk else None
    if path is not None and path.exists():
        try:
            t = load_file(str(path))
            out = PairLogps(t["chosen"], t["rejected"], t["n_chosen"], t["n_rejected"])
            if out.chosen.shape[0] == len(enc):
                _MEMORY[key] = out
                return out
        except Exception as e:  # a corrupt cache file is recomputed, not fatal
            log.warning("ignoring unreadable reference cache %s (%s)", path, e)
    sums, counts = sequence_logps(lm, enc, precision, batch_size, progress, tiled, packed)
    n = len(enc)
    out = PairLogps(sums[:n].clone(), sums[n:].clone(), counts[:n].clone(), counts[n:].clone())
    if path is not None:
        with atomic_path(path) as tmp:
            save_file({"chosen": out.chosen, "rejected": out.rejected, "n_chosen": out.n_chosen,
                       "n_rejected": out.n_rejected}, str(tmp))
    _MEMORY[key] = out
    return out


def clear_memory() -> None:
    _MEMORY.clear()
