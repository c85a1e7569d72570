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
- QK fix (`config.qk_fix`). A head's output o_h = softmax(q k^T) v is downstream of its own softmax, so
  the head-output scores above need no fix (the softmaxes of later heads are still linearised: that
  error is what GradDrop probes). The fix is for nodes *inside* attention, which this option also scores:
  - query node of head (l, h): head h's slice of layer l's q_proj OUTPUT (before RoPE and before any
    q_norm), at the patched positions (`patch_positions`, the rows and positions of the head-output
    patch); patching it = replacing that slice by the source's value at the matched source positions
    (the dataset mean of the slice for corruption ``mean``). Key node: likewise on k_proj's output, one
    node per KV head: under grouped-query attention (n_kv < n_heads, e.g. Gemma 3's single KV head) a
    key node is scored per KV head and that score is reported on every query head that reads it (so the
    query heads of one group show the same ``key`` and ``key_atp``). Fused projections (Phi-3's
    qkv_proj, GPT-2's c_attn, GPT-NeoX's query_key_value) are sliced by `ModelSites.qk_columns`.
  - linear AtP of a node (``query_atp``, ``key_atp``): sign * sum_{t patched} < d m / d n_t , n_src,t - n_t >
    with the gradient from the same forward and backward as the head outputs'.
  - QK-fixed AtP (``query``, ``key``): the node's effect through the attention softmax computed exactly,
    everything downstream of the layer's head outputs linearised:
        sign * sum_{all t} < d m / d o_t , o'_t - o_t >
    where o is layer l's heads site (o_proj's input) and o' the same with the node patched, values
    unchanged, so only attention patterns change. o' comes from calling layer l's attention module
    again on the inputs it got in the (possibly noised) base forward that was differentiated, under a
    q_proj / k_proj output hook that patches the node: RoPE, masks, soft-capping, sliding windows and
    q/k norms are the module's own. Nodes are batched as stacked copies, with one unpatched copy as the
    reference o (so no numerical difference between two calls enters o' - o). The inner product runs
    over every head of the layer: only the node's own head changes (for a key node, the query heads
    reading that KV head), except in families whose q_norm / k_norm spans all heads (OLMo-2), where the
    other heads' change through the shared norm is counted too. Cost: about (H + n_kv) / (copies - 1)
    extra attention calls per layer and batch (copies from `tokens_per_forward`). All four are
    mean-over-pairs [L, H] extra scores; the head-output scores are bit-identical with or without them.
    Checked against exact node patching (full forwards with the node patched) in tests/unit/test_atp_star.py:
    all three agree to second order in a small patch, and with saturated attention (q/k weights x8) and a
    large patch the QK-fixed mean |error| is under half linear AtP's (the rest is downstream linearisation).
- GradDrop (`config.graddrop`): for each layer l', the attribution with the gradient through layer l''s
  residual contributions (attention output and MLP output) zeroed; a head's score is the mean over
  l' != its layer of |AtP_{-l'}|, averaged over pairs. A head whose GradDrop score is much larger than
  |AtP| has paths that cancel in the gradient (a likely AtP false negative worth patching). It costs up
  to L extra backward passes (the forward is shared), and is returned as the extra score ``graddrop``.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterator, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from locaudit.errors import DataError
from locaudit.localize.corruptions import PatchingConfig, patch_positions
from locaudit.localize.effects import HeadEffects
from locaudit.localize.stability import record_stability
from locaudit.localize.patching import VERSION  # patching's corruptions and meta: one version keys both
from locaudit.localize.patching import PatchPlan, capture_heads, embedding_hook, pair_metric, run_meta, source_values
from locaudit.models.interventions import as_3d, capture, grad_hooks, module_calls, module_hooks, site_hooks
from locaudit.models.precision import ResolvedPrecision, require_resolved

QK_SCORES = ("query", "key", "query_atp", "key_atp")  # the extra scores of config.qk_fix
QK_META_ON = ("on: extra scores query and key (AtP*'s QK fix: the node's own attention softmax exact) and "
              "query_atp and key_atp (linear AtP) of each head's q_proj / k_proj output slice at the patched "
              "positions; a key node is a KV head, its score shown on every query head that reads it")
QK_META_OFF = ("off (config.qk_fix): query and key nodes not scored; not applicable to the head-output nodes, "
               "which are downstream of their own attention softmax")
