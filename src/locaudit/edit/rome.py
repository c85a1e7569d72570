"""ROME (Meng et al. 2022) at a chosen layer: a closed-form rank-one update of the MLP down-projection.

The down-projection W (Float[out, in]) of layer l maps keys k (the MLP's hidden activations, its input)
to values W k. For one fact:
  k*   the key at the subject's last token of the fact's prompt (the clean run);
  v*   W k* + delta, where delta (Float[out]) is added to the down-projection's output at that position and
       optimised (Adam, `steps`, `lr`) to make the model predict the target object: the target loss of the
       editing problem (layer_edit.target_loss) + v_weight_decay x ||delta||^2 / ||W k*||^2, with
       ||delta|| clamped to clamp_norm_factor x ||W k*|| after every step (ROME's compute_v);
  C    E[k k^T], the keys' second moment over generic text (every token of the windows given; computed once
       per model, layer and text, and cached by content under the cache folder: `key_second_moment`);
  dW   = delta (C^-1 k*)^T / (k*^T C^-1 k*)   (ROME's eq. 2): the smallest change in the C-norm with
       (W + dW) k* = v*, exactly. It is stored as a rank-one LayerEdits (b = delta, a = C^-1 k* / (k*^T C^-1 k*)).

Differences from the reference implementation (kmeng01/rome), stated: k* and delta come from the fact's own
prompt only (ROME also averages over random context prefixes and adds a KL term on "{subject} is a"); C
comes from the text the caller gives (the Hase study uses the shipped Austen excerpts, ~17k SmolLM2 tokens,
where ROME uses 100,000 Wikipedia samples).

Rows with embedding noise (EditRow.noise; fact forcing) are edited as they are seen: k* and delta come from the
noised prompt, as in Hase et al.'s fact forcing (ROME run under the subject-noising hook).
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from locaudit.edit.layer_edit import (Batch, EditRow, LayerEditConfig, LayerEdits, edit_hook, layer_forward, make_batch,
                                      prefix_states, row_terms, site_module, target_loss, token_counts)
from locaudit.errors import ConfigError, DataError
from locaudit.io import atomic_path, cache_dir, stable_hash
from locaudit.models.batching import pad_id
from locaudit.models.interventions import module_hooks
from locaudit.models.precision import ResolvedPrecision, require_resolved

log = logging.getLogger(__name__)


def check_site(lm, layer: int, site: str) -> torch.nn.Linear:
    if site != "mlp_down":
        raise ConfigError(f"rome edits the MLP down-projection (site: mlp_down); site {site!r} is not supported")
    if not 0 <= int(layer) < lm.sites.n_layers:
        raise ConfigError(f"rome: layer {layer} is outside the model's {lm.sites.n_layers} layers")
    return site_module(lm, site, layer)


@torch.no_grad()
def compute_second_moments(lm, layers: Sequence[int], windows: Sequence[Sequence[int]], precision: ResolvedPrecision
                           ) -> tuple[dict[int, torch.Tensor], int]:
    """({layer: C = mean over every token of `windows` of k k^T, Float64[in, in]}, the token count) for several
    layers in the same forward passes, with k the input of each layer's MLP down-projection. One window per
    forward pass (no padding); the layers above the highest requested one are not run."""
    from locaudit.models.interventions import capture

    prec = require_resolved(precision, "rome")
    layers = sorted({int(l) for l in layers})
    acc, n = {}, {}
    for l in layers:
        d = check_site(lm, l, "mlp_down").weight.shape[1]
        acc[l] = torch.zeros(d, d, dtype=torch.float64, device=lm.device)
        n[l] = 0

    def grab(l: int):
        def fn(x: torch.Tensor, out):
            k = x.detach().reshape(-1, acc[l].shape[0]).to(torch.float64)
            acc[l] += k.t() @ k
            n[l] += k.shape[0]
            return None
        return fn

    with module_hooks(lm.sites, {("mlp_down", l): grab(l) for l in layers}), \
            capture(lm.sites, "resid_post", [layers[-1]], stop=True) as stop:  # ends each pass there
        for ids in windows:
            if len(ids) < 1:
                continue
            with prec.autocast(lm.dtype):
                stop.forward(lm.model.base_model, torch.tensor([list(ids)], device=lm.device))
    if not layers or n[layers[0]] == 0:
        raise DataError("rome: the text for the key second moment has no tokens")
    return {l: (acc[l] / n[l]).cpu() for l in layers}, n[layers[0]]


def compute_second_moment(lm, layer: int, windows: Sequence[Sequence[int]], precision: ResolvedPrecision
                          ) -> tuple[torch.Tensor, int]:
    """(C = mean over every token of `windows` of k k^T, Float64[in, in]; the token count), with k the input
    of layer `layer`'s MLP down-projection (`compute_second_moments` for one layer)."""
    Cs, n = compute_second_moments(lm, [layer], windows, precision)
    return Cs[int(layer)], n


