"""Tokenize (prompt, completion) texts and score the completion's log-probability.

Shared by training (IPO/DPO reference and policy log-probs), MC scoring and held-out preferences, so
every part of locaudit counts completion tokens the same way: the prompt and the completion are
tokenized separately and concatenated (prompt tokens never count), batches are right-padded.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F


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


def encode_completions(
    tokenizer,
    prompts: Sequence[str],
    completions: Sequence[str],
    max_length: int = 512,
    add_special_tokens: bool = True,
) -> list[tuple[list[int], list[int]]]:
    """Token ids of each prompt and completion, tokenized separately; the prompt is cut from the left
    if the pair exceeds `max_length` (the completion is kept whole where possible)."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    p_ids = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
    c_ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    out = []
    for p, c in zip(p_ids, c_ids):
        c = c[: max_length - 1]
        p = p[-(max_length - len(c)):]
        out.append((list(p), list(c)))
    return out


def collate_completions(encoded: Sequence[tuple[list[int], list[int]]], pad_id: int) -> CompletionBatch:
    """Right-pad encoded (prompt, completion) id lists into one batch."""
    T = max(len(p) + len(c) for p, c in encoded)
    B = len(encoded)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    att = torch.zeros((B, T), dtype=torch.long)
    comp = torch.zeros((B, T), dtype=torch.bool)
    plen = torch.zeros(B, dtype=torch.long)
    for i, (p, c) in enumerate(encoded):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(p + c, dtype=torch.long)
        att[i, :n] = 1
        comp[i, len(p):n] = True
        plen[i] = len(p)
    return CompletionBatch(ids, att, comp, plen)


def _accepts_logits_to_keep(model) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def completion_logprobs(model, batch: CompletionBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of completion-token log-probs and number of completion tokens.

    Returns (Float[Tensor, "batch"] summed log p, Long[Tensor, "batch"] token counts). Gradients flow
    if the model has trainable parameters. Log-softmax runs in fp32 whatever the model's dtype.
    """
    ids, att, comp = batch.input_ids, batch.attention_mask, batch.completion_mask
    T = ids.shape[1]
    # only positions from the earliest completion start onwards need logits
    first = int(batch.prompt_lengths.min().item()) if len(batch) else 0
    keep = T - max(first - 1, 0)
    kwargs = {"logits_to_keep": keep} if _accepts_logits_to_keep(model) and keep < T else {}
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
