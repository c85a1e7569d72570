"""Clean and corrupted runs for causal localizers, and the positions where a head is patched.

A behaviour is a list of preference pairs (x, y+, y-). The metric of a run is the preference log-ratio

    m(x) = mean_t log p(y+_t | x, y+_<t) - mean_t log p(y-_t | x, y-_<t)

(per-token-averaged completion log-probs, prompt tokens never counted: `models.scoring`). Every pair is
run as two sequences, x+y+ and x+y-. A corruption gives, for each pair, a second run whose head outputs
differ from the clean run's:

Defaults (`PatchingConfig`): contrast corruption, patched at the completion positions, 48 pairs. Noising every
prompt token and restoring heads at every position (the former defaults) lets an early head win by putting token
identity back: restoring it at the noised positions undoes the corruption itself, so early layers can fill the
top-K (on SmolLM2 and TruthfulQA, the top-8 of both localizers sat in layers 0-2 under them). A contrast prompt shares the completions, so the patched head carries what differs in
the behaviour; the completion positions are where the metric is read.

(a) ``noise`` (ROME's causal tracing): the prompt's token embeddings e_t (0 < t < |x|, the output of the
    embedding module; position 0, the attention sink, stays clean unless `noise_pos0`) become
    e_t + s * sigma * eps_t with eps_t ~ N(0, I_d), s = `noise_scale` (3 by
    default) and sigma = the standard deviation of the embedding entries of the prompts' tokens (ROME's
    "3x the embedding std"). eps is drawn per pair from a generator seeded by (noise_seed, pair index),
    so it does not depend on batching, and the chosen and rejected sequences share it (same prompt).
    Completion tokens are not noised. Default direction: denoise (restore clean heads into the noised run).
(b) ``contrast``: a second prompt x' given by the data, scored with the same completions y+, y-:
    ``other_question`` (default) is the prompt of another pair (a seeded derangement of the selected
    pairs, never one with the same question text); ``swap_options`` swaps the texts of the options
    "(A) ..." and "(B) ..." inside an A/B prompt (CAA), so the behaviour-matching answer letter flips.
    Positions of x and x' are aligned from the prompt's end (the completion tokens are identical).
    Default direction: noise (patch the contrast run's head into the clean run).
(c) ``mean``: a head's output is replaced by its mean over the dataset: the average of o_h^l over every
    patched position (see `positions`) of every sequence of the selected pairs. Direction: noise only.

Directions, for a head h with clean value c_h and corrupted value k_h, and a base run b:
    denoise: base = corrupted run, effect_h = m(base with c_h) - m(base)
    noise:   base = clean run,     effect_h = m(base) - m(base with k_h)
so in both a positive effect means the head's clean value pushes m towards the clean behaviour.

Positions (in the base run; a sequence with prompt length P and completion length C):
``all`` = every token 0..P+C-1; ``prompt`` = 0..P-1; ``last`` = P-1 (the prompt's last token);
``completion`` = P-1..P+C-1 (the last prompt token, whose output predicts the first completion token,
and every completion token). A base position t maps to the source position t - P + P' (P' the source
run's prompt length); positions without a counterpart (a longer base prompt) are not patched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from locaudit.data.prompts import PromptFormat
from locaudit.data.types import PreferencePair
from locaudit.errors import ConfigError, DataError
from locaudit.models.scoring import CompletionBatch, collate_completions, encode_completions

Corruption = Literal["noise", "contrast", "mean"]
POSITIONS = ("all", "prompt", "last", "completion")


class PatchingConfig(BaseModel):
    """How a causal localizer (activation or attribution patching) runs; every field keys the cache."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # every number is finite

    corruption: Corruption = Field("contrast", description="How the corrupted run differs from the clean one: "
                                   "contrast (default: a contrast prompt from the data, so a head is credited for "
                                   "what differs between the prompts' behaviour, not for carrying token identity), "
                                   "noise (Gaussian noise on the prompt's token embeddings, ROME's causal tracing), "
                                   "mean (the head's dataset mean).")
    direction: Literal["auto", "denoise", "noise"] = Field(
        "auto", description="denoise: restore the clean head into the corrupted run; noise: put the corrupted "
        "head into the clean run. auto = denoise for noise, noise for contrast and mean.")
    noise_scale: float = Field(3.0, ge=0.0, le=1e3, description="Noise standard deviation in multiples of the "
                               "prompt tokens' embedding std (ROME: 3; at most 1000, as the CLI's --noise-scale).")
    noise_seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of the embedding noise (drawn per pair, "
                            "batch-independent; 32-bit: torch seeds are seed * 1_000_003 + pair).")
    noise_pos0: bool = Field(False, description="Noise: also noise position 0 (the attention sink; off: it stays "
                             "clean, so restoring an early head cannot win by putting the sink's token back).")
    contrast: Literal["other_question", "swap_options"] = Field(
        "other_question", description="Contrast prompt: another pair's prompt (seeded derangement), or the A/B "
        "prompt with the texts of options (A) and (B) swapped (CAA).")
    contrast_seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of the other_question derangement.")
    positions: Literal["all", "prompt", "last", "completion"] = Field(
        "completion", description="Token positions where a head is patched: completion (default: the last prompt "
        "token and every completion token, where the behaviour is read), last (the prompt's last token), prompt, "
        "or all.")
    max_pairs: int | None = Field(48, ge=1, description="Pairs of the split used (a seeded subset, one pair per "
                                  "question first); None = all.")
    pair_seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of the pair subset.")
    batch_pairs: int = Field(4, ge=1, description="Pairs per base batch (each pair is two sequences).")
    tokens_per_forward: int = Field(16384, ge=64, description="Activation patching stacks copies of a batch, one "
                                    "patched head per copy, up to about this many tokens per forward pass.")
    skip_layers: bool = Field(True, description="Activation patching: do not recompute the layers below the "
                              "lowest patched head (their outputs are the base run's); same numbers, less work.")
    heads: str | None = Field(None, description="Activation patching only these heads (a HeadSet string, "
                              "e.g. 'L0,L5H3'); others are NaN. None = every head.")
    rank_by: Literal["abs", "signed"] = Field("abs", description="Rank heads by |effect| (abs) or by the "
                                              "signed effect (signed: heads supporting the clean behaviour).")
    top_k: int = Field(16, ge=1, description="Heads outlined in the heatmap and taken by a study's top-K.")
    graddrop: bool = Field(False, description="Attribution only: also compute AtP*'s GradDrop score (L extra "
                           "backward passes), a check for cancellation across paths.")
    qk_fix: bool = Field(False, description="Attribution only: also score each head's query and key nodes with "
                         "AtP*'s QK fix (the node's effect through its own attention softmax computed exactly by "
                         "re-running that layer's attention, the rest linearised; about (H + KV heads) / copies "
                         "extra attention calls per layer), next to their plain AtP.")
    format: Literal["plain", "chat"] = Field("plain", description="Prompt format of the pairs.")
    max_length: int = Field(256, ge=8, description="Longest (prompt + completion) in tokens.")
    keep_per_example: bool = Field(True, description="Keep the per-pair effects [n, L, H] in the result.")

    # fields added after localize runs were cached: left out of model_dump() (so of the cache and study keys,
    # and meta["config"]) at the value that gives the earlier runs' results, so those keys hold
    OLD_BEHAVIOUR: ClassVar[dict[str, Any]] = {"qk_fix": False}

    def model_dump(self, **kwargs: Any) -> dict[str, Any]:
        """pydantic's model_dump without the fields of OLD_BEHAVIOUR at their old-behaviour values."""
        d = super().model_dump(**kwargs)
        for k, old in self.OLD_BEHAVIOUR.items():
            if k in d and d[k] == old:
                d.pop(k)
        return d

    @model_validator(mode="after")
    def _check(self) -> "PatchingConfig":
        if self.corruption == "mean" and self.direction == "denoise":
            raise ConfigError("corruption 'mean' supports direction 'noise' only (replace a head by its mean in "
                              "the clean run)")
        return self

    @property
    def resolved_direction(self) -> str:
        if self.direction != "auto":
            return self.direction
        return "denoise" if self.corruption == "noise" else "noise"


