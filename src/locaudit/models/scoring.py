"""Tokenize (prompt, completion) texts and score the completion's log-probability.

Shared by training (IPO/DPO reference and policy log-probs), MC scoring and held-out preferences, so
every part of locaudit counts completion tokens the same way, as the model reads them: a completion's
tokens are the tokens of `prompt + completion` after the prompt's own tokens (joint tokenization; prompt
tokens never count), batches are right-padded.

Why jointly: a SentencePiece tokenizer in legacy mode (Llama, Alpaca) tokenizes " yes" alone as
['▁▁', 'y', 'e', 's'] but as ['▁yes'] after "A:"; scoring the tokens the model never sees in that text
biases every log-prob. Fallback when a merge crosses the boundary (the prompt's tokens are not a prefix
of the joint tokens, e.g. a prompt ending in a space that the completion's first word absorbs): the joint
tokens are still used, the prompt part is their longest common prefix with the prompt's own tokens, and
the completion part is everything after it, so the straddling token counts to the completion (it holds
completion text); each such pair is counted in one warning. `joint_split` is the primitive.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from locaudit.models.batching import pad_right
from locaudit.models.prefix_cache import PrefixState, cache_kwarg, shared_prefix

log = logging.getLogger(__name__)


@dataclass
class CompletionBatch:
    """Right-padded token ids with a mask of the completion tokens."""

    input_ids: torch.Tensor  # Long[Tensor, "batch pos"]
    attention_mask: torch.Tensor  # Long[Tensor, "batch pos"]
    completion_mask: torch.Tensor  # Bool[Tensor, "batch pos"]: True where the token belongs to the completion
    prompt_lengths: torch.Tensor  # Long[Tensor, "batch"]

    def to(self, device) -> "CompletionBatch":
        return CompletionBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask,
                                                        self.completion_mask, self.prompt_lengths)))

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def _trailing_specials(tokenizer, add_special_tokens: bool) -> int:
    """How many special tokens the tokenizer appends after the text (e.g. an EOS with add_eos_token)."""
    if not add_special_tokens:
        return 0
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    n = 0
    while n < len(ids) and ids[len(ids) - 1 - n] in specials:
        n += 1
    return n if n < len(ids) else 0


def joint_split(prompt_ids: Sequence[int], joint_ids: Sequence[int]) -> tuple[list[int], list[int], bool]:
    """(prompt part, completion part, clean) of the joint ids of `prompt + completion`.

    clean: the prompt's own ids are a prefix of the joint ids, so the split is exact. Otherwise a merge
    crosses the boundary: the prompt part is the longest common prefix and the rest is the completion.
    """
    p, j = list(prompt_ids), list(joint_ids)
    if j[: len(p)] == p:
        return p, j[len(p):], True
    k = 0
    while k < min(len(p), len(j)) and p[k] == j[k]:
        k += 1
    return j[:k], j[k:], False


def encode_completions(
    tokenizer,
    prompts: Sequence[str],
    completions: Sequence[str],
    max_length: int = 512,
    add_special_tokens: bool = True,
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) of each pair, tokenized jointly: the completion's ids are the ids of
    `prompt + completion` after the prompt's ids (see the module doc for the boundary-merge fallback).

    A pair longer than `max_length` loses its prompt's start first, down to a quarter of `max_length`
    (so the question is never cut to nothing), then its completion's end; every cut is reported in one
    warning (count and examples)."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if not prompts:
        return []
    trail = _trailing_specials(tokenizer, add_special_tokens)
    distinct = list(dict.fromkeys(prompts))
    p_all = tokenizer(distinct, add_special_tokens=add_special_tokens)["input_ids"]
    p_of = {t: list(x[: len(x) - trail]) for t, x in zip(distinct, p_all)}
    j_all = tokenizer([p + c for p, c in zip(prompts, completions)], add_special_tokens=add_special_tokens)["input_ids"]
    floor = max(1, max_length // 4)
    out, cuts, merged = [], [], []
    for i, (prompt, joint) in enumerate(zip(prompts, j_all)):
        joint = list(joint[: len(joint) - trail])
        p, c, clean = joint_split(p_of[prompt], joint)
        if not clean:
            merged.append(i)
        lp, lc = len(p), len(c)
        if lp + lc > max_length:
            keep_p = min(lp, max(min(lp, floor), max_length - lc))
            keep_c = min(lc, max_length - keep_p)
            cuts.append((i, lp, lc, keep_p, keep_c))
            p, c = p[lp - keep_p:], c[:keep_c]
        out.append((p, c))
    if merged:
        ex = "; ".join(f"#{i} {str(prompts[i])[-20:]!r} + {str(completions[i])[:20]!r}" for i in merged[:3])
        log.warning("%d of %d (prompt, completion) pairs have a token merging the prompt's end with the "
                    "completion's start: that token counts to the completion (e.g. %s)", len(merged), len(out), ex)
    if cuts:
        n_p = sum(kp < lp for _, lp, _, kp, _ in cuts)
        n_c = sum(kc < lc for _, _, lc, _, kc in cuts)
        ex = "; ".join(f"#{i} {str(prompts[i])[:30]!r}: prompt {lp} + completion {lc} -> {kp} + {kc} tokens"
                       for i, lp, lc, kp, kc in cuts[:3])
        log.warning("%d of %d (prompt, completion) pairs exceed max_length=%d tokens: %d prompt(s) cut at the "
                    "start, %d completion(s) cut at the end (e.g. %s)", len(cuts), len(out), max_length, n_p, n_c, ex)
    return out


def encode_separately(
    tokenizer,
    prompts: Sequence[str],
    completions: Sequence[str],
    add_special_tokens: bool = True,
) -> list[tuple[list[int], list[int]]]:
    """The old, separate tokenization (prompt and completion each alone), kept for comparisons only."""
    p_ids = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
    c_ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    return [(list(p), list(c)) for p, c in zip(p_ids, c_ids)]


def collate_completions(encoded: Sequence[tuple[list[int], list[int]]], pad_id: int) -> CompletionBatch:
    """Right-pad encoded (prompt, completion) id lists into one batch."""
    ids, att = pad_right([list(p) + list(c) for p, c in encoded], pad_id)
    comp = torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, c) in enumerate(encoded):
        comp[i, len(p): len(p) + len(c)] = True
    plen = torch.tensor([len(p) for p, _ in encoded], dtype=torch.long)
    return CompletionBatch(ids, att, comp, plen)


def accepts_logits_to_keep(model) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def completion_logprobs(model, batch: CompletionBatch) -> tuple[Float[Tensor, "batch"], Int[Tensor, "batch"]]:
    """Sum of completion-token log-probs and number of completion tokens.

    Returns (Float[Tensor, "batch"] summed log p, Long[Tensor, "batch"] token counts). Gradients flow
    if the model has trainable parameters. Log-softmax runs in fp32 whatever the model's dtype.
    """
    ids, att, comp = batch.input_ids, batch.attention_mask, batch.completion_mask
    T = ids.shape[1]
    # only positions from the earliest completion start onwards need logits
    first = int(batch.prompt_lengths.min().item()) if len(batch) else 0
    keep = T - max(first - 1, 0)
    kwargs = {"logits_to_keep": keep} if accepts_logits_to_keep(model) and keep < T else {}
    logits = model(input_ids=ids, attention_mask=att, use_cache=False, **kwargs).logits
    start = T - logits.shape[1]  # logits[:, j] predicts token start + j + 1
    logits = logits[:, :-1].float()
    targets = ids[:, start + 1:]
    mask = comp[:, start + 1:]
    logp = torch.gather(F.log_softmax(logits, dim=-1), 2, targets.unsqueeze(-1)).squeeze(-1)
    logp = logp.masked_fill(~mask, 0.0)
    return logp.sum(-1), mask.sum(-1)


def score_completions(
    model,
    tokenizer,
    prompts: Sequence[str],
    completions: Sequence[str],
    batch_size: int = 16,
    max_length: int = 512,
    add_special_tokens: bool = True,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched, no-grad `completion_logprobs` over many texts (sorted by length to limit padding)."""
    device = device or next(model.parameters()).device
    encoded = encode_completions(tokenizer, prompts, completions, max_length, add_special_tokens)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]) + len(encoded[i][1]))
    sums = torch.zeros(len(encoded))
    counts = torch.zeros(len(encoded), dtype=torch.long)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            idx = order[s: s + batch_size]
            b = collate_completions([encoded[i] for i in idx], pad).to(device)
            lp, n = completion_logprobs(model, b)
            sums[idx] = lp.float().cpu()
            counts[idx] = n.cpu()
    return sums, counts


