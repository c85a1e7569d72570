"""Per-layer edits of facts (Hase et al. 2023): one edit per (fact, layer), at one weight of that layer.

Sites: the MLP output projection (`mlp_down`, as ROME / MEMIT; default) or the attention output projection
(`o_proj`). Methods:
  ft    constrained fine-tuning of the site's weight (Hase's FT baseline): dW trained on the NLL of the
        target object, projected after every step onto the L-inf ball ||dW||_inf <= norm_bound (ROME's
        FT-L constraint);
  lora  a rank-one update dW = b a^T trained on the NLL of the target object plus `kl_weight` x
        KL(p_orig || p_edit) of the next-token distribution on unrelated prompts (facts of other
        relations);
  rome  ROME's closed-form rank-one update of the MLP down-projection (edit/rome.py): stored, like lora,
        as dW = b a^T.

Speed: many facts are edited together (one edit per fact, each row of a batch carries its edit's index,
so E edits share every forward pass), and the hidden states entering layer l are computed once per group
and layer (the frozen prefix): training and scoring run layers >= l only.

Objectives per editing problem: error_injection / tracing_reversal / fact_amplification minimise the
token NLL of their target object (mean over its tokens, or summed with `nll: sum` as in Hase's FT-1);
fact_erasure minimises -log(1 - p(o_true)). Fact forcing trains on rows whose subject embeddings are noised
(EditRow.noise; the states of the frozen prefix carry the noise). With `early_stop`, an edit stops changing once
its loss is below that value (the others go on).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from locaudit.errors import ConfigError, DataError
from locaudit.io import key_dump
from locaudit.models.batching import pad_id, pad_right
from locaudit.models.interventions import module_hooks
from locaudit.models.precision import ResolvedPrecision, require_resolved

SITES = ("mlp_down", "o_proj")


class LayerEditConfig(BaseModel):
    """How one per-layer fact edit is trained."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # every number is finite
    method: Literal["ft", "lora", "rome", "memit"] = Field(
        "ft", description="ft: norm-bounded fine-tuning of the site weight; lora: rank-one update with a KL penalty; "
                          "rome: ROME's closed-form rank-one update; memit: MEMIT's update spread over a window of "
                          "layers (edit/memit.py)")
    site: Literal["mlp_down", "o_proj"] = Field("mlp_down", description="the edited weight of the layer")
    steps: int = Field(10, ge=1, description="optimisation steps per edit (full batch: each fact's prompt)")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    norm_bound: float = Field(2e-3, gt=0, description="ft: L-inf bound of the update of each weight entry")
    kl_weight: float = Field(1.0, ge=0, description="lora: weight of KL(p_orig || p_edit) on unrelated prompts")
    n_kl_prompts: int = Field(2, ge=0, description="lora: unrelated prompts per fact for the KL penalty")
    init_scale: float = Field(1e-2, gt=0, description="lora: std of the random init of a (b starts at 0)")
    batch_facts: int = Field(16, ge=1, description="facts edited together (they share forward passes)")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the lora init")
    nll: Literal["mean", "sum"] = Field("mean", description="target NLL per edit: mean over the object's tokens, "
                                                            "or summed (Hase's FT-1)")
    early_stop: float | None = Field(None, gt=0, description="an edit stops updating once its target loss is "
                                                             "below this (Hase's FT-1 / ROME: 1e-2); null = never")
    clamp_norm_factor: float = Field(4.0, gt=0, description="rome: ||v* - W k*|| at most this x ||W k*|| (ROME: 4)")
    v_weight_decay: float = Field(0.5, ge=0, description="rome: weight of ||v* - W k*||^2 / ||W k*||^2 in the "
                                                         "value objective (ROME: 0.5)")
    cov_ridge: float = Field(0.0, ge=0, description="rome: C + cov_ridge x mean(diag C) x I before inverting")
    cov_tokens: int | None = Field(None, ge=1, description="rome: tokens of generic text for C = E[k k^T] "
                                                           "(null = the whole text)")
    window: int = Field(5, ge=1, description="memit: layers edited for 'layer l', centred on l and clipped at the "
                                             "model's ends (Hase et al.: range(l - w//2, l + ceil(w/2)))")
    mom2_update_weight: float = Field(15000.0, ge=0, description="memit: lambda of (lambda C + K K^T)^-1, the "
                                                                 "weight of preserving the keys' second moment "
                                                                 "(MEMIT, GPT-J: 15000)")

    forcing_samples: int | None = Field(None, ge=1, description="fact_forcing: noised copies of each fact's prompt "
                                        "trained on, one noise draw each (null = Hase et al.'s: 10 for ft and lora, "
                                        "1 for rome and memit)")
    forcing: dict[str, int | float | str | None] | None = Field(
        None, description="fact_forcing: settings of this editor replaced for that problem (Hase et al.: ft "
                          "{steps: 50}, rome {lr: 0.05, steps: 25}); null = the same settings as the other problems")

    # fields added after studies were run: left out of a trial's key while at their default, so that old
    # studies keep their trial keys
    NEW_FIELDS: ClassVar[tuple[str, ...]] = ("nll", "early_stop", "clamp_norm_factor", "v_weight_decay", "cov_ridge",
                                             "cov_tokens", "window", "mom2_update_weight", "forcing_samples",
                                             "forcing")

    @model_validator(mode="after")
    def _check_forcing(self) -> "LayerEditConfig":
        if self.forcing:
            bad = [k for k in self.forcing if k not in type(self).model_fields or k in ("method", "forcing")]
            if bad:
                raise ValueError(f"forcing: {bad} are not editor settings that fact forcing can replace")
            LayerEditConfig.model_validate({**self.model_dump(exclude={"forcing"}), **self.forcing})
        return self

    def key_dump(self) -> dict:
        """The settings a trial key hashes: model_dump() without the newer fields at their defaults."""
        return key_dump(self, self.NEW_FIELDS)

    def for_problem(self, problem: str) -> "LayerEditConfig":
        """The settings an edit of `problem` runs with (fact_forcing: `forcing` applied)."""
        if problem != "fact_forcing" or not self.forcing:
            return self
        return LayerEditConfig.model_validate({**self.model_dump(exclude={"forcing"}), **self.forcing})

    def noise_samples(self) -> int:
        """Noised copies of a fact's prompt a fact-forcing edit trains on."""
        if self.forcing_samples is not None:
            return int(self.forcing_samples)
        return 1 if self.method in ("rome", "memit") else 10