NodeKey = tuple  # (kind "q" | "k", layer)


def attribution_patching(lm, pairs: Sequence, config: PatchingConfig | None = None, *, precision: ResolvedPrecision,
                         progress: bool = True) -> HeadEffects:
    """AtP of every head on `pairs`: HeadEffects with effect/se [L, H], per-pair AtP [n, L, H] and, with
    `config.graddrop`, the extra score ``graddrop`` [L, H]; with `config.qk_fix`, the extra scores
    ``query``, ``key`` (QK-fixed) and ``query_atp``, ``key_atp`` (linear) [L, H] (module docstring)."""
    config = config or PatchingConfig()
    plan = PatchPlan(lm, pairs, config)
    sites = lm.sites
    L, H, D = sites.shape
    prec = require_resolved(precision, "attribution")
    per = torch.zeros(plan.n, L, H, dtype=torch.float64)
    gd = torch.zeros(plan.n, L, H, dtype=torch.float64) if config.graddrop else None
    nodes = {name: torch.zeros(plan.n, L, H, dtype=torch.float64) for name in QK_SCORES} if config.qk_fix else {}
    m_base_all = torch.zeros(plan.n, dtype=torch.float64)
    m_src_all = torch.zeros(plan.n, dtype=torch.float64)
    sign = 1.0 if plan.direction == "denoise" else -1.0
    with prec.autocast(lm.dtype):
        qk_means = None
        if config.corruption == "mean":
            plan.compute_means(progress)
            qk_means = qk_node_means(lm, plan, progress) if config.qk_fix else None
        for idx in tqdm(plan.batches, desc="attribution patching", disable=not progress, leave=False):
            base, base_noise, src, src_noise, src_plen = plan.base_and_source(idx)
            m_src, src_acts, src_qk = _source_run(lm, src, src_noise, config.qk_fix)
            m_src_all[idx] = m_src if m_src is not None else float("nan")
            rows, tb, ts = patch_positions(base, src_plen, config.positions)
            B = len(idx)
            pair_of = rows % B  # rows are chosen 0..B-1 then rejected B..2B-1
            src_vals = [source_values(plan, l, src_acts, rows, ts).to(lm.device) for l in range(L)]
            qk_src = _qk_source(src_qk, qk_means, rows, ts, lm.device) if config.qk_fix else None
            out = _attribute(lm, base, base_noise, rows, tb, src_vals, pair_of, B, config.graddrop, qk_src,
                             config.tokens_per_forward)
            m_base_all[idx] = out["m"]
            per[idx] = sign * out["atp"]
            if gd is not None:
                gd[idx] = out["graddrop"]
            for name, v in nodes.items():
                v[idx] = sign * out[name]
    meta = run_meta(lm, plan, prec, "attribution", m_base_all, m_src_all)
    record_stability(meta, per, config.top_k, config.rank_by, config.pair_seed)
    meta["qk_fix"] = QK_META_ON if config.qk_fix else QK_META_OFF
    extra = {"graddrop": gd.mean(0).float()} if gd is not None else {}
    extra.update({name: v.mean(0).float() for name, v in nodes.items()})
    return HeadEffects.from_per_example(per, "attribution", meta, extra, keep=config.keep_per_example)


# ---------------------------------------------------------------------------------------------- source runs
@contextmanager
def _qk_outputs(sites, store: dict) -> Iterator[None]:
    """Keep every layer's q_proj and k_proj output (as returned, graph kept) in store[("q" | "k", l)]."""
    def keep(key: NodeKey):
        def fn(_inp, out) -> None:
            store[key] = out
        return fn

    fns = {(mod, l): keep((kind, l)) for l in range(sites.n_layers) for kind, mod in (("q", "q_proj"), ("k", "k_proj"))}
    with module_hooks(sites, fns):
        yield


def capture_heads_qk(lm, batch, noise: Tensor | None = None) -> tuple[Tensor, list[Tensor], dict[NodeKey, Tensor]]:
    """One no-grad forward: (m per pair Float64[B], per layer the o_proj input Float[Tensor, "2B T HD"], and
    per (kind, layer) the q_proj / k_proj output Float[Tensor, "2B T out"], float32)."""
    L, R = lm.sites.n_layers, len(batch)
    store: dict = {}
    with torch.no_grad(), capture(lm.sites, "heads", range(L), dtype=torch.float32) as cap, \
            _qk_outputs(lm.sites, store), embedding_hook(lm, noise):
        cap.set_batch(batch=R)
        m = pair_metric(lm.model, batch.to(lm.device))
    return m.cpu(), [cap.values[l] for l in range(L)], {k: as_3d(v, R).float() for k, v in store.items()}


