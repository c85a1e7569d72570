"""MC answer log-probs of many edits at once, sharing what the edits leave unchanged (evaluate/shared.py).

The per-edit path (models/scoring.score_completions_shared_prompt) runs, for one edit: the prefix common to
every prompt (ITI's instruction + QA primer) once, then per question the rest of its prompt on that KV
cache, then its answers together on the prompt's cache. Here the same three steps run once unedited (the
base pass), recording the states entering each edit's lowest layer L; each edit then runs layers L.. only,
on caches grafted from the base cache below L (evaluate/upper.py). An edit with L = n_layers (none, ITI at
alpha 0) takes the base pass's numbers; with L = 0 (a kind or family without the surgery) it runs in full.
Tokens, batches and caches are those of the per-edit path, so the numbers agree up to float rounding.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from locaudit.data.prompts import PromptFormat
from locaudit.data.types import MCItem
from locaudit.edit.base import Edit
from locaudit.evaluate.mc import MCResult
from locaudit.evaluate.upper import copy_cache, empty_cache, forward_from, graft
from locaudit.evaluate.view import as_edit
from locaudit.models.batching import pad_right
from locaudit.models.interventions import capture
from locaudit.models.loading import LoadedModel
from locaudit.models.precision import ResolvedPrecision
from locaudit.models.prefix_cache import MIN_PREFIX, cache_kwarg, common_prefix_len
from locaudit.models.scoring import completion_logprobs, collate_completions, encode_completions


class _Base:
    """The unedited pass: runs full-model steps, keeping the states entering `need` layers ([1 or B, T, d])."""

    def __init__(self, lm: LoadedModel, need: Sequence[int], logits: bool) -> None:
        self.lm, self.need, self.logits = lm, list(need), logits

    def step(self, ids: torch.Tensor, att: torch.Tensor, cache) -> tuple[torch.Tensor | None, dict]:
        """(logits or None where only states are needed, {layer: states}); `cache` is extended in place."""
        stop = not self.logits
        if not self.need:
            return forward_from(self.lm, 0, {}, ids, att, cache).logits, {}
        with capture(self.lm.sites, "resid_pre", self.need, "all", stop=stop) as cap:
            out = cap.forward(self.lm.model, ids, att, use_cache=True, **_kw(self.lm, cache))
            return (None if out is None else out.logits), dict(cap.values)


def _kw(lm: LoadedModel, cache) -> dict:
    return {cache_kwarg(lm.model): cache}


def primer_ids(prompts: Sequence[Sequence[int]]) -> list[int] | None:
    """The prefix that models/prefix_cache.shared_prefix would run once for these prompts, or None."""
    if len(prompts) < 2:
        return None
    n = min(common_prefix_len(prompts), min(len(s) for s in prompts) - 1)
    return list(prompts[0][:n]) if n >= MIN_PREFIX else None


def _answer_logp(first: torch.Tensor, logits: torch.Tensor | None, ids: torch.Tensor, mask: torch.Tensor
                 ) -> torch.Tensor:
    """Summed log-probs of right-padded answers `ids` [B, C]: the first token from `first` (the prompt's last
    logits [V]), the rest from `logits` [B, C-1, V] (as models/scoring._shared_prompt_logprobs)."""
    first_logp = F.log_softmax(first.float(), dim=-1)
    total = first_logp[ids[:, 0]].masked_fill(~mask[:, 0], 0.0)
    if logits is not None:
        lp = torch.gather(F.log_softmax(logits.float(), dim=-1), 2, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        total = total + lp.masked_fill(~mask[:, 1:], 0.0).sum(-1)
    return total.float()


def shared_answer_logprobs(lm: LoadedModel, edits: Sequence[Edit | None], layers: Sequence[int],
                           prompts: Sequence[str], completions: Sequence[str], max_length: int = 512,
                           add_special_tokens: bool = True, batch_size: int = 64) -> torch.Tensor:
    """Float[Tensor, "edit N"]: the summed log-prob of each completion after its prompt, per edit (edit e's
    lowest layer: layers[e], evaluate/upper.lowest_layer). Run inside `edited(lm, None, precision=...)`."""
    model, dev, n = lm.model, lm.device, lm.sites.n_layers
    tok = lm.tokenizer
    encoded = encode_completions(tok, prompts, completions, max_length, add_special_tokens)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (p, _) in enumerate(encoded):
        groups.setdefault(tuple(p), []).append(i)
    E = len(edits)
    sums = torch.zeros(E, len(encoded))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    need = sorted({L for L in layers if 0 < L < n})
    base = _Base(lm, need, logits=any(L >= n for L in layers))
    run_base = bool(need) or base.logits
    upper = [e for e in range(E) if layers[e] < n]  # edits that run (some of) the layers
    # the prefix common to every prompt: once unedited (states), once per edit from its lowest layer up
    prim = primer_ids([list(k) for k in groups if k]) if len(groups) > 1 else None
    prim_base, prim_edit = None, {}
    if prim is not None:
        x = torch.tensor([prim], dtype=torch.long, device=dev)
        att = torch.ones_like(x)
        prim_base = empty_cache(model)
        states = base.step(x, att, prim_base)[1] if run_base else {}
        for e in upper:
            c = empty_cache(model)
            with as_edit(edits[e]).applied(lm):
                forward_from(lm, layers[e], states, x, att, c)
            prim_edit[e] = graft(c, prim_base, layers[e])
    for p_ids, members in groups.items():
        if not p_ids:  # nothing to share (as the per-edit path): every edit scores these in full
            for e in range(E):
                with as_edit(edits[e]).applied(lm):
                    b = collate_completions([encoded[i] for i in members], pad).to(dev)
                    sums[e, members] = completion_logprobs(model, b)[0].float().cpu()
            continue
        P = len(p_ids)
        use_prim = prim is not None and len(prim) < P and list(p_ids[: len(prim)]) == prim
        rest = torch.tensor([list(p_ids[len(prim):] if use_prim else p_ids)], dtype=torch.long, device=dev)
        att = torch.ones(1, P, dtype=torch.long, device=dev)
        # the base pass: the prompt's rest, then every chunk of answers on a copy of its cache
        q_base = copy_cache(prim_base) if use_prim else empty_cache(model)
        p_logits, p_states = base.step(rest, att, q_base) if run_base else (None, {})
        chunks = []
        for s in range(0, len(members), batch_size):
            idx = members[s: s + batch_size]
            comps = [encoded[i][1] for i in idx]
            B, C = len(comps), max(len(c) for c in comps)
            ids, mask = pad_right(comps, pad)
            ids, mask = ids.to(dev), mask.bool().to(dev)
            a_att = torch.cat([torch.ones(B, P, dtype=torch.long, device=dev), mask.long()], dim=1)
            a_logits, a_states = None, {}
            if C > 1 and run_base:
                c = copy_cache(q_base)
                c.batch_repeat_interleave(B)
                a_logits, a_states = base.step(ids[:, :-1], a_att[:, :-1], c)
            chunks.append((idx, ids, mask, a_att, C, a_logits, a_states))
            if base.logits:
                for e in range(E):
                    if layers[e] >= n:
                        sums[e, idx] = _answer_logp(p_logits[0, -1], a_logits, ids, mask).cpu()
        # each edit from its lowest layer up, on caches grafted from the base pass
        for e in upper:
            L = layers[e]
            with as_edit(edits[e]).applied(lm):
                c = copy_cache(prim_edit[e]) if use_prim else empty_cache(model)
                q_logits = forward_from(lm, L, p_states, rest, att, c).logits
                c = graft(c, q_base, L)
                for idx, ids, mask, a_att, C, _, a_states in chunks:
                    logits = None
                    if C > 1:
                        ca = copy_cache(c)
                        ca.batch_repeat_interleave(len(idx))
                        logits = forward_from(lm, L, a_states, ids[:, :-1], a_att[:, :-1], ca).logits
                    sums[e, idx] = _answer_logp(q_logits[0, -1], logits, ids, mask).cpu()
    return sums


def shared_score_mc(lm: LoadedModel, edits: Sequence[Edit | None], items: Sequence[MCItem],
                    fmt: PromptFormat = PromptFormat("plain"), prefix: str = "", batch_size: int = 32,
                    max_length: int = 512, *, precision: ResolvedPrecision,
                    layers: Sequence[int] | None = None) -> list[MCResult]:
    """evaluate/mc.score_mc(lm, edit, items, fmt, prefix, batch_size, max_length) for every edit, together.
    `layers`: each edit's lowest layer (default evaluate/upper.lowest_layer)."""
    from locaudit.evaluate.mc import mc_answers, mc_result
    from locaudit.evaluate.upper import lowest_layer
    from locaudit.evaluate.view import edited
    from locaudit.models.batching import add_special_tokens_for

    layers = [lowest_layer(lm, e) for e in edits] if layers is None else list(layers)
    keys, qs, ans = mc_answers(items)
    if not qs:
        return [mc_result(items, keys, []) for _ in edits]
    tok = lm.tokenizer
    prompts = [prefix + fmt.prompt(q, tok) for q in qs]
    completions = [fmt.completion(a) for a in ans]
    special = add_special_tokens_for(fmt, tok, prompts[0])
    with edited(lm, None, precision=precision):
        sums = shared_answer_logprobs(lm, edits, layers, prompts, completions, max_length, special, batch_size)
    return [mc_result(items, keys, sums[e].double().tolist()) for e in range(len(edits))]


__all__ = ["shared_answer_logprobs", "shared_score_mc", "primer_ids"]
