"""Causal tracing at layer level (ROME's representation denoising, Meng et al. 2022).

For one fact (a prompt whose next token starts the true object):
  clean run      the prompt as is; every layer's hidden state, MLP output and attention output are kept;
  corrupted run  Gaussian noise (std = noise_scale x the embedding std, seeded) added to the embeddings
                 of the subject's tokens;
  restored run   the corrupted run with one clean state put back at one token position:
                   "hidden": the output of layer l (the residual stream after layer l);
                   "mlp":    the MLP output of the layers in a window of w around l;
                   "attn":   the attention output (o_proj's output) of the layers in that window.
Tracing effect(l), `measure`:
  diff      (default, the original) p(true object's first token | restored at l, last subject token)
            - p(... | corrupted), each averaged over the noise samples;
  fraction  (Hase et al.'s variable) the MAX over token positions t of the fraction restored,
            max(0, (p_restored(l, t) - p_corrupt) / |p_clean - p_corrupt|) (NaN where the corruption
            changes nothing).
Noise unit, `noise_from`: "embedding" (default, the original: std of the whole embedding matrix) or
"subject" (ROME's: std of the embeddings of the traced facts' subject tokens). `clean_pos0`: position 0
(the attention sink) is never noised (a subject starting there loses its first token from the noise).
`corruption: str` (symmetric token replacement) replaces the subject's tokens by another traced fact's subject
of as many tokens at the same place (one replacement per sample, `str_replacements`) instead of adding noise: an
in-distribution corrupted run. `compare` lists other settings (noise scales, str, position 0) that a Hase study
traces too and reports beside the main variable.
Split-half reliability: the noise samples' two halves are two independent draws (two seeds in effect), so
every fact also gets its tracing curve from each half (`halves`) at no extra cost; `split_half_reliability`
correlates them over (fact, layer) and applies Spearman-Brown (localize/tracing_summary.py, with ROME's
token-category heatmaps; both importable from here too). Every (noise sample, restored layer) variant of a fact
is one row of a batched forward pass (rows = samples x (layers + 1); `max_rows` per pass); the (layer x
position) grid for ROME's heatmaps is the same computation with one row per (sample, layer, position).

Shared computation (`method="shared"`, the default; exact, checked against `method="full"` in
tests/unit/test_tracing_shared.py). A restored row equals the corrupted run wherever the restoration cannot
reach yet, so that part is computed once per noise sample instead of once per row:
  layers   below the first restored layer s, a row's states are the corrupted run's. The corrupted run
           (one row per noise sample) keeps the residual stream entering every layer, and each variant runs
           only layers s.. from those states (models/surgery.py `run_from_layer`, as the frozen prefix of
           training does), batched over the variants that share s;
  positions  with causal attention, restoring at position t leaves positions < t equal to the corrupted
           run at every layer, so a batch of variants runs only from the first position any of them restores
           on, on top of a KV cache of the corrupted run's positions before it (as models/prefix_cache.py
           continues a shared prompt). The variants that share s form two batches: those restoring the last
           position (one token each) and the others (the subject's tokens, from the first of them). One batch
           per (s, position) would cut more FLOPs, but its 10-row matmuls run far below a CPU's GEMM peak
           (measured slower than no position sharing; benchmarks/bench_tracing.py). Used where the model's
           cache is a plain dynamic cache holding every position at every layer (else all positions run);
  no-ops   restoring a position before the first noised one (before the subject, or position 0 under
           `clean_pos0`) puts back what is already there: such a variant IS the corrupted run. At fp32 only:
           the clean states come from an fp32 run, so under bf16 / fp16 autocast restoring them is not a no-op.
Families whose card lacks `prefix=True` (models/sites.py) run the full forward per row.

Noise enters at the ``embed`` site (the embedding module's output; models/interventions.py), and clean
states are restored at the ``resid_post`` / ``mlp_out`` / ``attn_out`` sites.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar, Iterator, Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from locaudit.errors import ConfigError
from locaudit.io import key_dump
from locaudit.localize.tracing_summary import CATEGORIES, category_heatmap  # noqa: F401  (re-exported)
from locaudit.localize.tracing_summary import split_half_reliability, token_categories  # noqa: F401  (re-exported)
from locaudit.models.interventions import as_3d, capture, site_hooks
from locaudit.models.precision import ResolvedPrecision, require_resolved
from locaudit.models.surgery import prefix_supported, run_from_layer

KINDS = ("hidden", "mlp", "attn")


class TraceConfig(BaseModel):
    """How causal tracing corrupts and restores."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # every number is finite
    noise_scale: float = Field(3.0, gt=0, le=1e3, description="noise std as a multiple of the embedding std (ROME: 3; "
                               "at most 1000)")
    n_noise: int = Field(10, ge=1, description="noise samples per fact, batched (ROME: 10)")
    kinds: list[str] = Field(default_factory=lambda: ["hidden", "mlp", "attn"],
                             description="what is restored: hidden (layer output), mlp / attn (window of layers)")
    window: int | None = Field(None, ge=1, description="window of layers for mlp/attn restoration; "
                                                       "None = ROME's 10 of GPT-2 XL's 48 layers, scaled to the depth")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the noise (per fact: seed and fact index; 32-bit: "
                      "torch seeds are seed * 1_000_003 + fact)")
    grid_facts: int = Field(0, ge=0, description="facts (the first ones) also traced at every (layer, position) "
                                                 "for ROME's heatmap (costs layers x positions rows per fact)")
    max_rows: int = Field(256, ge=1, description="largest batch of restored variants in one forward pass")
    measure: Literal["diff", "fraction"] = Field("diff", description="diff: p(restored) - p(corrupt) at the last "
                                                 "subject token; fraction: Hase's max over positions of "
                                                 "max(0, restored / |p_clean - p_corrupt|)")
    noise_from: Literal["embedding", "subject"] = Field("embedding", description="noise std unit: the whole "
                                                        "embedding matrix, or the traced facts' subject tokens (ROME)")
    clean_pos0: bool = Field(False, description="never noise position 0 (the attention sink)")
    fraction_positions: Literal["all", "subject_and_last"] = Field(
        "all", description="fraction: the positions the max runs over: every token (Hase), or the subject's tokens "
                           "and the last token (where ROME's effects sit; about 3x cheaper on known_1000 prompts)")
    corruption: Literal["noise", "str"] = Field(
        "noise", description="noise: Gaussian noise on the subject's embeddings (ROME); str: symmetric token "
                             "replacement, the subject's tokens replaced by another traced fact's subject of as many "
                             "tokens (one per sample; noise_scale and noise_from unused)")
    compare: list[dict] = Field(
        [], description="other tracing settings traced as well, each a set of this section's fields that replace "
                        "its own (e.g. {noise_scale: 1.5}, {corruption: str}, {clean_pos0: false}); a Hase study "
                        "reports each one's reliability and R^2 beside the main variable's (costs a tracing each)")

    # added after studies were traced: left out of a trial's key at their defaults (which are the old behaviour)
    NEW_FIELDS: ClassVar[tuple[str, ...]] = ("measure", "noise_from", "clean_pos0", "fraction_positions", "corruption",
                                             "compare")

    @model_validator(mode="after")
    def _check_compare(self) -> "TraceConfig":
        for i, v in enumerate(self.compare):
            bad = [k for k in v if k not in type(self).model_fields or k in ("compare", "grid_facts", "max_rows")]
            if bad or not v:
                raise ValueError(f"compare[{i}]: {bad or 'nothing'} is not a tracing setting to compare (any field "
                                 "but compare, grid_facts and max_rows)")
            self.variant(i)
        return self

    def variant(self, i: int) -> "TraceConfig":
        """The settings of compare[i]: this config with its fields replaced (no grid, no further compare)."""
        return TraceConfig.model_validate({**self.model_dump(), **self.compare[i], "compare": [], "grid_facts": 0})

    def key_dump(self) -> dict:
        return key_dump(self, self.NEW_FIELDS)

    def window_for(self, n_layers: int) -> int:
        return int(self.window) if self.window else max(1, round(10 * n_layers / 48))