def site_module(lm, site: str, layer: int) -> torch.nn.Linear:
    if site == "mlp_down":
        m = lm.sites.mlp_down(layer)
    elif site == "o_proj":
        m = lm.sites.o_proj(layer)
    else:
        raise ConfigError(f"edit site {site!r} is not one of {SITES}")
    if lm.sites.spec.conv1d:
        raise ConfigError(f"{lm.sites.model_type}: per-layer edits need a Linear site (Conv1D is not supported)")
    return m


@dataclass
class RowNoise:
    """Noise added to one row's token embeddings (the ``embed`` site's output): `values` Float[n, d] at positions
    start .. start + n - 1 (fact forcing: the subject's tokens, noised as in causal tracing). `tag` names the draw
    (a cache of unedited scores keys rows by it)."""

    start: int
    values: torch.Tensor
    tag: str


@dataclass
class EditRow:
    """One sequence scored or trained on: prompt ids, completion ids, and the edit (fact) it belongs to.
    role: 'target' (the objective), 'kl' (unrelated prompt, completion empty), or 'score'. `noise`: embedding
    noise of this row (None: the clean prompt)."""

    prompt: list[int]
    completion: list[int]
    edit: int
    role: str = "score"
    noise: RowNoise | None = None


@dataclass
class LayerEdits:
    """The trained updates of E facts at one layer and site. ft: dw Float[E, out, in]; lora: a Float[E, in],
    b Float[E, out] (dW_e = b_e a_e^T)."""

    layer: int
    site: str
    method: str
    dw: torch.Tensor | None = None
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None

    def delta(self, e: int) -> torch.Tensor:
        """Float[out, in]: the weight update of edit e."""
        if self.method == "ft":
            return self.dw[e]
        return torch.outer(self.b[e], self.a[e])

    def verify(self, lm=None) -> None:
        """Raise unless the edits are what they declare: one site (`mlp_down` / `o_proj`) of one layer, with
        finite, bounded (|value| <= MAX_EDIT_VALUE) float updates of that site's weight shape (with `lm`)."""
        from locaudit.edit.base import check_tensor

        if self.site not in SITES:
            raise ConfigError(f"layer edit site {self.site!r} is not one of {SITES}")
        if self.method not in ("ft", "lora", "rome", "memit"):
            raise ConfigError(f"layer edit method {self.method!r} is not 'ft', 'lora', 'rome' or 'memit'")
        out_in = (None, None)
        if lm is not None:
            n = lm.sites.n_layers
            if not isinstance(self.layer, int) or not 0 <= self.layer < n:
                raise ConfigError(f"layer edit declares layer {self.layer!r}; the model has {n} layers")
            out_in = tuple(site_module(lm, self.site, self.layer).weight.shape)
        if self.method == "ft":
            if self.a is not None or self.b is not None:
                raise DataError("an 'ft' layer edit carries lora factors a/b: it would not be the update it declares")
            check_tensor(f"layer edit dw (L{self.layer} {self.site})", self.dw, (None, *out_in))
        else:
            if self.dw is not None:
                raise DataError(f"a {self.method!r} layer edit carries a full update dw: it would not be the update "
                                "it declares")
            check_tensor(f"layer edit a (L{self.layer} {self.site})", self.a, (None, out_in[1]))
            check_tensor(f"layer edit b (L{self.layer} {self.site})", self.b, (self.a.shape[0], out_in[0]))

    @contextmanager
    def applied(self, lm, e: int) -> Iterator[None]:
        """Within the block, edit e is baked into the site's weight (restored exactly on exit); verified first."""
        self.verify(lm)
        w = site_module(lm, self.site, self.layer).weight
        old = w.detach().clone()
        try:
            with torch.no_grad():
                w.add_(self.delta(e).to(w.dtype))
            yield
        finally:
            with torch.no_grad():
                w.copy_(old)