def _source_run(lm, src, src_noise, qk: bool):
    """(m, head outputs, q/k outputs | None) of the source run; (None, None, None) without one (mean)."""
    if src is None:
        return None, None, None
    if not qk:
        m, acts = capture_heads(lm, src, src_noise)
        return m, acts, None
    return capture_heads_qk(lm, src, src_noise)


def qk_node_means(lm, plan: PatchPlan, progress: bool = False) -> dict[NodeKey, Float[Tensor, "out"]]:
    """Every layer's q_proj / k_proj output averaged over the patched positions of the selected pairs'
    clean runs (the source of corruption 'mean', as `PatchPlan.compute_means` for the heads)."""
    total: dict = {}
    count = 0
    for idx in tqdm(plan.batches, desc="q/k means", disable=not progress, leave=False):
        clean = plan.runs.batch(idx)
        _, _, qk = capture_heads_qk(lm, clean)
        rows, tb, _ = patch_positions(clean, None, plan.config.positions)
        for key, v in qk.items():
            s = v[rows.to(v.device), tb.to(v.device)].double().sum(0)
            total[key] = s if key not in total else total[key] + s
        count += int(rows.numel())
    if not count:
        raise DataError("no positions to average over (empty pairs?)")
    return {key: (s / count).float() for key, s in total.items()}


def _qk_source(src_qk, means, rows: Int[Tensor, "P"], ts: Int[Tensor, "P"], device) -> dict[NodeKey, Tensor]:
    """Float[Tensor, "P out"] per (kind, layer): the source value of the q/k outputs at the patched positions."""
    if src_qk is None:
        return {k: m.to(device).unsqueeze(0).expand(rows.numel(), -1) for k, m in means.items()}
    return {k: v[rows.to(v.device), ts.to(v.device)].to(device) for k, v in src_qk.items()}


# ---------------------------------------------------------------------------------------------- AtP
def _attribute(lm, base, base_noise, rows, tb, src_vals, pair_of, B: int, graddrop: bool,
               qk_src: dict | None = None, tokens_per_forward: int = 16384) -> dict:
    """One forward + backward of the base batch: per-pair AtP [B, L, H] (unsigned: grad . (source - base));
    with `graddrop` its GradDrop [B, L, H]; with `qk_src` the unsigned QK_SCORES [B, L, H]."""
    sites = lm.sites
    L = sites.n_layers
    dev = lm.device
    rows_d, tb_d, pair_d = rows.to(dev), tb.to(dev), pair_of.to(dev)
    outs: list[Tensor | None] = [None] * L
    store: dict = {}
    calls: dict = {}
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
        if qk_src is not None:  # the q/k outputs (to differentiate) and each attention call's inputs
            stack.enter_context(_qk_outputs(sites, store))
            calls = stack.enter_context(module_calls(sites, "attention", range(L)))
        stack.enter_context(embedding_hook(lm, base_noise, require_grad=True))
        m = pair_metric(lm.model, base.to(dev))
        total = m.sum()
        keys = list(store)
        grads = torch.autograd.grad(total, outs + [store[k] for k in keys], retain_graph=graddrop)
        atp = lambda gs, layers: _head_atp(gs, outs, src_vals, rows_d, tb_d, pair_d, B, sites, layers)  # noqa: E731
        res = {"m": m.detach().cpu(), "atp": atp(grads, range(L)).cpu()}
        if graddrop:
            res["graddrop"] = _graddrop(total, outs, atp, res["atp"].abs().to(dev), drop, B, L).cpu()
    if qk_src is not None:
        node_grads = dict(zip(keys, grads[L:]))
        res.update(_qk_scores(lm, calls, store, node_grads, list(grads[:L]), qk_src, rows_d, tb_d, pair_d, B,
                              tokens_per_forward))
    return res