def window_layers(layer: int, window: int, n_layers: int) -> list[int]:
    """ROME's window around `layer`: [layer - w//2, layer + ceil(w/2)) clipped to the model."""
    return list(range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2))))


def embedding_std(lm) -> float:
    """Std of the token embedding matrix's entries (the noise unit)."""
    w = lm.sites.embed().weight
    return float(w.detach().float().std())


def subject_embedding_std(lm, facts) -> float:
    """Std of the entries of the embeddings of the facts' subject tokens (as tokenised inside each prompt;
    ROME's noise unit). `facts`: objects with .prompt and .subject."""
    from locaudit.data.facts import subject_token_span

    w = lm.sites.embed().weight.detach().float()
    ids = []
    for f in facts:
        s0, s1 = subject_token_span(lm.tokenizer, f.prompt, f.subject)
        ids += list(lm.tokenizer(f.prompt)["input_ids"][s0:s1])
    if not ids:
        raise ConfigError("noise_from: subject needs at least one fact with subject tokens")
    return float(w[torch.tensor(ids)].std())


@dataclass
class TracedFact:
    """Tracing of one fact. effects[kind]: Float[n_layers] (restored - corrupted); probabilities too."""

    p_clean: float
    p_corrupt: float
    effects: dict[str, list[float]]
    subject: tuple[int, int]
    n_tokens: int
    noise_top: int = -1  # the most likely next token under corruption (the "tracing reversal" target)
    grid: dict[str, list[list[float]]] = field(default_factory=dict)  # kind -> [layer][position] effects
    halves: dict[str, list[list[float]]] = field(default_factory=dict)  # kind -> [half A curve, half B curve]
    pos0_noised: bool = False  # the noise touched position 0 (the subject starts there and clean_pos0 is off)