def _delta_out(x: torch.Tensor, rows: torch.Tensor, edits: LayerEdits | dict) -> torch.Tensor:
    """Float[R, T, out]: the update's contribution x @ dW_{rows[r]}^T for every row."""
    method = edits["method"]
    if method in ("lora", "rome", "memit"):
        a, b = edits["a"][rows], edits["b"][rows]  # [R, in], [R, out]
        return (x @ a.unsqueeze(-1)) * b.unsqueeze(1)
    dw = edits["dw"]
    if rows.numel() == dw.shape[0] and torch.equal(rows, torch.arange(dw.shape[0], device=rows.device)):
        return torch.bmm(x, dw.transpose(1, 2))
    out = x.new_zeros(*x.shape[:2], dw.shape[1])
    for e in rows.unique().tolist():
        idx = (rows == e).nonzero().squeeze(1)
        out = out.index_put((idx,), x[idx] @ dw[e].t())
    return out


@contextmanager
def edit_hook(lm, site: str, layer: int, rows: torch.Tensor, edits: dict) -> Iterator[None]:
    """Add each row's own update to the output of `site` (mlp_down / o_proj) at `layer` (rows: Long[R],
    the edit index of each batch row)."""
    site_module(lm, site, layer)  # checks the site

    def fn(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out + _delta_out(x.to(out.dtype), rows, edits).to(out.dtype)

    with module_hooks(lm.sites, {(site, layer): fn}):
        yield


@contextmanager
def embed_noise(lm, noise: torch.Tensor | None) -> Iterator[None]:
    """Add Float[R, T, d] `noise` (a batch's RowNoise, zero elsewhere) to the token embeddings of the forward
    passes inside the block (nothing with None)."""
    if noise is None:
        yield
        return
    from locaudit.models.interventions import site_hooks

    def fn(out: torch.Tensor) -> torch.Tensor:
        if out.shape[:2] != noise.shape[:2]:
            raise ConfigError(f"embedding noise of shape {tuple(noise.shape)} for a batch of {tuple(out.shape)}")
        return out + noise.to(out.device, out.dtype)

    with site_hooks(lm.sites, {("embed", 0): fn}):
        yield


def layer_forward(lm, ids: torch.Tensor, mask: torch.Tensor, states: torch.Tensor | None, layer: int,
                  noise: torch.Tensor | None = None) -> torch.Tensor:
    """Final hidden states Float[R, T, d] (after the final norm) of a right-padded batch, from the cached
    states entering `layer` when given (`noise` on the embeddings otherwise: the cached states carry it).
    Logits are computed later, only where they are needed."""
    from locaudit.edit.prefix import run_from_layer

    base = lm.model.base_model
    if states is None or layer == 0:
        with embed_noise(lm, noise):
            return base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    with run_from_layer(lm, layer) as feed:
        feed["h"] = states
        return base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state


def prefix_states(lm, ids: torch.Tensor, mask: torch.Tensor, layer: int,
                   noise: torch.Tensor | None = None) -> torch.Tensor | None:
    """Float[R, T, d]: the (no-grad) hidden states entering `layer`, with `noise` on the embeddings (None for
    layer 0, or for a family whose frozen-prefix path is not enabled: then every forward is a full one)."""
    from locaudit.edit.prefix import capture_input, prefix_supported

    if layer == 0 or not prefix_supported(lm):
        return None
    with torch.no_grad(), capture_input(lm, layer) as cap, embed_noise(lm, noise):
        cap.forward(lm.model.base_model, ids, mask)
    return cap.values[layer]


@dataclass
class Batch:
    ids: torch.Tensor  # Long[R, T]
    mask: torch.Tensor  # Long[R, T]
    rows: torch.Tensor  # Long[R]: edit index
    starts: list[int]  # first completion position per row
    lens: list[int]  # completion length per row
    plen: list[int]  # prompt length per row
    noise: torch.Tensor | None = None  # Float[R, T, d]: the rows' embedding noise (None: no row has any)

    def part(self, lo: int, hi: int | None = None) -> "Batch":
        """Rows lo .. hi - 1 as a batch."""
        s = slice(lo, hi)
        return Batch(self.ids[s], self.mask[s], self.rows[s], self.starts[s], self.lens[s], self.plen[s],
                     None if self.noise is None else self.noise[s])


def make_batch(rows: Sequence[EditRow], pad: int, device) -> Batch:
    ids, mask = pad_right([r.prompt + r.completion for r in rows], pad)
    noise = None
    if any(r.noise is not None for r in rows):
        d = next(r.noise.values.shape[-1] for r in rows if r.noise is not None)
        noise = torch.zeros(len(rows), ids.shape[1], d)
        for i, r in enumerate(rows):
            if r.noise is None:
                continue
            n = r.noise.values.shape[0]
            if not 0 <= r.noise.start <= r.noise.start + n <= len(r.prompt) or r.noise.values.shape[-1] != d:
                raise ConfigError(f"embedding noise of row {i} ({n} positions from {r.noise.start}, width "
                                  f"{r.noise.values.shape[-1]}) does not fit its prompt of {len(r.prompt)} tokens")
            noise[i, r.noise.start: r.noise.start + n] = r.noise.values.float()
        noise = noise.to(device)
    return Batch(ids.to(device), mask.to(device), torch.tensor([r.edit for r in rows], device=device),
                 [len(r.prompt) for r in rows], [len(r.completion) for r in rows], [len(r.prompt) for r in rows],
                 noise)


def row_terms(lm, hidden: torch.Tensor, b: Batch, sel: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum log p of each selected row's completion Float[S], next-token log-probs at each row's last
    prompt position Float[S, V]). The LM head runs only at the positions that predict completion tokens."""
    pos_r, pos_t, spans = [], [], []
    for i in sel:
        s, n = b.starts[i], b.lens[i]
        spans.append((len(pos_r), n))
        for t in range(s - 1, s - 1 + max(n, 1)):
            pos_r.append(i)
            pos_t.append(t)
    h = hidden[torch.tensor(pos_r, device=hidden.device), torch.tensor(pos_t, device=hidden.device)]
    lp = F.log_softmax(lm.model.get_output_embeddings()(h).float(), -1)  # [P, V]
    logp_sum, last = [], []
    for i, (p0, n) in zip(sel, spans):
        last.append(lp[p0])
        if n:
            s = b.starts[i]
            tgt = b.ids[i, s: s + n]
            logp_sum.append(lp[p0: p0 + n].gather(1, tgt.unsqueeze(1)).sum())
        else:
            logp_sum.append(lp.new_zeros(()))
    return torch.stack(logp_sum), torch.stack(last)


def target_loss(problem: str, lp: torch.Tensor, counts: torch.Tensor, nll: str = "mean") -> torch.Tensor:
    """Float[S]: each target row's loss from its summed completion log-prob `lp` (fact_erasure:
    -log(1 - p); otherwise the NLL, per token (`mean`) or summed (`sum`))."""
    if problem == "fact_erasure":
        return -torch.log1p(-lp.exp().clamp(max=1 - 1e-6))
    return -lp / counts if nll == "mean" else -lp


def token_counts(b: Batch, sel: Sequence[int], device) -> torch.Tensor:
    """Float[S]: each selected row's completion token count (at least 1), the per-row loss normaliser."""
    return torch.tensor([max(b.lens[i], 1) for i in sel], device=device, dtype=torch.float32)