def _head_atp(gs, outs, src_vals, rows_d, tb_d, pair_d, B: int, sites, layers) -> Float[Tensor, "B L H"]:
    """Float64[B, L, H]: per pair, grad . (source - base) of every head of `layers` over the patched positions."""
    L, H, D = sites.shape
    R = 2 * B  # the base batch: chosen rows, then rejected rows
    res = torch.zeros(B, L, H, dtype=torch.float64, device=rows_d.device)
    for l in layers:
        g = as_3d(gs[l], R)[rows_d, tb_d].double()  # [P, HD]
        o = as_3d(outs[l], R)[rows_d, tb_d].detach().double()
        dlt = src_vals[l].double() - o
        prod = (g * dlt).view(-1, H, D).sum(-1)  # [P, H]
        res[:, l].index_add_(0, pair_d, prod)
    return res


def _graddrop(total: Tensor, outs, atp, base_abs: Float[Tensor, "B L H"], drop: dict, B: int,
              L: int) -> Float[Tensor, "B L H"]:
    """Float64[B, L, H]: mean over the other layers l' of |AtP| with layer l''s residual contributions'
    gradient zeroed (the grad hooks read drop["layer"])."""
    acc = torch.zeros_like(base_abs)
    for lp in range(L):
        drop["layer"] = lp
        # dropping layer lp changes the gradient of heads below lp only; zero at lp, AtP above
        if lp > 0:
            g2 = torch.autograd.grad(total, outs[:lp], retain_graph=lp < L - 1)
            a2 = atp(list(g2) + [None] * (L - lp), range(lp)).abs()
            acc[:, :lp] += a2[:, :lp]
        acc[:, lp + 1:] += base_abs[:, lp + 1:]
    drop["layer"] = -1
    return acc / max(1, L - 1)


# ---------------------------------------------------------------------------------------------- AtP*'s QK fix
def _qk_scores(lm, calls: dict, store: dict, node_grads: dict, head_grads: list, qk_src: dict, rows_d, tb_d,
               pair_d, B: int, tokens_per_forward: int) -> dict[str, Float[Tensor, "B L H"]]:
    """The unsigned QK_SCORES of every layer's query and key nodes, Float64[B, L, H] each (key nodes
    scored per KV head, shown on the query heads that read it)."""
    sites = lm.sites
    L, H, _ = sites.shape
    R = 2 * B
    out = {name: torch.zeros(B, L, H, dtype=torch.float64) for name in QK_SCORES}
    group = torch.tensor([sites.kv_head(h) for h in range(H)])
    for l in range(L):
        g_heads = as_3d(head_grads[l], R).detach()
        for kind, name in (("q", "query"), ("k", "key")):
            cols = [sites.qk_columns(kind, j) for j in range(H if kind == "q" else sites.n_kv_heads)]
            lin = _node_atp(node_grads[kind, l], store[kind, l], qk_src[kind, l], cols, rows_d, tb_d, pair_d, B)
            fix = _node_fixed(sites, l, calls[l], kind, cols, qk_src[kind, l], g_heads, rows_d, tb_d, pair_d, B,
                              tokens_per_forward)
            if kind == "k":  # per KV head -> every query head that reads it
                lin, fix = lin[:, group.to(lin.device)], fix[:, group.to(fix.device)]
            out[name + "_atp"][:, l] = lin.cpu()
            out[name][:, l] = fix.cpu()
    return out


def _node_atp(g: Tensor, value: Tensor, src: Float[Tensor, "P out"], cols: list[slice], rows_d, tb_d, pair_d,
              B: int) -> Float[Tensor, "B nodes"]:
    """Float64[B, nodes]: per pair, d m / d node . (source - base) over the patched positions, per column slice."""
    R = 2 * B
    g = as_3d(g, R)[rows_d, tb_d].double()  # [P, out]
    v = as_3d(value, R)[rows_d, tb_d].detach().double()
    prod = g * (src.double() - v)
    per = torch.stack([prod[:, c].sum(-1) for c in cols], 1)  # [P, nodes]
    return torch.zeros(B, len(cols), dtype=torch.float64, device=g.device).index_add_(0, pair_d, per)