# the intervention site (models/interventions.py) each kind restores
_SITE = {"hidden": "resid_post", "mlp": "mlp_out", "attn": "attn_out"}


def _site(kind: str) -> str:
    if kind not in _SITE:
        raise ConfigError(f"tracing kind {kind!r} is not one of {KINDS}")
    return _SITE[kind]


def _last_only(lm) -> dict:
    """Ask for the last position's logits only where the model supports it (prompts here are unpadded)."""
    from locaudit.models.scoring import accepts_logits_to_keep

    return {"logits_to_keep": 1} if accepts_logits_to_keep(lm.model) else {}


@torch.no_grad()
def _clean_states(lm, ids: torch.Tensor, kinds: Sequence[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Clean run of one prompt: {kind: Float[L, T, d]} and the last position's probabilities Float[V]."""
    L = lm.sites.n_layers
    states: dict[str, list] = {k: [None] * L for k in kinds}

    def grab(k: str, l: int):
        def fn(x: torch.Tensor) -> None:
            states[k][l] = as_3d(x, 1)[0].detach()  # OPT's MLP runs on (batch * pos, d)
        return fn

    with site_hooks(lm.sites, {(_site(k), l): grab(k, l) for k in kinds for l in range(L)}):
        logits = lm.model(input_ids=ids, use_cache=False, **_last_only(lm)).logits
    return {k: torch.stack(v) for k, v in states.items()}, logits[0, -1].float().softmax(-1)


@torch.no_grad()
def _run_rows(lm, ids: torch.Tensor, noise: torch.Tensor, subj: tuple[int, int], kind: str,
              restore: list[tuple[list[int], int]], clean: torch.Tensor, precision: ResolvedPrecision) -> torch.Tensor:
    """One batched forward: row r has noise[r] on the subject and clean `kind` states restored at the
    layers restore[r][0] and position restore[r][1] (empty layers: corrupted only). Returns Float[R, V]."""
    R = len(restore)
    x = ids.expand(R, -1)
    s0, s1 = subj

    def embed_noise(o: torch.Tensor) -> torch.Tensor:
        o = o.clone()
        o[:, s0:s1] += noise.to(o.dtype)
        return o

    fns = {("embed", 0): embed_noise, **_restore_fns(kind, restore, clean)}
    with site_hooks(lm.sites, fns), require_resolved(precision, "tracing").autocast(lm.dtype):
        logits = lm.model(input_ids=x, use_cache=False, **_last_only(lm)).logits
    return logits[:, -1].float().softmax(-1)


def _restore_fns(kind: str, restore: list[tuple[list[int], int]], clean: torch.Tensor, offset: int = 0) -> dict:
    """Hooks putting clean[l, pos] back at (layer l, row r, position pos - offset) for every restore[r]."""
    rows_at: dict[int, tuple[list[int], list[int]]] = {}
    for r, (layers, pos) in enumerate(restore):
        for l in layers:
            rows_at.setdefault(l, ([], []))
            rows_at[l][0].append(r)
            rows_at[l][1].append(pos)

    def restore_at(l: int, ri: torch.Tensor, pi: torch.Tensor):
        def fn(x: torch.Tensor) -> torch.Tensor:
            t = as_3d(x, len(restore)).clone()  # OPT's MLP runs on (batch * pos, d)
            t[ri, pi - offset] = clean[l, pi].to(t.dtype)
            return t.view(x.shape)
        return fn

    return {(_site(kind), l): restore_at(l, torch.tensor(rows), torch.tensor(pos)) for l, (rows, pos) in rows_at.items()}


@dataclass
class _Corrupted:
    """The corrupted run of one fact, one row per noise sample: pre[l] Float[n, T, d], the residual stream
    entering layer l (as the layer receives it); probs Float[n, V] at the last position; cache: its KV cache
    where every layer holds every position (else None)."""

    pre: list[torch.Tensor]
    probs: torch.Tensor
    cache: object | None


def _whole_dynamic_cache(cache, T: int) -> bool:
    from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

    return (type(cache) is DynamicCache and len(cache.layers) > 0
            and all(type(c) in (DynamicLayer, DynamicSlidingWindowLayer) and c.keys is not None
                    and c.keys.shape[-2] == T for c in cache.layers))


@torch.no_grad()
def _corrupted_run(lm, ids: torch.Tensor, noise: torch.Tensor, subj: tuple[int, int], precision: ResolvedPrecision,
                   share_positions: bool) -> _Corrupted:
    from locaudit.models.prefix_cache import cache_kwarg

    n, L, T = noise.shape[0], lm.sites.n_layers, ids.shape[1]
    s0, s1 = subj

    def embed_noise(o: torch.Tensor) -> torch.Tensor:
        o = o.clone()
        o[:, s0:s1] += noise.to(o.dtype)
        return o

    with site_hooks(lm.sites, {("embed", 0): embed_noise}), capture(lm.sites, "resid_pre", range(L)) as cap, \
            require_resolved(precision, "tracing").autocast(lm.dtype):
        out = cap.forward(lm.model, ids.expand(n, -1), None, use_cache=share_positions, **_last_only(lm))
        pre = [cap.values[l] for l in range(L)]
    cache = None
    if share_positions:
        cache = out[cache_kwarg(lm.model)] if cache_kwarg(lm.model) in out else out.past_key_values
        cache = cache if _whole_dynamic_cache(cache, T) else None
    return _Corrupted(pre, out.logits[:, -1].float().softmax(-1), cache)


def _past(lm, cache, samples: torch.Tensor, t: int):
    """A fresh dynamic cache holding the corrupted run's keys/values of positions < t at every layer, row r from
    noise sample samples[r]."""
    from transformers import DynamicCache

    past = DynamicCache(config=lm.model.config)
    for l, c in enumerate(cache.layers):
        past.update(c.keys[samples, :, :t], c.values[samples, :, :t], l)
    return past


@contextmanager
def _from_layer(lm, start: int) -> Iterator[dict]:
    """Run layers start.. on the states put in feed["h"] (models/surgery.py; at 0 the states replace layer 0's
    input, the embeddings' path then computing nothing that is kept)."""
    if start > 0:
        with run_from_layer(lm, start) as feed:
            yield feed
        return
    feed: dict = {}
    with site_hooks(lm.sites, {("resid_pre", 0): lambda cur: feed["h"].to(cur.dtype)}):
        yield feed


@torch.no_grad()
def _run_shared(lm, ids: torch.Tensor, corrupted: _Corrupted, kind: str, start: int, t: int, samples: torch.Tensor,
                restore: list[tuple[list[int], int]], clean: torch.Tensor, precision: ResolvedPrecision) -> torch.Tensor:
    """Rows r = restore[r] under noise sample samples[r], computed from layer `start` and position `t` on (the
    corrupted run's states below both). Every restored layer is >= start and every position >= t. Float[R, V]."""
    from locaudit.models.prefix_cache import cache_kwarg

    R = len(restore)
    extra = {}
    if t > 0:
        extra = {cache_kwarg(lm.model): _past(lm, corrupted.cache, samples, t), "use_cache": True}
    else:
        extra = {"use_cache": False}
    h = corrupted.pre[start][samples, t:]
    with _from_layer(lm, start) as feed, site_hooks(lm.sites, _restore_fns(kind, restore, clean, t)), \
            require_resolved(precision, "tracing").autocast(lm.dtype):
        feed["h"] = h
        logits = lm.model(input_ids=ids[:, t:].expand(R, -1), **extra, **_last_only(lm)).logits
    return logits[:, -1].float().softmax(-1)


def _noise(cfg: TraceConfig, fact_index: int, n: int, n_subj: int, d: int, scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(cfg.seed) * 1_000_003 + int(fact_index))
    return torch.randn(n, n_subj, d, generator=g) * scale


def trace_fact(lm, prompt: str, subject: str, target: str, cfg: TraceConfig | None = None, fact_index: int = 0,
               layers: Sequence[int] | None = None, grid: bool = False, *, precision: ResolvedPrecision,
               noise_std: float | None = None, method: Literal["shared", "full"] = "shared",
               share_positions: bool = True, replacements: Sequence[Sequence[int]] | None = None) -> TracedFact:
    """Trace one fact at every layer in `layers` (default all) for every kind of `cfg.kinds`.

    With `grid`, also the (layer x position) effects of every kind (one row per sample, layer, position).
    `method`: "shared" computes each row only above its first restored layer and from its restored position
    on (module docstring; `share_positions=False` keeps every position); "full" runs every row through the
    whole model (the reference). Both give the same numbers up to floating-point rounding.
    `replacements` (corruption "str"): per noise sample, the token ids replacing the subject's (as many); the
    corrupted run adds embed(replacement) - embed(subject) at the subject's positions, which is the run on the
    replaced tokens. Empty: no same-length replacement exists, and the fact's tracing is NaN.
    """
    # Long on purpose: one pass of causal tracing of a fact (clean run, corrupted runs, each kind's restored rows per
    # layer and position), kept whole so that its numerics stay as verified against the full-model reference.
    from locaudit.data.facts import object_ids, subject_token_span

    cfg = cfg or TraceConfig()
    tok = lm.tokenizer
    L = lm.sites.n_layers
    layers = list(range(L)) if layers is None else [int(l) for l in layers]
    ids = torch.tensor([tok(prompt)["input_ids"]], device=lm.device)
    T = ids.shape[1]
    subj = subject_token_span(tok, prompt, subject)
    answer = object_ids(tok, target)[0]
    w = cfg.window_for(L)
    clean, p_clean = _clean_states(lm, ids, cfg.kinds)
    n = cfg.n_noise
    if cfg.corruption == "str":
        if replacements is None:
            raise ConfigError("tracing corruption 'str' needs the replacement subjects (trace_facts draws them)")
        if not replacements:
            nan = [float("nan")] * L
            return TracedFact(float(p_clean[answer]), float("nan"), {k: list(nan) for k in cfg.kinds}, subj, T, -1,
                              {}, {}, False)
        noise = replacement_noise(lm, ids[0, subj[0]: subj[1]], replacements).to(lm.device)
        n = noise.shape[0]
    else:
        if noise_std is not None:
            std = noise_std
        elif cfg.noise_from == "subject":
            from types import SimpleNamespace

            std = subject_embedding_std(lm, [SimpleNamespace(prompt=prompt, subject=subject)])
        else:
            std = embedding_std(lm)
        noise = _noise(cfg, fact_index, n, subj[1] - subj[0], lm.sites.d_model, cfg.noise_scale * std).to(lm.device)
    if cfg.clean_pos0 and subj[0] == 0:
        noise[:, 0] = 0  # the attention sink stays clean
    pos0_noised = subj[0] == 0 and not cfg.clean_pos0
    last_subj = subj[1] - 1
    positions = (list(range(T)) if cfg.fraction_positions == "all"
                 else sorted(set(range(subj[0], subj[1])) | {T - 1}))
    h = n // 2  # the two halves of the noise samples (split-half reliability); none with 1 sample

    if method not in ("shared", "full"):
        raise ConfigError(f"tracing method {method!r} is not one of ('shared', 'full')")
    shared = method == "shared" and prefix_supported(lm)
    corrupted = _corrupted_run(lm, ids, noise, subj, precision, share_positions) if shared else None
    per = max(n, (cfg.max_rows // n) * n)  # rows per forward pass: whole noise-sample blocks
    # positions before it are never noised: the corrupted run is the clean one there, restoring them is a no-op
    # (at fp32 only: the clean states come from an fp32 run, so under bf16 / fp16 they differ by the rounding)
    first_noised = (subj[0] + 1 if cfg.clean_pos0 and subj[0] == 0 else subj[0]) if not precision.is_reduced else 0

    def run_shared(kind: str, variants: list[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """`run` from the corrupted run's states: variants grouped by (first restored layer, first position run)."""
        p = torch.empty(len(variants), n)
        groups: dict[tuple[int, bool], list[int]] = {}
        for j, (ls, pos) in enumerate(variants):
            if not ls or pos < first_noised:  # corrupted only, or restored where the corrupted run is clean
                p[j] = corrupted.probs[:, answer].cpu()
                continue
            groups.setdefault((min(ls), pos == T - 1), []).append(j)
        for (start, _), js in groups.items():
            for c in range(0, len(js), per // n):
                chunk = js[c: c + per // n]
                # every row of the chunk runs from its first restored position (the last position: one token)
                t = min(variants[j][1] for j in chunk) if corrupted.cache is not None else 0
                restore = [variants[j] for j in chunk for _ in range(n)]
                samples = torch.arange(n, device=lm.device).repeat(len(chunk))
                probs = _run_shared(lm, ids, corrupted, kind, start, t, samples, restore, clean[kind], precision)
                p[chunk] = probs[:, answer].cpu().view(len(chunk), n)
        return p, corrupted.probs.mean(0).cpu()

    def run(kind: str, variants: list[tuple[list[int], int]]) -> torch.Tensor:
        """Float[len(variants), n]: p(answer) of every variant under every noise sample."""
        if shared:
            return run_shared(kind, variants)
        restore = [v for v in variants for _ in range(n)]
        rows_noise = noise.repeat(len(variants), 1, 1)
        out, first = [], None
        for s in range(0, len(restore), per):
            probs = _run_rows(lm, ids, rows_noise[s: s + per], subj, kind, restore[s: s + per], clean[kind], precision)
            if first is None:
                first = probs[:n].mean(0).cpu()  # the first variant's mean distribution
            out.append(probs[:, answer].cpu())
        return torch.cat(out).view(len(variants), n), first

    def restored_layers(kind: str, l: int) -> list[int]:
        return [l] if kind == "hidden" else window_layers(l, w, L)

    pcl = float(p_clean[answer])

    def curve(p: torch.Tensor) -> list[float]:
        """The tracing variable per layer from p Float[1 + variants, samples] (row 0: corrupted only)."""
        pc = float(p[0].mean())
        eff = [float("nan")] * L
        if cfg.measure == "diff":
            for j, l in enumerate(layers):
                eff[l] = float(p[1 + j].mean()) - pc
            return eff
        den = abs(pcl - pc)
        m = p[1:].mean(1).view(len(layers), len(positions))
        for j, l in enumerate(layers):
            eff[l] = max(0.0, float(m[j].max()) - pc) / den if den > 1e-12 else float("nan")
        return eff

    effects, grids, halves = {}, {}, {}
    p_corrupt, noise_top = None, -1
    for kind in cfg.kinds:
        if cfg.measure == "diff":
            variants = [([], last_subj)] + [(restored_layers(kind, l), last_subj) for l in layers]
        else:
            variants = [([], last_subj)] + [(restored_layers(kind, l), t) for l in layers for t in positions]
        p, corrupt_dist = run(kind, variants)
        pc = float(p[0].mean())
        if p_corrupt is None:
            p_corrupt, noise_top = pc, int(corrupt_dist.argmax())
        effects[kind] = curve(p)
        if h >= 1:
            halves[kind] = [curve(p[:, :h]), curve(p[:, h: 2 * h])]
        if grid:
            gv = [(restored_layers(kind, l), t) for l in range(L) for t in range(T)]
            pg, _ = run(kind, gv)
            grids[kind] = (pg.mean(1) - pc).view(L, T).tolist()
    return TracedFact(pcl, float(p_corrupt), effects, subj, T, noise_top, grids, halves, pos0_noised)


@torch.no_grad()
def replacement_noise(lm, subject_ids: torch.Tensor, replacements: Sequence[Sequence[int]]) -> torch.Tensor:
    """Float[n, s, d]: embed(replacement) - embed(subject) per replacement (each as long as the subject), so that
    adding it at the ``embed`` site gives the run on the replaced tokens (position embeddings, added later by
    models that have them, are the same)."""
    emb = lm.sites.embed()
    s = int(subject_ids.numel())
    if any(len(r) != s for r in replacements):
        raise ConfigError(f"symmetric token replacement: every replacement must have the subject's {s} tokens")
    rep = torch.tensor([list(map(int, r)) for r in replacements], device=lm.device)
    base = emb(subject_ids.to(lm.device).view(1, -1)).float()
    return (emb(rep).float() - base).cpu()


def str_replacements(tokenizer, facts, n: int, seed: int) -> list[list[list[int]]]:
    """Per fact, `n` replacement subjects for symmetric token replacement (Zhang & Nanda 2024): the in-prompt token
    ids of other facts' subjects with as many tokens and the same place (at position 0 or not, so a leading space
    matches), different from the fact's own, drawn with replacement (seeded by seed and fact index). A fact with no
    such subject gets none (its tracing is NaN)."""
    import random

    from locaudit.data.facts import subject_token_span

    subj = []
    for f in facts:
        s0, s1 = subject_token_span(tokenizer, f.prompt, f.subject)
        subj.append((tuple(tokenizer(f.prompt)["input_ids"][s0:s1]), s0 == 0))
    out = []
    for i, (ids, at0) in enumerate(subj):
        pool = sorted({o for o, z in subj if len(o) == len(ids) and z == at0 and o != ids})
        r = random.Random(int(seed) * 1_000_003 + i)
        out.append([list(r.choice(pool)) for _ in range(n)] if pool else [])
    return out


def trace_facts(lm, facts, cfg: TraceConfig | None = None, layers: Sequence[int] | None = None,
                grid_facts: int | None = None, *, precision: ResolvedPrecision, progress: bool = True,
                method: Literal["shared", "full"] = "shared", only: Sequence[int] | None = None) -> list[TracedFact]:
    """Trace every fact (Fact objects); the first `grid_facts` (default cfg.grid_facts) also get the
    (layer x position) grid. `method`: as in `trace_fact`. `only`: trace these fact indices alone (the others are
    None in the list); noise, noise unit and replacements are those of the whole list."""
    cfg = cfg or TraceConfig()
    grid_facts = cfg.grid_facts if grid_facts is None else grid_facts
    reps = str_replacements(lm.tokenizer, facts, cfg.n_noise, cfg.seed) if cfg.corruption == "str" else None
    std = None
    if cfg.corruption == "noise":
        std = subject_embedding_std(lm, facts) if cfg.noise_from == "subject" else embedding_std(lm)
    keep = set(range(len(facts))) if only is None else set(only)
    out = []
    for i, f in enumerate(tqdm(facts, desc="causal tracing", disable=not progress)):
        out.append(trace_fact(lm, f.prompt, f.subject, f.target, cfg, i, layers, grid=i < grid_facts,
                              precision=precision, noise_std=std, method=method,
                              replacements=None if reps is None else reps[i]) if i in keep else None)
    return out
