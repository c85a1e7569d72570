"""Attribution patching (AtP): the first-order approximation of activation patching, every head at once.

For a pair i, a head h = (l, j) and the same base run, source run and positions as activation patching
(`localize/corruptions.py`), with o_t the base run's o_proj input at position t and s_t the source value:

    AtP_i(h) = sign * sum_{t patched} < d m_i / d o_{t, h} , s_{t, h} - o_{t, h} >

where o_{t, h} is head h's slice, m_i the pair's preference log-ratio in the base run and sign = +1 for
denoise, -1 for noise (the same sign convention as activation patching's effect). One forward and one
backward per batch of pairs give every head's attribution: the per-pair metrics are independent, so the
gradient of sum_i m_i at pair i's sequences is d m_i / d o. Exact when m is linear in o between o and s
(a small noise level), an approximation otherwise: AtP is a screen that activation patching verifies.

AtP* (Kramar et al. 2024) corrections:
- QK fix: it corrects AtP for nodes *inside* attention (queries and keys), whose effect passes through
  that head's own softmax, by recomputing the softmax exactly. Here the node is a head's output
  o_h = softmax(q k^T) v, downstream of its own softmax, so the fix does not apply; the softmaxes of
  later heads are still linearised (that error is what GradDrop probes).
- GradDrop (`config.graddrop`): for each layer l', the attribution with the gradient through layer l''s
  residual contributions (attention output and MLP output) zeroed; a head's score is the mean over
  l' != its layer of |AtP_{-l'}|, averaged over pairs. A head whose GradDrop score is much larger than
  |AtP| has paths that cancel in the gradient (a likely AtP false negative worth patching). It costs up
  to L extra backward passes (the forward is shared), and is returned as the extra score ``graddrop``.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Sequence

import torch
from tqdm.auto import tqdm

from locaudit.localize.corruptions import PatchingConfig, patch_positions
from locaudit.localize.effects import HeadEffects
from locaudit.localize.stability import record_stability
from locaudit.localize.patching import VERSION  # patching's corruptions and meta: one version keys both
from locaudit.localize.patching import PatchPlan, capture_heads, embedding_hook, pair_metric, run_meta, source_values
from locaudit.models.interventions import as_3d, grad_hooks, site_hooks
from locaudit.models.precision import ResolvedPrecision, require_resolved


def attribution_patching(lm, pairs: Sequence, config: PatchingConfig | None = None, *, precision: ResolvedPrecision,
                         progress: bool = True) -> HeadEffects:
    """AtP of every head on `pairs`: HeadEffects with effect/se [L, H], per-pair AtP [n, L, H] and, with
    `config.graddrop`, the extra score ``graddrop`` [L, H]."""
    config = config or PatchingConfig()
    plan = PatchPlan(lm, pairs, config)
    sites = lm.sites
    L, H, D = sites.shape
    prec = require_resolved(precision, "attribution")
    per = torch.zeros(plan.n, L, H, dtype=torch.float64)
    gd = torch.zeros(plan.n, L, H, dtype=torch.float64) if config.graddrop else None
    m_base_all = torch.zeros(plan.n, dtype=torch.float64)
    m_src_all = torch.zeros(plan.n, dtype=torch.float64)
    sign = 1.0 if plan.direction == "denoise" else -1.0
    with prec.autocast(lm.dtype):
        if config.corruption == "mean":
            plan.compute_means(progress)
        for idx in tqdm(plan.batches, desc="attribution patching", disable=not progress, leave=False):
            base, base_noise, src, src_noise, src_plen = plan.base_and_source(idx)
            if src is not None:
                m_src, src_acts = capture_heads(lm, src, src_noise)
                m_src_all[idx] = m_src
            else:
                src_acts = None
                m_src_all[idx] = float("nan")
            rows, tb, ts = patch_positions(base, src_plen, config.positions)
            B = len(idx)
            pair_of = rows % B  # rows are chosen 0..B-1 then rejected B..2B-1
            src_vals = [source_values(plan, l, src_acts, rows, ts).to(lm.device) for l in range(L)]
            out = _attribute(lm, base, base_noise, rows, tb, src_vals, pair_of, B, config.graddrop)
            m_base_all[idx] = out["m"]
            per[idx] = sign * out["atp"]
            if gd is not None:
                gd[idx] = out["graddrop"]
    meta = run_meta(lm, plan, prec, "attribution", m_base_all, m_src_all)
    record_stability(meta, per, config.top_k, config.rank_by, config.pair_seed)
    meta["qk_fix"] = "not applicable: nodes are head outputs, downstream of their own attention softmax"
    extra = {"graddrop": gd.mean(0).float()} if gd is not None else {}
    return HeadEffects.from_per_example(per, "attribution", meta, extra, keep=config.keep_per_example)


def _attribute(lm, base, base_noise, rows, tb, src_vals, pair_of, B: int, graddrop: bool) -> dict:
    """One forward + backward of the base batch: per-pair AtP [B, L, H] (unsigned: grad . (source - base))."""
    sites = lm.sites
    L, H, D = sites.shape
    R = len(base)
    dev = lm.device
    rows_d, tb_d, pair_d = rows.to(dev), tb.to(dev), pair_of.to(dev)
    outs: list[torch.Tensor | None] = [None] * L
    drop = {"layer": -1}

    def grab(l):
        def fn(o):
            outs[l] = o
        return fn

    def zero_if_dropped(l):
        def fn(g):
            return torch.zeros_like(g) if drop["layer"] == l else g
        return fn

    with ExitStack() as stack, torch.enable_grad():
        stack.enter_context(site_hooks(sites, {("heads", l): grab(l) for l in range(L)}))
        if graddrop:  # GradDrop: the gradient through layer l's attention and MLP outputs, zeroed on demand
            stack.enter_context(grad_hooks(sites, {(site, l): zero_if_dropped(l) for l in range(L)
                                                   for site in ("attn_out", "mlp_out")}))
        stack.enter_context(embedding_hook(lm, base_noise, require_grad=True))
        m = pair_metric(lm.model, base.to(dev))
        total = m.sum()
        grads = torch.autograd.grad(total, outs, retain_graph=graddrop)

        def atp(gs, layers) -> torch.Tensor:
            res = torch.zeros(B, L, H, dtype=torch.float64, device=dev)
            for l in layers:
                g = as_3d(gs[l], R)[rows_d, tb_d].double()  # [P, HD]
                o = as_3d(outs[l], R)[rows_d, tb_d].detach().double()
                dlt = src_vals[l].double() - o
                prod = (g * dlt).view(-1, H, D).sum(-1)  # [P, H]
                res[:, l].index_add_(0, pair_d, prod)
            return res

        res = {"m": m.detach().cpu(), "atp": atp(grads, range(L)).cpu()}
        if graddrop:
            acc = torch.zeros(B, L, H, dtype=torch.float64, device=dev)
            base_abs = res["atp"].abs().to(dev)
            for lp in range(L):
                drop["layer"] = lp
                # dropping layer lp changes the gradient of heads below lp only; zero at lp, AtP above
                if lp > 0:
                    g2 = torch.autograd.grad(total, outs[:lp], retain_graph=lp < L - 1)
                    a2 = atp(list(g2) + [None] * (L - lp), range(lp)).abs()
                    acc[:, :lp] += a2[:, :lp]
                acc[:, lp + 1:] += base_abs[:, lp + 1:]
            drop["layer"] = -1
            res["graddrop"] = (acc / max(1, L - 1)).cpu()
        return res


__all__ = ["attribution_patching", "VERSION"]