def add_special_tokens_for(fmt: PromptFormat, tokenizer, prompt: str) -> bool:
    """Add the tokenizer's special tokens unless a chat template already wrote its BOS into `prompt`."""
    bos = getattr(tokenizer, "bos_token", None)
    return not (fmt.kind == "chat" and bos and prompt.startswith(bos))


def select_pairs(pairs: Sequence[PreferencePair], max_pairs: int | None, seed: int = 0) -> list[PreferencePair]:
    """A seeded subset of at most `max_pairs` pairs: one pair per question first (seeded order), then a second
    pair per question, and so on, so a small subset covers as many questions as it can."""
    pairs = list(pairs)
    if not pairs:
        raise DataError("no preference pairs to localize on (the split is empty)")
    if max_pairs is None or max_pairs >= len(pairs):
        return pairs
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pairs))
    seen: dict[str, int] = {}
    keyed = []
    for i in order:
        q = pairs[int(i)].qid
        keyed.append((seen.get(q, 0), len(keyed), int(i)))
        seen[q] = seen.get(q, 0) + 1
    return [pairs[i] for _, _, i in sorted(keyed)[:max_pairs]]


_OPTION = re.compile(r"\(([AB])\)\s*([^\n]*)")


def swap_options(prompt: str) -> str:
    """The A/B prompt with the texts after "(A)" and "(B)" swapped (each option's first line)."""
    found = {m.group(1): m for m in _OPTION.finditer(prompt)}
    if set(found) != {"A", "B"}:
        raise DataError(f"contrast 'swap_options' needs a prompt with options '(A) ...' and '(B) ...'; got "
                        f"{prompt[:80]!r}")
    a, b = found["A"], found["B"]
    first, second = sorted((a, b), key=lambda m: m.start(2))
    text_a, text_b = a.group(2), b.group(2)
    swap = {a.start(2): text_b, b.start(2): text_a}
    out = prompt[: first.start(2)] + swap[first.start(2)] + prompt[first.end(2): second.start(2)]
    return out + swap[second.start(2)] + prompt[second.end(2):]