def train_layer_edits(lm, layer: int, train_rows: Sequence[EditRow], score_rows: Sequence[EditRow],
                      n_edits: int, problem: str, cfg: LayerEditConfig, precision: ResolvedPrecision
                      ) -> tuple[LayerEdits, torch.Tensor, dict]:
    """Train E = n_edits edits at `layer` together and score `score_rows` with them.

    train_rows: role 'target' (one or more per edit; their completion is the target object) and, for
    lora, role 'kl' (unrelated prompts). Returns (edits, Float[len(score_rows)] summed completion log-probs
    after the edit, info {"loss_first", "loss_last", "frozen_prefix"}).
    """
    # Long on purpose: one training pass of E edits together (frozen prefix, the optimizer loop, scoring with the
    # trained edits) over shared tensors; it reads as the algorithm it is.
    prec = require_resolved(precision, "layer_edit")
    module = site_module(lm, cfg.site, layer)
    w = module.weight
    dev, pad = lm.device, pad_id(lm.tokenizer)
    all_rows = list(train_rows) + list(score_rows)
    b = make_batch(all_rows, pad, dev)
    with prec.autocast(lm.dtype):
        states = prefix_states(lm, b.ids, b.mask, layer, b.noise)
    n_train = len(train_rows)
    tr = list(range(n_train))
    target_idx = [i for i in tr if all_rows[i].role == "target"]
    kl_idx = [i for i in tr if all_rows[i].role == "kl"]
    tb = b.part(0, n_train)
    tstates = states[:n_train] if states is not None else None
    params: dict = {"method": cfg.method}
    if cfg.method == "ft":
        params["dw"] = torch.zeros(n_edits, *w.shape, device=dev, dtype=torch.float32, requires_grad=True)
        opt_params = [params["dw"]]
    else:
        g = torch.Generator().manual_seed(cfg.seed)
        params["a"] = (torch.randn(n_edits, w.shape[1], generator=g) * cfg.init_scale).to(dev).requires_grad_(True)
        params["b"] = torch.zeros(n_edits, w.shape[0], device=dev, requires_grad=True)
        opt_params = [params["a"], params["b"]]
    ref_last = None
    if kl_idx and cfg.method == "lora" and cfg.kl_weight > 0:
        with torch.no_grad(), prec.autocast(lm.dtype):
            hidden = layer_forward(lm, tb.ids, tb.mask, tstates, layer, tb.noise)
            _, ref_last = row_terms(lm, hidden, tb, kl_idx)
    opt = torch.optim.Adam(opt_params, lr=cfg.lr)
    counts = token_counts(tb, target_idx, dev)
    losses = []
    rows_t = tb.rows
    was = [p.requires_grad for p in lm.model.parameters()]
    for p in lm.model.parameters():
        p.requires_grad_(False)
    t_edit = rows_t[torch.tensor(target_idx, device=dev, dtype=torch.long)]
    try:
        for _ in range(cfg.steps):
            opt.zero_grad(set_to_none=True)
            with edit_hook(lm, cfg.site, layer, rows_t, params), prec.autocast(lm.dtype):
                hidden = layer_forward(lm, tb.ids, tb.mask, tstates, layer, tb.noise)
            lp, last = row_terms(lm, hidden, tb, target_idx + kl_idx)
            lp_t = lp[: len(target_idx)]
            per = target_loss(problem, lp_t, counts, cfg.nll)
            loss = per.sum()  # edits are independent: the sum gives each its own gradient
            if ref_last is not None:
                kl = F.kl_div(last[len(target_idx):], ref_last, log_target=True, reduction="none").sum(-1)
                loss = loss + cfg.kl_weight * kl.sum() / max(1, cfg.n_kl_prompts)
            if cfg.early_stop is not None:  # edits whose every target row is below the bound stop changing
                worst = torch.full((n_edits,), float("-inf"), device=dev).scatter_reduce(
                    0, t_edit, per.detach().float(), "amax")
                stopped = worst < cfg.early_stop
                if bool(stopped.all()):
                    losses.append(float(per.detach().mean()))
                    break
                keep = {k: v.detach()[stopped].clone() for k, v in params.items() if k != "method"}
            loss.backward()
            opt.step()
            if cfg.early_stop is not None and bool(stopped.any()):
                with torch.no_grad():
                    for k, v in keep.items():
                        params[k][stopped] = v
            if cfg.method == "ft":
                with torch.no_grad():
                    params["dw"].clamp_(-cfg.norm_bound, cfg.norm_bound)
            losses.append(float(per.detach().mean()))
    finally:
        for p, r in zip(lm.model.parameters(), was):
            p.requires_grad_(r)
    edits = LayerEdits(layer, cfg.site, cfg.method,
                       dw=params.get("dw", None).detach() if cfg.method == "ft" else None,
                       a=params["a"].detach() if cfg.method == "lora" else None,
                       b=params["b"].detach() if cfg.method == "lora" else None)
    edits.verify(lm)  # finite and bounded, or the training diverged: fail before scoring, naming the tensor
    # score every score row with its edit (one forward from the cached prefix)
    sel = list(range(n_train, len(all_rows)))
    with torch.no_grad(), edit_hook(lm, cfg.site, layer, b.rows[n_train:], params), prec.autocast(lm.dtype):
        sb = b.part(n_train)
        hidden = layer_forward(lm, sb.ids, sb.mask, states[n_train:] if states is not None else None, layer, sb.noise)
        post, _ = row_terms(lm, hidden, sb, list(range(len(sel))))
    # the forward pass for scoring must not keep the hook's params alive with grads
    return edits, post.cpu(), {"loss_first": losses[0], "loss_last": losses[-1], "frozen_prefix": states is not None}


@torch.no_grad()
def score_rows(lm, rows: Sequence[EditRow], batch_size: int = 64, *, precision: ResolvedPrecision) -> torch.Tensor:
    """Float[len(rows)]: summed completion log-probs under the unedited model (full forward, batched)."""
    prec = require_resolved(precision, "layer_edit")
    out = torch.zeros(len(rows))
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].prompt) + len(rows[i].completion))
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        b = make_batch([rows[i] for i in idx], pad_id(lm.tokenizer), lm.device)
        with prec.autocast(lm.dtype):
            hidden = layer_forward(lm, b.ids, b.mask, None, 0, b.noise)
        lp, _ = row_terms(lm, hidden, b, list(range(len(idx))))
        out[idx] = lp.float().cpu()
    return out