def _node_fixed(sites, l: int, call: tuple, kind: str, cols: list[slice], src: Float[Tensor, "P out"],
                g_heads: Float[Tensor, "R T HD"], rows_d, tb_d, pair_d, B: int,
                tokens_per_forward: int) -> Float[Tensor, "B nodes"]:
    """Float64[B, nodes]: per pair, sum over all positions of d m / d o . (o' - o), o' = layer l's heads
    site with the node patched (`patched_attention_heads`), o = the same call's unpatched copy."""
    R, T = g_heads.shape[0], g_heads.shape[1]
    K = max(2, min(len(cols) + 1, tokens_per_forward // max(1, R * T)))  # copies per call, one unpatched
    row_pair = torch.arange(R, device=g_heads.device) % B
    res = torch.zeros(B, len(cols), dtype=torch.float64, device=g_heads.device)
    g = g_heads.double()
    for s in range(0, len(cols), K - 1):
        chunk = list(range(s, min(len(cols), s + K - 1)))
        o = patched_attention_heads(sites, l, call, kind, [cols[j] for j in chunk], src, rows_d, tb_d).double()
        prod = ((o[1:] - o[:1]) * g[None]).sum((2, 3))  # [k, R]
        res[:, chunk] = torch.zeros(B, len(chunk), dtype=torch.float64, device=g.device).index_add_(0, row_pair,
                                                                                                    prod.t())
    return res


def _repeat_rows(x, R: int, k: int):
    """x with every tensor of >= 2 dims and R rows (hidden states, masks, per-row position tensors; also
    inside tuples, lists and dicts) stacked k times along its first axis; everything else as is."""
    if isinstance(x, Tensor):
        return x.repeat(k, *([1] * (x.dim() - 1))) if x.dim() >= 2 and x.shape[0] == R else x
    if isinstance(x, (tuple, list)):
        return type(x)(_repeat_rows(v, R, k) for v in x)
    if isinstance(x, dict):
        return {key: _repeat_rows(v, R, k) for key, v in x.items()}
    return x


def patched_attention_heads(sites, layer: int, call: tuple, kind: str, node_cols: Sequence[slice],
                            src: Float[Tensor, "P out"], rows: Int[Tensor, "P"],
                            tb: Int[Tensor, "P"]) -> Float[Tensor, "copies R T HD"]:
    """Layer `layer`'s heads site (o_proj's input) from calling its attention module again on `call` = (args,
    kwargs) of a base forward (`module_calls`), as 1 + len(node_cols) stacked copies: copy 0 unpatched, copy c
    with the columns node_cols[c-1] of the q_proj (kind "q") or k_proj (kind "k") output replaced by `src` at
    the positions (rows, tb). No grad."""
    args, kwargs = call
    k = len(node_cols) + 1
    hidden = args[0] if args else kwargs["hidden_states"]
    R, T = hidden.shape[0], hidden.shape[1]
    got: dict = {}

    def patch(_inp, out: Tensor) -> Tensor:
        v = as_3d(out, k * R).view(k, R, T, -1)
        full = torch.zeros(R, T, v.shape[-1], dtype=v.dtype, device=v.device)
        full[rows, tb] = src.to(device=v.device, dtype=v.dtype)
        where = _node_mask(node_cols, rows, tb, R, T, v.shape[-1]).to(v.device)
        return torch.where(where, full, v).view(out.shape)

    def grab(o: Tensor) -> None:
        got["o"] = o

    module = "q_proj" if kind == "q" else "k_proj"
    with torch.no_grad(), module_hooks(sites, {(module, layer): patch}), site_hooks(sites, {("heads", layer): grab}):
        sites.attention(layer)(*_repeat_rows(args, R, k), **_repeat_rows(kwargs, R, k))
    return as_3d(got["o"], k * R).view(k, R, T, -1)


def _node_mask(node_cols: Sequence[slice], rows: Tensor, tb: Tensor, R: int, T: int,
               width: int) -> Bool[Tensor, "copies R T out"]:
    """Bool[Tensor, "copies R T out"]: copy c (c >= 1) patches the columns node_cols[c-1] at (rows, tb)."""
    cols = torch.zeros(len(node_cols) + 1, width, dtype=torch.bool)
    for c, sl in enumerate(node_cols, 1):
        cols[c, sl] = True
    at = torch.zeros(R, T, dtype=torch.bool)
    at[rows.cpu(), tb.cpu()] = True
    return cols[:, None, None, :] & at[None, :, :, None]


__all__ = ["attribution_patching", "patched_attention_heads", "capture_heads_qk", "qk_node_means", "QK_SCORES",
           "VERSION"]
