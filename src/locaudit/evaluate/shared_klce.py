"""KL/CE of many edits at once (evaluate/shared.py): each batch of text runs once unedited up to the highest
lowest-edited-layer (advanced from one edit's lowest layer to the next, so only one layer's states are held),
and each edit runs from its own lowest layer up (evaluate/upper.py).

The numbers are those of evaluate/klce.kl_ce per edit: the same texts, batches (sorted by length), cached
original distributions (klce.original_cache), per-position KL and CE, and cluster-robust standard errors.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from locaudit.edit.base import Edit
from locaudit.evaluate.klce import KLCEResult, cluster_se, head_logits, original_cache
from locaudit.evaluate.upper import forward_from
from locaudit.evaluate.view import as_edit, edited
from locaudit.models.batching import pad_id, pad_right
from locaudit.models.interventions import StopForward, capture
from locaudit.models.loading import LoadedModel
from locaudit.models.precision import ResolvedPrecision


def _final(lm: LoadedModel, layer: int, states: dict, x: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
    """Float[B, T, d]: the states entering lm_head, running layers layer.. (stopped before lm_head)."""
    with capture(lm.sites, "final", [0], stop=True) as cap:
        cap.set_batch(att)
        try:
            forward_from(lm, layer, states, x, att)
        except StopForward:
            pass
        return cap.values[0]


def _kl_ce_rows(lm: LoadedModel, orig: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor, chunk: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL [P], CE [P]) in float64 per position, as klce.kl_ce (orig, hidden: Float[P, d]; targets: Long[P])."""
    kl = torch.empty(len(targets), dtype=torch.float64)
    ce = torch.empty(len(targets), dtype=torch.float64)
    for s in range(0, len(targets), chunk):
        sl = slice(s, s + chunk)
        logp = F.log_softmax(head_logits(lm.model, orig[sl].to(lm.device)), -1)
        logq = F.log_softmax(head_logits(lm.model, hidden[sl].to(lm.device)), -1)
        kl[sl] = (logp.exp() * (logp - logq)).sum(-1).double().cpu()
        ce[sl] = -logq.gather(1, targets[sl].to(lm.device)[:, None]).squeeze(1).double().cpu()
    return kl, ce


def _advance(lm: LoadedModel, layer: int, states: torch.Tensor | None, to: int, x: torch.Tensor,
             att: torch.Tensor) -> torch.Tensor:
    """Float[B, T, d]: the unedited states entering layer `to`, from those entering `layer` (0: from the input)."""
    with capture(lm.sites, "resid_pre", [to], "all", stop=True) as cap:
        cap.set_batch(att)
        try:
            forward_from(lm, layer, {layer: states}, x, att)
        except StopForward:
            pass
        return cap.values[to]


def _edited_hidden(lm: LoadedModel, edits, layers, todo: list[int], x, att, lengths, precision, budget: int,
                   base: dict) -> list[tuple[int, torch.Tensor]]:
    """Final hidden rows (Float[P, d], CPU) of edits taken from the front of `todo` (sorted by lowest layer)
    until `budget` floats are held. base = {"layer": L, "states": states entering L}: the unedited pass,
    advanced from one lowest layer to the next (each layer below the highest runs once per batch)."""
    out, size = [], 0
    with edited(lm, None, precision=precision):
        while todo and size < budget:
            e = todo.pop(0)
            L = layers[e]
            if L > base["layer"]:
                base["states"] = _advance(lm, base["layer"], base["states"], L, x, att)
                base["layer"] = L
            with as_edit(edits[e]).applied(lm):
                h = _final(lm, L, {L: base["states"]}, x, att)
            rows = torch.cat([h[j, : n - 1].float().cpu() for j, n in enumerate(lengths)])
            out.append((e, rows))
            size += rows.numel()
    return out


def shared_kl_ce(lm: LoadedModel, edits: Sequence[Edit | None], layers: Sequence[int], ids: Sequence[Sequence[int]],
                 batch_size: int = 16, *, precision: ResolvedPrecision, chunk: int = 256, disk_cache: bool = True,
                 progress: bool = False, budget: int = 2 ** 26) -> list[KLCEResult]:
    """klce.kl_ce(lm, edit, ids=ids) for every edit (edit e's lowest layer: layers[e]), in one pass per batch.

    KL and CE are computed outside the precision context, as kl_ce does; `budget`: the most final-hidden floats
    held between (per batch, edits are taken in groups that fit)."""
    n = lm.sites.n_layers
    orig = original_cache(lm, ids, batch_size, precision=precision, disk=disk_cache, progress=progress)
    targets = torch.cat([torch.tensor(list(x[1:])) for x in ids])
    E = len(edits)
    kl_pos = torch.empty(E, len(targets), dtype=torch.float64)
    ce_pos = torch.empty(E, len(targets), dtype=torch.float64)
    pad = pad_id(lm.tokenizer)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    off = orig.offsets
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        T = max(len(ids[i]) for i in idx)
        x, att = pad_right([ids[i] for i in idx], pad, length=T)
        x, att = x.to(lm.device), att.to(lm.device)
        rows = torch.cat([torch.arange(off[i], off[i + 1]) for i in idx])
        with torch.no_grad():
            for e in range(E):  # unchanged: the original model's own hidden states (KL exactly 0, as kl_ce)
                if layers[e] >= n:
                    kl_pos[e, rows], ce_pos[e, rows] = _kl_ce_rows(lm, orig.hidden[rows], orig.hidden[rows],
                                                                   targets[rows], chunk)
            todo = sorted((e for e in range(E) if layers[e] < n), key=lambda e: layers[e])
            base = {"layer": 0, "states": None}
            while todo:
                for e, hidden in _edited_hidden(lm, edits, layers, todo, x, att, [len(ids[i]) for i in idx],
                                                precision, budget, base):
                    kl_pos[e, rows], ce_pos[e, rows] = _kl_ce_rows(lm, orig.hidden[rows], hidden, targets[rows],
                                                                   chunk)
    counts = torch.tensor([off[i + 1] - off[i] for i in range(len(ids))], dtype=torch.float64)
    N = float(counts.sum())
    out = []
    for e in range(E):
        kl_sums = torch.stack([kl_pos[e, off[i]: off[i + 1]].sum() for i in range(len(ids))])
        ce_sums = torch.stack([ce_pos[e, off[i]: off[i + 1]].sum() for i in range(len(ids))])
        out.append(KLCEResult(float(kl_sums.sum() / N), cluster_se(kl_sums, counts), float(ce_sums.sum() / N),
                              cluster_se(ce_sums, counts), int(N), len(ids)))
    return out


__all__ = ["shared_kl_ce"]
