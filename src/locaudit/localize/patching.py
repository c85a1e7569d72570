"""Activation patching per attention head, all heads batched, and `localize_heads`, the cached entry point.

For every selected pair and head h = (l, j) (the j-th slice of layer l's o_proj INPUT), the base run's
head output is replaced at the patched positions by the source run's value (another run's cached
output, or the head's dataset mean), and the change of the metric m is recorded (corruptions,
directions, positions and the sign convention: `localize/corruptions.py`). The effect of a head is the
mean over pairs, with its standard error (std over pairs / sqrt(n)).

Batching: the source run's head outputs are cached once per batch of pairs (one forward); then one
forward pass runs K stacked copies of the base batch, copy k patching head k, so all L*H heads of a
batch take ceil(L*H / K) forwards (K from `tokens_per_forward`), not L*H * pairs. Heads are taken in
layer order, and a forward whose patched heads all sit at layer l or above skips layers 0..l-1: their
outputs are the base run's (nothing below l is patched), cached once per batch and returned in place of
the layer's computation (`skipped_layers`), which halves the work of patching every head. Only
completion positions reach the LM head (`models.scoring.completion_logprobs`). meta["stability"]: the top-K's
stability between two disjoint halves of the pairs (localize/stability.py), from the per-pair effects.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from locaudit.errors import DataError
from locaudit.heads import Head, HeadSet
from locaudit.localize.corruptions import (EncodedRuns, PatchingConfig, batch_noise, embedding_std, encode_runs,
                                           patch_positions)
from locaudit.localize.effects import HeadEffects
from locaudit.localize.stability import record_stability
from locaudit.models.batching import length_sorted_batches
from locaudit.models.interventions import capture, head_mask, module_hooks, replace, site_hooks
from locaudit.models.precision import ResolvedPrecision, require_resolved
from locaudit.models.scoring import CompletionBatch, completion_logprobs
from locaudit.models.surgery import skipped_layers

log = logging.getLogger(__name__)
VERSION = 2  # 2: position 0 is no longer noised (PatchingConfig.noise_pos0 gives the old runs); meta["stability"]
METRIC_LABEL = "change of mean log p(chosen) - mean log p(rejected)"


# ---------------------------------------------------------------------------------------------- runs
def repeat_batch(batch: CompletionBatch, k: int) -> CompletionBatch:
    """The batch stacked k times along the batch axis (copy c = rows c*R .. (c+1)*R-1)."""
    if k == 1:
        return batch
    return CompletionBatch(*(t.repeat(k, *([1] * (t.dim() - 1))) for t in
                             (batch.input_ids, batch.attention_mask, batch.completion_mask, batch.prompt_lengths)))


def pair_metric(model, batch: CompletionBatch, copies: int = 1) -> torch.Tensor:
    """Float64[Tensor, "copies*B"]: m = mean log p(chosen) - mean log p(rejected) of each pair of a batch whose
    rows are `copies` stacked copies of [chosen of B pairs, rejected of B pairs]. Keeps the graph when grad
    is enabled."""
    s, n = completion_logprobs(model, batch)
    avg = s.double() / n.clamp(min=1).double()
    a = avg.view(copies, -1)
    B = a.shape[1] // 2
    return (a[:, :B] - a[:, B:]).reshape(-1)


@contextmanager
def embedding_hook(lm, noise: torch.Tensor | None, require_grad: bool = False) -> Iterator[None]:
    """Add Float[Tensor, "rows T d_model"] `noise` to the token embeddings (the ``embed`` site, tiled over
    stacked copies); with `require_grad`, the embeddings start an autograd graph even if no weight
    requires grad."""
    if noise is None and not require_grad:
        yield
        return

    def fn(out: torch.Tensor) -> torch.Tensor:
        if noise is not None:
            reps = out.shape[0] // noise.shape[0]
            out = out + noise.to(out.device, out.dtype).repeat(reps, 1, 1)
        if require_grad and not out.requires_grad:
            out = out.detach().requires_grad_(True)
        return out

    with site_hooks(lm.sites, {("embed", 0): fn}):
        yield


def capture_heads(lm, batch: CompletionBatch, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One no-grad forward: (m per pair Float64[B], per layer the o_proj input Float[Tensor, "2B T HD"])."""
    L = lm.sites.n_layers
    with torch.no_grad(), capture(lm.sites, "heads", range(L), dtype=torch.float32) as cap, \
            embedding_hook(lm, noise):
        cap.set_batch(batch=len(batch))
        m = pair_metric(lm.model, batch.to(lm.device))
    return m.cpu(), [cap.values[l] for l in range(L)]