def score_completions_shared_prompt(
    model,
    tokenizer,
    prompts: Sequence[str],
    completions: Sequence[str],
    max_length: int = 512,
    add_special_tokens: bool = True,
    device: torch.device | str | None = None,
    batch_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`score_completions` for many completions per prompt: each distinct prompt runs once, and its
    completions run together on its KV cache (MC items: one question, many answers).

    Same tokens and log-probs as `score_completions` (up to float rounding: other matmul shapes); less
    compute whenever a prompt has several completions. Returns (Float[Tensor, "N"] summed log p,
    Long[Tensor, "N"] completion token counts). A completion's first token is scored from the prompt's
    last position, the rest from the completions' own forward pass.
    """
    device = device or next(model.parameters()).device
    encoded = encode_completions(tokenizer, prompts, completions, max_length, add_special_tokens)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (p, _) in enumerate(encoded):
        groups.setdefault(tuple(p), []).append(i)
    sums = torch.zeros(len(encoded))
    counts = torch.zeros(len(encoded), dtype=torch.long)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with torch.no_grad():
        # a prefix common to every prompt (ITI's instruction + QA primer) runs once (models/prefix_cache.py)
        state = shared_prefix(model, [list(k) for k in groups if k], device=device) if len(groups) > 1 else None
        for p_ids, members in groups.items():
            if not p_ids:  # nothing to share: score these the plain way
                b = collate_completions([encoded[i] for i in members], pad).to(device)
                lp, n = completion_logprobs(model, b)
                sums[members], counts[members] = lp.float().cpu(), n.cpu()
                continue
            for s in range(0, len(members), batch_size):
                idx = members[s: s + batch_size]
                comps = [encoded[i][1] for i in idx]
                lp, n = _shared_prompt_logprobs(model, list(p_ids), comps, pad, device, state)
                sums[idx], counts[idx] = lp.cpu(), n.cpu()
    return sums, counts


def _shared_prompt_logprobs(model, p_ids: list[int], comps: list[list[int]], pad: int, device,
                            state: PrefixState | None = None):
    """Summed log-probs of `comps` (each a token list) after one prompt, via the prompt's KV cache; with
    `state` (a prefix of the prompt already run), only the rest of the prompt runs, on a copy of its cache."""
    P, B = len(p_ids), len(comps)
    C = max((len(c) for c in comps), default=0)
    counts = torch.tensor([len(c) for c in comps], dtype=torch.long)
    if C == 0:
        return torch.zeros(B), counts
    if state is not None and len(state) < P and p_ids[: len(state)] == state.ids:
        rest = torch.tensor([p_ids[len(state):]], dtype=torch.long, device=device)
        out = model(input_ids=rest, attention_mask=torch.ones(1, P, dtype=torch.long, device=device), use_cache=True,
                    **{_cache_kwarg(model): state.cache_for(1)})
    else:
        prompt = torch.tensor([p_ids], dtype=torch.long, device=device)
        out = model(input_ids=prompt, attention_mask=torch.ones_like(prompt), use_cache=True)
    first_logp = F.log_softmax(out.logits[0, -1].float(), dim=-1)  # predicts every completion's first token
    cache = out["cache"] if "cache" in out else out.past_key_values  # transformers 5 names it `cache`
    if B > 1:
        cache.batch_repeat_interleave(B)
    ids, mask = pad_right(comps, pad)
    ids, mask = ids.to(device), mask.bool().to(device)
    att = torch.cat([torch.ones(B, P, dtype=torch.long, device=device), mask.long()], dim=1)
    total = first_logp[ids[:, 0]].masked_fill(~mask[:, 0], 0.0)
    if C > 1:
        kw = {_cache_kwarg(model): cache}
        logits = model(input_ids=ids[:, :-1], attention_mask=att[:, :-1], use_cache=True, **kw).logits.float()
        lp = torch.gather(F.log_softmax(logits, dim=-1), 2, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        total = total + lp.masked_fill(~mask[:, 1:], 0.0).sum(-1)
    return total.float(), counts


def _cache_kwarg(model) -> str:
    """The forward argument that takes a KV cache (models/prefix_cache.cache_kwarg)."""
    return cache_kwarg(model)