def contrast_questions(pairs: Sequence[PreferencePair], mode: str, seed: int = 0) -> list[str]:
    """The contrast question text of each pair (see the module docstring)."""
    if mode == "swap_options":
        return [swap_options(p.question) for p in pairs]
    if mode != "other_question":
        raise ConfigError(f"contrast {mode!r}: expected other_question or swap_options")
    n = len(pairs)
    texts = [p.question for p in pairs]
    if len(set(texts)) < 2:
        raise DataError("contrast 'other_question' needs pairs of at least two different questions")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    # a derangement by question text: pair i takes the prompt of pair perm[(j+s) mod n] for the first shift s
    # that gives a different question (a random cyclic-shift derangement of a random order)
    out = [""] * n
    pos = {int(v): j for j, v in enumerate(perm)}
    for i in range(n):
        j = pos[i]
        for s in range(1, n):
            cand = int(perm[(j + s) % n])
            if texts[cand] != texts[i]:
                out[i] = texts[cand]
                break
    return out


@dataclass
class EncodedRuns:
    """Token ids of the clean run and (for contrast) the contrast run of every selected pair.

    clean_chosen[i] / clean_rejected[i] = (prompt ids, completion ids); contrast_* likewise (None for
    noise and mean: same tokens as the clean run).
    """

    pairs: list[PreferencePair]
    clean_chosen: list[tuple[list[int], list[int]]]
    clean_rejected: list[tuple[list[int], list[int]]]
    contrast_chosen: list[tuple[list[int], list[int]]] | None
    contrast_rejected: list[tuple[list[int], list[int]]] | None
    pad_id: int

    def __len__(self) -> int:
        return len(self.pairs)

    def batch(self, idx: Sequence[int], contrast: bool = False) -> CompletionBatch:
        """Right-padded batch of 2B sequences: chosen of `idx`, then rejected of `idx`."""
        ch = self.contrast_chosen if contrast else self.clean_chosen
        rj = self.contrast_rejected if contrast else self.clean_rejected
        if ch is None or rj is None:
            raise ConfigError("this corruption has no contrast run")
        return collate_completions([ch[i] for i in idx] + [rj[i] for i in idx], self.pad_id)

    def lengths(self) -> list[int]:
        """Longest sequence of each pair (clean and contrast), for length-sorted batches."""
        seqs = [self.clean_chosen, self.clean_rejected] + ([self.contrast_chosen, self.contrast_rejected]
                                                            if self.contrast_chosen is not None else [])
        return [max(len(s[i][0]) + len(s[i][1]) for s in seqs) for i in range(len(self))]