def base_metric(lm, batch: CompletionBatch, noise: torch.Tensor | None) -> tuple[torch.Tensor, list]:
    """One no-grad forward of the base run: (m per pair Float64[B], every decoder layer's output as the
    layer returns it, for `skipped_layers`)."""
    outs: list = [None] * lm.sites.n_layers

    def keep(l):
        def fn(_inp, out) -> None:
            outs[l] = out
        return fn

    with torch.no_grad(), module_hooks(lm.sites, {("layer", l): keep(l) for l in range(lm.sites.n_layers)}), \
            embedding_hook(lm, noise):
        m = pair_metric(lm.model, batch.to(lm.device)).cpu()
    return m, outs


class PatchPlan:
    """Everything one localizer run needs: pairs, token ids, batches, noise level, which run is base."""

    def __init__(self, lm, pairs: Sequence, config: PatchingConfig) -> None:
        self.lm, self.config = lm, config
        self.runs: EncodedRuns = encode_runs(lm.tokenizer, pairs, config)
        self.direction = config.resolved_direction
        self.batches = length_sorted_batches(self.runs.lengths(), config.batch_pairs)
        self.sigma = embedding_std(lm, self.runs) if config.corruption == "noise" else None
        self.means: torch.Tensor | None = None  # Float[Tensor, "L HD"] for corruption 'mean'

    @property
    def n(self) -> int:
        return len(self.runs)

    def noise(self, batch: CompletionBatch, idx: Sequence[int]) -> torch.Tensor:
        c = self.config
        return batch_noise(batch, idx, self.lm.sites.d_model, c.noise_seed, c.noise_scale * float(self.sigma),
                           pos0=c.noise_pos0)

    def base_and_source(self, idx: Sequence[int]):
        """(base batch, base noise, source batch | None, source noise, source prompt lengths | None)."""
        c, runs = self.config, self.runs
        clean = runs.batch(idx)
        if c.corruption == "noise":
            noise = self.noise(clean, idx) if c.noise_scale > 0 else None
            if self.direction == "denoise":
                return clean, noise, clean, None, None
            return clean, None, clean, noise, None
        if c.corruption == "contrast":
            other = runs.batch(idx, contrast=True)
            if self.direction == "denoise":
                return other, None, clean, None, clean.prompt_lengths
            return clean, None, other, None, other.prompt_lengths
        return clean, None, None, None, None  # mean

    def compute_means(self, progress: bool = False) -> torch.Tensor:
        """Float[Tensor, "L HD"]: every head's mean output over the patched positions of the selected pairs."""
        if self.means is not None:
            return self.means
        L = self.lm.sites.n_layers
        total, count = None, 0
        for idx in tqdm(self.batches, desc="head means", disable=not progress, leave=False):
            clean = self.runs.batch(idx)
            _, acts = capture_heads(self.lm, clean)
            rows, tb, _ = patch_positions(clean, None, self.config.positions)
            s = torch.stack([acts[l][rows, tb].double().sum(0) for l in range(L)])
            total = s if total is None else total + s
            count += int(rows.numel())
        if not count:
            raise DataError("no positions to average over (empty pairs?)")
        self.means = (total / count).float()
        return self.means


def source_values(plan: PatchPlan, l: int, src_acts, rows, ts) -> torch.Tensor:
    """Float[Tensor, "P HD"]: the source value at the patched positions of layer l."""
    if src_acts is None:
        return plan.means[l].unsqueeze(0).expand(rows.numel(), -1)  # type: ignore[index]
    return src_acts[l][rows, ts]


# ---------------------------------------------------------------------------------------------- patching
def _heads_to_patch(config: PatchingConfig, L: int, H: int) -> list[Head]:
    if config.heads is None:
        return [(l, h) for l in range(L) for h in range(H)]
    hs = HeadSet.parse(config.heads, L, H).check(L, H)
    return list(hs.heads)