def _moment_path(lm, layer: int, windows, precision, text_id: str | None):
    key = stable_hash({"model": lm.fingerprint, "layer": int(layer), "precision": precision.key,
                       "windows": stable_hash([list(map(int, w)) for w in windows])}, 24)
    return cache_dir("rome_cov") / f"{(text_id or 'text').replace('/', '_')}-L{int(layer)}-{key}.safetensors"


def key_second_moments(lm, layers: Sequence[int], windows: Sequence[Sequence[int]], precision: ResolvedPrecision,
                       text_id: str | None = None, cache: bool = True) -> dict[int, torch.Tensor]:
    """{layer: C = E[k k^T]} (Float64[in, in]) of the layers' down-projection keys over `windows`, each cached under
    <cache>/rome_cov/ by content: the model fingerprint, layer, precision and the token windows' hash (`text_id`
    is only a readable part of the file name). The layers not cached are computed in the same forward passes."""
    from safetensors.torch import load_file, save_file

    out: dict[int, torch.Tensor] = {}
    for l in sorted({int(x) for x in layers}):
        path = _moment_path(lm, l, windows, precision, text_id)
        if cache and path.is_file():
            try:
                out[l] = load_file(str(path))["C"]
            except Exception as e:  # a damaged cache file is recomputed, not trusted
                log.warning("rome: cached key second moment %s is unreadable (%s); recomputing", path, e)
    todo = [int(l) for l in layers if int(l) not in out]
    if todo:
        Cs, n = compute_second_moments(lm, todo, windows, precision)
        for l, C in Cs.items():
            out[l] = C
            if cache:
                with atomic_path(_moment_path(lm, l, windows, precision, text_id)) as tmp:
                    save_file({"C": C.contiguous()}, str(tmp), metadata={"tokens": str(n), "layer": str(l),
                                                                         "model": str(lm.fingerprint)})
    return out


def key_second_moment(lm, layer: int, windows: Sequence[Sequence[int]], precision: ResolvedPrecision,
                      text_id: str | None = None, cache: bool = True) -> torch.Tensor:
    """C = E[k k^T] (Float64[in, in]) of layer `layer`'s down-projection keys over `windows`, cached by content
    (`key_second_moments` for one layer)."""
    return key_second_moments(lm, [layer], windows, precision, text_id, cache)[int(layer)]


