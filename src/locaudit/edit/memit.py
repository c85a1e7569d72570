"""MEMIT (Meng et al. 2023) "at layer l": one fact's update spread over a window of MLP down-projections.

Hase et al. edit "at layer l" with MEMIT over the window of `w` layers centred on l and clipped at the model's
ends: range(max(0, l - w//2), min(L, l + ceil(w/2))) (google/belief-localization, experiments/evaluate.py;
w = 5). For each fact (each edit e of a group; facts are edited one at a time, as Hase did, sharing forward
passes only):
  z    h_L + delta: the residual stream (the output of the window's last layer L) at the subject's last token,
       with delta optimised as ROME's v* is (edit/rome.py `optimise_values`; the scale of the weight decay and
       of the clamp is ||h_L||, MEMIT's compute_z);
  for the window's layers l_1 < ... < l_n in turn, with the updates of the earlier window layers in place:
       k_i  the key (input of l_i's down-projection) at the subject's last token,
       r_i  (z - h_L) / (n - i + 1): the residual still missing at L, spread over the layers left,
       dW_i = R K^T (lambda C_i + K K^T)^-1  (MEMIT's batched least squares: the smallest change in the
            lambda C_i-weighted norm that writes residuals R for keys K; C_i = E[k k^T] of layer l_i on generic
            text, rome's `key_second_moment`, cached by content). With one key per edit it is rank one:
            dW_i = r_i a_i^T, a_i = (lambda C_i + k_i k_i^T)^-1 k_i, stored as a LayerEdits(method='memit').

By Sherman-Morrison, (lambda C + k k^T)^-1 k = C^-1 k / (lambda + k^T C^-1 k) (computed so: one solve with C
for all E keys, valid at lambda = 0). So a window of one layer with lambda = 0, given the same delta, is ROME's
update delta (C^-1 k)^T / (k^T C^-1 k) exactly (and the values are the same when the weight decay is 0 and the
clamp inactive: adding delta to a Llama layer's output is adding it to its down-projection's output).
With lambda > 0 the one-layer update is ROME's scaled by s = k^T C^-1 k / (lambda + k^T C^-1 k) < 1: MEMIT
writes only part of the residual (a soft constraint) and keeps C's directions closer. The values also differ
in their scale: MEMIT decays and clamps delta relative to ||h_l||, ROME relative to ||W k*||.

Differences from kmeng01/memit, stated: no context-template prefixes (keys and z from the fact's own prompt),
no KL term on "{subject} is a", and C from the caller's text (rome.py says which).
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Sequence

import torch

from locaudit.edit.layer_edit import EditRow, LayerEditConfig, LayerEdits, edit_hook, layer_forward, row_terms
from locaudit.edit.rome import check_site, optimise_values, target_batch
from locaudit.errors import ConfigError, DataError
from locaudit.models.interventions import module_hooks
from locaudit.models.precision import ResolvedPrecision, require_resolved


def window_layers(layer: int, n_layers: int, window: int) -> list[int]:
    """The layers MEMIT edits for "layer `layer`": `window` layers centred on it, clipped at 0 and n_layers."""
    if not 0 <= int(layer) < n_layers:
        raise ConfigError(f"memit: layer {layer} is outside the model's {n_layers} layers")
    return list(range(max(0, layer - window // 2), min(n_layers, layer + (window + 1) // 2)))


def memit_update(C: torch.Tensor, K: torch.Tensor, R: torch.Tensor, lam: float) -> torch.Tensor:
    """Float64[out, in]: MEMIT's batched least-squares update of one layer for n keys at once (a mass edit),
    dW = R^T K (lambda C + K^T K)^-1 with K Float[n, in] (keys as rows) and R Float[n, out] (residuals): the
    minimiser of sum_j ||(W + dW) k_j - (W k_j + r_j)||^2 + lambda tr(dW C dW^T)."""
    C, K, R = (x.to(torch.float64) for x in (C, K, R))
    A = lam * C + K.t() @ K
    adj = torch.linalg.solve(A, K.t())  # [in, n] = (lambda C + K^T K)^-1 K^T  (A is symmetric)
    return R.t() @ adj.t()


def rank_one_keys(C: torch.Tensor, k: torch.Tensor, lam: float, ridge: float = 0.0) -> torch.Tensor:
    """Float64[E, in]: a_e = (lambda C + k_e k_e^T)^-1 k_e = C^-1 k_e / (lambda + k_e^T C^-1 k_e) for E
    independent one-fact edits (one solve with C for all keys), so that dW_e = r_e a_e^T is `memit_update` of
    the single key k_e. `ridge` as rome.rank_one."""
    C = C.to(torch.float64)
    if ridge > 0:
        C = C + ridge * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    k = k.to(torch.float64).to(C.device)
    u = torch.linalg.solve(C, k.t()).t()
    den = lam + (u * k).sum(1, keepdim=True)
    if not bool((den > 0).all()) or not bool(torch.isfinite(u).all()):
        raise DataError("memit: C is not positive definite on the edited keys; use more text for C or set "
                        "cov_ridge > 0")
    return u / den


def memit_layer_edits(lm, layers: Sequence[int], train_rows: Sequence[EditRow], key_pos: Sequence[int],
                      score_rows: Sequence[EditRow], n_edits: int, problem: str, cfg: LayerEditConfig,
                      Cs: dict[int, torch.Tensor], precision: ResolvedPrecision
                      ) -> tuple[list[LayerEdits], torch.Tensor, dict]:
    """MEMIT edits of E = n_edits facts over the window `layers` (ascending; one 'target' row per edit with
    `key_pos[i]` its subject's last token; Cs[l] = E[k k^T] at each window layer), and `score_rows` scored with
    every window layer's update in place (rome_layer_edits' contract).

    Returns (one LayerEdits(method='memit', a, b) per window layer, Float[len(score_rows)] summed completion
    log-probs after the edit, info {"loss_first", "loss_last", "frozen_prefix", "layers", "z", "k", "r",
    "residual_left", "delta_norm"}); residual_left: ||z - h_L|| / ||delta|| after the whole update (0 = the
    residual fully written)."""
    prec = require_resolved(precision, "memit")
    layers = [int(l) for l in layers]
    if not layers or layers != sorted(set(layers)):
        raise ConfigError(f"memit: the window {layers} must be ascending distinct layers")
    for l in layers:
        check_site(lm, l, cfg.site)
        if l not in Cs:
            raise ConfigError(f"memit: no key second moment C for window layer {l}")
    first, last = layers[0], layers[-1]
    b, states, nt, tb, tstates = target_batch(lm, "memit", train_rows, score_rows, n_edits, key_pos, first, prec)
    dev = lm.device
    ri, pi, e_of = torch.arange(nt, device=dev), torch.tensor(list(key_pos), device=dev), tb.rows

    def read(params: dict[int, dict], at_layer: int | None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(keys at `at_layer`'s down-projection, h_L) at the key positions, with `params` applied."""
        seen: dict = {}

        def grab_k(x, out):
            seen["k"] = x[ri, pi].detach().float()

        def grab_h(x, out):
            seen["h"] = (out[0] if isinstance(out, tuple) else out)[ri, pi].detach().float()

        hooks = {("layer", last): grab_h}
        if at_layer is not None:
            hooks[("mlp_down", at_layer)] = grab_k
        with torch.no_grad(), ExitStack() as st:
            for l, p in params.items():
                st.enter_context(edit_hook(lm, cfg.site, l, e_of, p))
            st.enter_context(module_hooks(lm.sites, hooks))
            st.enter_context(prec.autocast(lm.dtype))
            layer_forward(lm, tb.ids, tb.mask, tstates, first, tb.noise)
        put = lambda v: torch.zeros(n_edits, v.shape[1], device=dev).index_copy(0, e_of, v)  # noqa: E731
        return (put(seen["k"]) if "k" in seen else None), put(seen["h"])

    _, h0 = read({}, None)
    delta, losses = optimise_values(lm, tb, tstates, first, ("layer", last), key_pos, n_edits, problem, cfg,
                                    h0.norm(dim=1), prec)
    z = h0 + delta
    params: dict[int, dict] = {}
    edits, ks, rs = [], [], []
    for i, l in enumerate(layers):
        k, h = read(params, l)
        r = (z - h) / (len(layers) - i)
        a = rank_one_keys(Cs[l], k, cfg.mom2_update_weight, cfg.cov_ridge).float()
        params[l] = {"method": "memit", "a": a, "b": r}
        e = LayerEdits(l, cfg.site, "memit", a=a, b=r.clone())
        e.verify(lm)
        edits.append(e)
        ks.append(k.cpu())
        rs.append(r.cpu())
    _, h_end = read(params, None)
    left = (z - h_end).norm(dim=1) / delta.norm(dim=1).clamp(min=1e-12)
    sb = b.part(nt)
    with torch.no_grad(), ExitStack() as st:
        for l, p in params.items():
            st.enter_context(edit_hook(lm, cfg.site, l, sb.rows, p))
        st.enter_context(prec.autocast(lm.dtype))
        hidden = layer_forward(lm, sb.ids, sb.mask, states[nt:] if states is not None else None, first, sb.noise)
        post, _ = row_terms(lm, hidden, sb, list(range(len(score_rows))))
    return edits, post.cpu(), {"loss_first": losses[0], "loss_last": losses[-1], "frozen_prefix": states is not None,
                               "layers": layers, "z": z.cpu(), "h0": h0.cpu(), "k": ks, "r": rs,
                               "residual_left": left.cpu(), "delta_norm": delta.norm(dim=1).cpu()}


def window_relative_norms(lm, edits: Sequence[LayerEdits]) -> list[float]:
    """Per edit e: sqrt(sum_l ||dW_{e,l}||_F^2) / sqrt(sum_l ||W_l||_F^2) over the window's layers (one
    number per edit, comparable with ROME's and FT's ||dW|| / ||W|| at one layer)."""
    from locaudit.edit.layer_edit import site_module

    wn = sum(float(site_module(lm, e.site, e.layer).weight.detach().float().norm()) ** 2 for e in edits) ** 0.5
    n = edits[0].a.shape[0]
    return [sum(float(e.delta(j).float().norm()) ** 2 for e in edits) ** 0.5 / wn for j in range(n)]


__all__ = ["window_layers", "memit_update", "rank_one_keys", "memit_layer_edits", "window_relative_norms"]