def activation_patching(lm, pairs: Sequence, config: PatchingConfig | None = None, *, precision: ResolvedPrecision,
                        progress: bool = True) -> HeadEffects:
    """Activation patching of every head (or `config.heads`) on `pairs` (PreferencePair list).

    Returns HeadEffects with effect/se [L, H] and per-pair effects [n, L, H] (NaN for heads not patched);
    meta records the mean metric of the clean, corrupted and base runs.
    """
    config = config or PatchingConfig()
    plan = PatchPlan(lm, pairs, config)
    sites = lm.sites
    L, H, D = sites.shape
    heads = _heads_to_patch(config, L, H)
    prec = require_resolved(precision, "patching")
    per = torch.full((plan.n, L, H), float("nan"), dtype=torch.float64)
    m_base_all = torch.zeros(plan.n, dtype=torch.float64)
    m_src_all = torch.zeros(plan.n, dtype=torch.float64)
    if config.corruption == "mean":
        with prec.autocast(lm.dtype):
            plan.compute_means(progress)
    sign = 1.0 if plan.direction == "denoise" else -1.0
    bar = tqdm(total=len(heads) * plan.n, desc="activation patching", unit="head*pair", disable=not progress,
               leave=False)
    try:
        with prec.autocast(lm.dtype):
            for idx in plan.batches:
                base, base_noise, src, src_noise, src_plen = plan.base_and_source(idx)
                B, R, T = len(idx), len(base), base.input_ids.shape[1]
                if src is not None:
                    m_src, src_acts = capture_heads(lm, src, src_noise)
                else:
                    m_src, src_acts = None, None
                m_base, layer_outs = base_metric(lm, base, base_noise)
                m_base_all[idx] = m_base
                m_src_all[idx] = m_src if m_src is not None else float("nan")
                rows, tb, ts = patch_positions(base, src_plen, config.positions)
                vals = {l: source_values(plan, l, src_acts, rows, ts).to(lm.device) for l in {l for l, _ in heads}}
                K = max(1, min(len(heads), config.tokens_per_forward // max(1, R * T)))
                for s in range(0, len(heads), K):
                    chunk = heads[s: s + K]
                    m = patched_metric(lm, base, base_noise, chunk, rows, tb, vals, layer_outs if config.skip_layers else None)
                    d = (m.view(len(chunk), B) - m_base.unsqueeze(0)) * sign
                    for c, (l, h) in enumerate(chunk):
                        per[idx, l, h] = d[c]
                    bar.update(len(chunk) * B)
    finally:
        bar.close()
    meta = run_meta(lm, plan, prec, "patching", m_base_all, m_src_all)
    meta["heads_patched"] = len(heads)
    record_stability(meta, per, config.top_k, config.rank_by, config.pair_seed)
    return HeadEffects.from_per_example(per, "patching", meta, keep=config.keep_per_example)


def patched_metric(lm, base: CompletionBatch, base_noise, chunk: Sequence[Head], rows: torch.Tensor,
                   tb: torch.Tensor, vals: dict[int, torch.Tensor], layer_outs: Sequence | None = None) -> torch.Tensor:
    """Float64[Tensor, "k*B"]: the metric of k stacked copies of `base`, copy c with head chunk[c] patched to
    `vals[l]` [P, HD] (sliced to that head) at (rows, tb). With the base run's `layer_outs`, the layers below
    the lowest patched one are not computed."""
    sites = lm.sites
    k, R, T = len(chunk), len(base), base.input_ids.shape[1]
    dev = lm.device
    rows_d, tb_d = rows.to(dev), tb.to(dev)
    at = torch.zeros(R, T, dtype=torch.bool, device=dev)  # the patched positions of one copy
    at[rows_d, tb_d] = True
    sources, masks = {}, {}
    for l in sorted({l for l, _ in chunk}):
        one = torch.zeros(R, T, vals[l].shape[-1], dtype=vals[l].dtype, device=dev)
        one[rows_d, tb_d] = vals[l].to(dev)
        sources[l] = one  # every copy's source; the mask picks copy c's head
        cols = head_mask(sites, [[h] if hl == l else [] for hl, h in chunk]).to(dev)  # Bool[k, HD]
        masks[l] = cols[:, None, None, :] & at[None, :, :, None]  # Bool[k, R, T, HD]
    with torch.no_grad(), replace(sites, "heads", sources, mask=masks, copies=k), embedding_hook(lm, base_noise), \
            skipped_layers(lm, min(sources), layer_outs, k):
        return pair_metric(lm.model, repeat_batch(base, k).to(dev), k).cpu()


def run_meta(lm, plan: PatchPlan, prec, method: str, m_base: torch.Tensor, m_src: torch.Tensor) -> dict:
    c = plan.config
    clean, corrupt = (m_src, m_base) if plan.direction == "denoise" else (m_base, m_src)
    return {
        "model": lm.name, "model_fingerprint": lm.fingerprint, "corruption": c.corruption, "direction": plan.direction,
        "positions": c.positions, "config": c.model_dump(), "n_pairs": plan.n, "rank_by": c.rank_by,
        "top_k": c.top_k, "metric": "mean log p(chosen) - mean log p(rejected)", "metric_label": METRIC_LABEL,
        "embedding_std": plan.sigma, "noise_std": None if plan.sigma is None else c.noise_scale * plan.sigma,
        "m_clean_mean": _nanmean(clean), "m_corrupt_mean": None if c.corruption == "mean" else _nanmean(corrupt),
        "n_layers": lm.sites.n_layers, "n_heads": lm.sites.n_heads, "head_dim": lm.sites.head_dim,
        "qids": [p.qid for p in plan.runs.pairs], **prec.meta(), "version": VERSION,
    }


def _nanmean(x: torch.Tensor) -> float | None:
    x = x[torch.isfinite(x)]
    return float(x.mean()) if x.numel() else None


# ---------------------------------------------------------------------------------------------- entry point
__all__ = ["activation_patching", "patched_metric", "capture_heads", "pair_metric", "repeat_batch", "embedding_hook"]