def encode_runs(tokenizer, pairs: Sequence[PreferencePair], config: PatchingConfig) -> EncodedRuns:
    """Tokenize every pair's clean run (and contrast run) in the config's prompt format."""
    from locaudit.models.batching import pad_id

    pairs = list(pairs)
    fmt = PromptFormat(config.format)
    prompts = [fmt.prompt(p.question, tokenizer) for p in pairs]
    special = add_special_tokens_for(fmt, tokenizer, prompts[0])
    enc = lambda ps, answers: encode_completions(tokenizer, ps, answers, config.max_length, special)  # noqa: E731
    chosen_text = [fmt.completion(p.chosen) for p in pairs]
    rejected_text = [fmt.completion(p.rejected) for p in pairs]
    cc, cr = enc(prompts, chosen_text), enc(prompts, rejected_text)
    for i, (c, r) in enumerate(zip(cc, cr)):
        if not c[1] or not r[1]:
            raise DataError(f"pair {i} (qid {pairs[i].qid!r}): the {'chosen' if not c[1] else 'rejected'} answer "
                            "is empty after tokenization")
    xc = xr = None
    if config.corruption == "contrast":
        cq = contrast_questions(pairs, config.contrast, config.contrast_seed)
        cprompts = [fmt.prompt(q, tokenizer) for q in cq]
        xc, xr = enc(cprompts, chosen_text), enc(cprompts, rejected_text)
        for i in range(len(pairs)):
            if xc[i][1] != cc[i][1] or xr[i][1] != cr[i][1]:
                raise DataError(f"pair {i} (qid {pairs[i].qid!r}): the completion is cut differently after the "
                                f"contrast prompt (max_length={config.max_length}); raise max_length")
    return EncodedRuns(pairs, cc, cr, xc, xr, pad_id(tokenizer))


def patch_positions(base: CompletionBatch, source_prompt_lengths: torch.Tensor | None,
                    positions: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, t_base, t_source), each Long[P]: the patched positions of every sequence of `base` and the
    positions they take their value from in the source run (module docstring)."""
    if positions not in POSITIONS:
        raise ConfigError(f"positions {positions!r}: expected one of {POSITIONS}")
    plen = base.prompt_lengths.tolist()
    total = base.attention_mask.sum(1).tolist()
    splen = plen if source_prompt_lengths is None else source_prompt_lengths.tolist()
    rows, tb, ts = [], [], []
    for r, (P, T, Ps) in enumerate(zip(plen, total, splen)):
        lo, hi = {"all": (0, T), "prompt": (0, P), "last": (P - 1, P), "completion": (P - 1, T)}[positions]
        lo = max(lo, P - Ps)  # no counterpart before the source prompt's start
        for t in range(max(lo, 0), hi):
            rows.append(r)
            tb.append(t)
            ts.append(t - P + Ps)
    return (torch.tensor(rows, dtype=torch.long), torch.tensor(tb, dtype=torch.long),
            torch.tensor(ts, dtype=torch.long))


def prompt_noise(pair_index: int, n_tokens: int, d_model: int, seed: int) -> torch.Tensor:
    """Float[Tensor, "n_tokens d_model"]: N(0, 1) noise of one pair's prompt (seeded by seed and the pair)."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(pair_index))
    return torch.randn(n_tokens, d_model, generator=g)


def batch_noise(base: CompletionBatch, pair_idx: Sequence[int], d_model: int, seed: int, scale: float,
                pos0: bool = False) -> torch.Tensor:
    """Float[Tensor, "2B T d_model"]: `scale` * eps on the prompt tokens of every sequence (chosen rows then
    rejected rows of the pairs `pair_idx`), zero on completions and padding, and on position 0 unless `pos0`."""
    B = len(pair_idx)
    T = base.input_ids.shape[1]
    out = torch.zeros(2 * B, T, d_model)
    for j, i in enumerate(pair_idx):
        for r in (j, B + j):
            P = int(base.prompt_lengths[r])
            out[r, :P] = prompt_noise(i, P, d_model, seed) * scale
            if not pos0:
                out[r, 0] = 0.0
    return out


def embedding_std(lm, runs: EncodedRuns) -> float:
    """Standard deviation of the embedding entries of every prompt token of the selected pairs (ROME)."""
    ids = sorted({t for p, _ in runs.clean_chosen for t in p})
    emb = lm.sites.embed()
    with torch.no_grad():
        e = emb(torch.tensor(ids, dtype=torch.long, device=lm.device)).float()
    return float(e.std())


__all__ = ["PatchingConfig", "EncodedRuns", "encode_runs", "select_pairs", "contrast_questions", "swap_options",
           "patch_positions", "prompt_noise", "batch_noise", "embedding_std", "add_special_tokens_for", "POSITIONS"]