def rank_one(C: torch.Tensor, k: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """Float64[E, in]: a_e = C^-1 k_e / (k_e^T C^-1 k_e) for keys k (Float[E, in]), so that
    dW_e = delta_e a_e^T gives dW_e k_e = delta_e (ROME's eq. 2). `ridge` adds ridge x mean(diag C) x I."""
    C = C.to(torch.float64)
    if ridge > 0:
        C = C + ridge * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    k = k.to(torch.float64).to(C.device)
    u = torch.linalg.solve(C, k.t()).t()  # [E, in]
    den = (u * k).sum(1, keepdim=True)
    if not bool((den > 0).all()) or not bool(torch.isfinite(u).all()):
        raise DataError("rome: C is not positive definite on the edited keys (k^T C^-1 k <= 0 or not finite); "
                        "use more text for C or set cov_ridge > 0")
    return u / den


def _add_at(out, fn):
    """Apply fn to a module's output tensor (a layer may return a tuple whose first item is the hidden state)."""
    if isinstance(out, tuple):
        return (fn(out[0]), *out[1:])
    return fn(out)


def target_batch(lm, method: str, train_rows: Sequence[EditRow], score_rows: Sequence[EditRow], n_edits: int,
                 key_pos: Sequence[int], first: int, prec):
    """ROME/MEMIT's shared start: check one 'target' row per edit with its key position inside the prompt,
    batch target and score rows together and run the unedited layers below `first` once.
    Returns (batch of all rows, their states entering `first` or None, n target rows, the target rows' batch,
    their states)."""
    if len(train_rows) != n_edits or sorted(r.edit for r in train_rows) != list(range(n_edits)):
        raise ConfigError(f"{method}: expected one target row per edit (0..{n_edits - 1}); got edits "
                          f"{[r.edit for r in train_rows]}")
    if any(r.role != "target" for r in train_rows):
        raise ConfigError(f"{method}: train rows must all be 'target' rows ({method} has no KL rows)")
    if len(key_pos) != n_edits or any(not 0 <= p < len(r.prompt) for p, r in zip(key_pos, train_rows)):
        raise ConfigError(f"{method}: key positions {list(key_pos)} must lie inside each target row's prompt")
    b = make_batch(list(train_rows) + list(score_rows), pad_id(lm.tokenizer), lm.device)
    with prec.autocast(lm.dtype):
        states = prefix_states(lm, b.ids, b.mask, first, b.noise)
    nt = len(train_rows)
    tb = b.part(0, nt)
    return b, states, nt, tb, (states[:nt] if states is not None else None)


def optimise_values(lm, tb: Batch, tstates: torch.Tensor | None, from_layer: int, at: tuple[str, int],
                    key_pos: Sequence[int], n_edits: int, problem: str, cfg: LayerEditConfig, scale: torch.Tensor,
                    precision: ResolvedPrecision) -> tuple[torch.Tensor, list[float]]:
    """The value optimisation of ROME (compute_v) and MEMIT (compute_z): delta (Float[E, out]) added to the
    output of module `at` = (module, layer) (ROME: ("mlp_down", l); MEMIT: ("layer", last window layer), the
    residual stream) at each train row's key position, optimised with Adam (cfg.steps, cfg.lr) on the
    problem's target loss + cfg.v_weight_decay x ||delta||^2 / scale^2, ||delta|| clamped to
    cfg.clamp_norm_factor x scale after every step (scale: Float[E], ROME ||W k*||, MEMIT ||h_l||).
    `tb` holds one target row per edit, `tstates` the states entering `from_layer` (or None).
    Returns (delta, the mean target loss at every step)."""
    prec = require_resolved(precision, "optimise_values")
    dev, nt = tb.ids.device, tb.ids.shape[0]
    ri = torch.arange(nt, device=dev)
    pi = torch.tensor(list(key_pos), device=dev)
    e_of = tb.rows
    width = hook_width(lm, at)
    delta = torch.zeros(n_edits, width, device=dev, requires_grad=True)
    scale = scale.to(dev).float().clamp(min=1e-8).unsqueeze(1)
    max_norm = cfg.clamp_norm_factor * scale

    def add(h):
        h = h.clone()
        h[ri, pi] = h[ri, pi] + delta[e_of].to(h.dtype)
        return h

    opt = torch.optim.Adam([delta], lr=cfg.lr)
    counts = token_counts(tb, list(range(nt)), dev)
    losses: list[float] = []
    was = [p.requires_grad for p in lm.model.parameters()]
    for p in lm.model.parameters():
        p.requires_grad_(False)
    try:
        for _ in range(cfg.steps):
            opt.zero_grad(set_to_none=True)
            with module_hooks(lm.sites, {at: lambda x, out: _add_at(out, add)}), prec.autocast(lm.dtype):
                hidden = layer_forward(lm, tb.ids, tb.mask, tstates, from_layer, tb.noise)
            lp, _ = row_terms(lm, hidden, tb, list(range(nt)))
            per = target_loss(problem, lp, counts, cfg.nll)
            losses.append(float(per.detach().mean()))
            if cfg.early_stop is not None and bool((per.detach() < cfg.early_stop).all()):
                break
            decay = cfg.v_weight_decay * delta.pow(2).sum(1) / scale.squeeze(1) ** 2
            (per.sum() + decay.sum()).backward()
            opt.step()
            with torch.no_grad():  # ROME's / MEMIT's clamp of ||delta||
                n = delta.norm(dim=1, keepdim=True)
                delta.mul_(torch.where(n > max_norm, max_norm / n.clamp(min=1e-12), torch.ones_like(n)))
    finally:
        for p, r in zip(lm.model.parameters(), was):
            p.requires_grad_(r)
    return delta.detach(), losses


def hook_width(lm, at: tuple[str, int]) -> int:
    """The width of module `at`'s output: the down-projection's rows, or the hidden size for a layer."""
    name, layer = at
    if name == "layer":
        return int(lm.model.get_input_embeddings().weight.shape[1])
    return int(site_module(lm, name, layer).weight.shape[0])


def rome_layer_edits(lm, layer: int, train_rows: Sequence[EditRow], key_pos: Sequence[int],
                     score_rows: Sequence[EditRow], n_edits: int, problem: str, cfg: LayerEditConfig,
                     C: torch.Tensor, precision: ResolvedPrecision) -> tuple[LayerEdits, torch.Tensor, dict]:
    """ROME edits of E = n_edits facts at `layer` (one 'target' row per edit, with `key_pos[i]` the position
    of its subject's last token), and `score_rows` scored with them (train_layer_edits' contract).

    Returns (edits: LayerEdits(method='rome', a, b), Float[len(score_rows)] summed completion log-probs after
    the edit, info {"loss_first", "loss_last", "frozen_prefix", "k", "v", "delta_norm"})."""
    prec = require_resolved(precision, "rome")
    W = check_site(lm, layer, cfg.site).weight
    b, states, nt, tb, tstates = target_batch(lm, "rome", train_rows, score_rows, n_edits, key_pos, layer, prec)
    dev = lm.device
    ri = torch.arange(nt, device=dev)
    pi = torch.tensor(list(key_pos), device=dev)
    e_of = tb.rows  # edit of each train row
    # clean keys k* and values W k* (+ bias) at the key positions
    seen: dict = {}

    def grab(x, out):
        seen["k"] = x[ri, pi].detach().float()
        seen["v"] = out[ri, pi].detach().float()
        return None

    with torch.no_grad(), module_hooks(lm.sites, {("mlp_down", layer): grab}), prec.autocast(lm.dtype):
        layer_forward(lm, tb.ids, tb.mask, tstates, layer, tb.noise)
    k_star = torch.zeros(n_edits, W.shape[1], device=dev).index_copy(0, e_of, seen["k"])
    wk = k_star @ W.detach().float().t()  # W k* without bias: the scale of delta
    v0 = torch.zeros(n_edits, W.shape[0], device=dev).index_copy(0, e_of, seen["v"])
    d, losses = optimise_values(lm, tb, tstates, layer, ("mlp_down", layer), key_pos, n_edits, problem, cfg,
                                wk.norm(dim=1), prec)
    a = rank_one(C, k_star, cfg.cov_ridge).float()
    edits = LayerEdits(layer, cfg.site, "rome", a=a, b=d.clone())
    edits.verify(lm)
    params = {"method": "rome", "a": a, "b": d}
    sel = list(range(nt, b.ids.shape[0]))
    with torch.no_grad(), edit_hook(lm, cfg.site, layer, b.rows[nt:], params), prec.autocast(lm.dtype):
        sb = b.part(nt)
        hidden = layer_forward(lm, sb.ids, sb.mask, states[nt:] if states is not None else None, layer, sb.noise)
        post, _ = row_terms(lm, hidden, sb, list(range(len(sel))))
    return edits, post.cpu(), {"loss_first": losses[0], "loss_last": losses[-1], "frozen_prefix": states is not None,
                               "k": k_star.cpu(), "v": (v0 + d).cpu(), "delta_norm": d.norm(dim=1).cpu()}


def relative_norms(lm, edits: LayerEdits) -> list[float]:
    """||dW_e||_F / ||W||_F of every edit e of `edits` (W: the edited site's weight)."""
    W = site_module(lm, edits.site, edits.layer).weight.detach().float()
    wn = float(W.norm())
    n = edits.dw.shape[0] if edits.method == "ft" else edits.a.shape[0]
    return [float(edits.delta(e).float().norm()) / wn for e in range(n)]


__all__ = ["compute_second_moment", "compute_second_moments", "key_second_moment", "key_second_moments", "rank_one",
           "rome_layer_edits", "relative_norms"]
