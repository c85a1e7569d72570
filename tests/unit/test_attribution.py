"""Attribution patching (localize/attribution.py) against an exact gradient product computed by hand.

The reference runs one sequence at a time, adds a zero perturbation z_l (requires grad) to every
layer's o_proj input with plain pre-hooks, and differentiates the pair's metric with autograd w.r.t.
z_l: d m / d z_l = d m / d o_l. GradDrop's reference detaches layer l''s attention and MLP outputs in
the forward pass instead of zeroing gradients in the backward pass.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from locaudit.data.types import PreferencePair
from locaudit.localize.agreement import agreement
from locaudit.localize.attribution import attribution_patching
from locaudit.localize.corruptions import PatchingConfig, prompt_noise
from locaudit.localize.patching import activation_patching
from locaudit.models.tiny import tiny_model
from locaudit.models.precision import resolve_precision as _P  # resolved once, as entry points do

PAIRS = [PreferencePair(f"q{i}", f"Name {i} colours.", f"Red and {'blue' * (i + 1)}.", f"No {i}") for i in range(3)]


pytestmark = pytest.mark.usefixtures("one_thread")


def PC(**kw) -> PatchingConfig:
    """The configs these references are written for: noise or the given corruption, patched at every position
    (the defaults are contrast at the completion positions); position 0 is never noised (as the default)."""
    return PatchingConfig(**{"corruption": "noise", "positions": "all", **kw})


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm(request):
    return tiny_model(request.param, with_bias=True)


def _tokens(tok, question, answer):
    return list(tok(f"Q: {question}\nA:")["input_ids"]), list(tok(f" {answer}", add_special_tokens=False)["input_ids"])


def _run(lm, p, c, noise=None, z=None, detach_layer=None, capture=None):
    """Mean completion log-prob of one sequence; z[l] is added to layer l's o_proj input; `capture` gets the
    o_proj inputs; `detach_layer` cuts the gradient through that layer's attention and MLP outputs."""
    sites = lm.sites
    handles = []
    for l in range(sites.n_layers):
        def pre(m, a, l=l):
            o = a[0]
            if capture is not None:
                capture[l] = o.detach().clone()
            return ((o + z[l]),) + tuple(a[1:]) if z is not None else None
        handles.append(sites.o_proj(l).register_forward_pre_hook(pre))
    if detach_layer is not None:
        for mod in (sites.o_proj(detach_layer), sites.mlp(detach_layer)):
            handles.append(mod.register_forward_hook(lambda m, a, out: out.detach()))
    if noise is not None:
        handles.append(lm.model.get_input_embeddings().register_forward_hook(lambda m, a, out: out + noise))
    try:
        logits = lm.model(input_ids=torch.tensor([p + c])).logits[0].double()
    finally:
        for h in handles:
            h.remove()
    lp = F.log_softmax(logits, -1)
    return sum(lp[len(p) - 1 + j, c[j]] for j in range(len(c))) / len(c)


def _reference(lm, corruption: str, drop: int | None = None) -> torch.Tensor:
    """Float64[n, L, H]: sign * sum_t grad . (source - base), positions 'all'."""
    sites, tok = lm.sites, lm.tokenizer
    L, H, D = sites.shape
    emb = lm.model.get_input_embeddings()
    seqs = [(_tokens(tok, q.question, q.chosen), _tokens(tok, q.question, q.rejected)) for q in PAIRS]
    with torch.no_grad():
        sigma = float(emb(torch.tensor(sorted({t for (p, _), _ in seqs for t in p}))).std())
        if corruption == "mean":
            caps = []
            for pair in seqs:
                for p, c in pair:
                    cap = {}
                    _run(lm, p, c, capture=cap)
                    caps.append(cap)
            means = [torch.cat([cap[l][0] for cap in caps]).mean(0) for l in range(L)]
    out = torch.zeros(len(PAIRS), L, H, dtype=torch.float64)
    for i, pair in enumerate(seqs):
        for s, (p, c) in enumerate(pair):
            T = len(p) + len(c)
            noise = None
            if corruption == "noise":
                noise = torch.zeros(1, T, sites.d_model)
                noise[0, 1: len(p)] = prompt_noise(i, len(p), sites.d_model, 0)[1:] * 3.0 * sigma  # pos 0 clean
            z = [torch.zeros(1, T, H * D, requires_grad=True) for _ in range(L)]
            base = {}
            m = _run(lm, p, c, noise=noise, z=z, detach_layer=drop, capture=base)
            grads = torch.autograd.grad(m * (1 if s == 0 else -1), z, allow_unused=True)
            with torch.no_grad():
                clean = {}
                if corruption == "noise":
                    _run(lm, p, c, capture=clean)
            for l in range(L):
                if grads[l] is None:
                    continue
                src = clean[l] if corruption == "noise" else means[l].expand(1, T, -1)
                prod = (grads[l].double() * (src - base[l]).double())[0].view(T, H, D).sum((0, 2))
                out[i, l] += prod if corruption == "noise" else -prod  # denoise: +, noise: -
    return out


@pytest.mark.parametrize("corruption", ["noise", "mean"])
def test_attribution_equals_exact_gradient_product(lm, corruption):
    got = attribution_patching(lm, PAIRS, PC(corruption=corruption, batch_pairs=2), progress=False, precision=_P('fp32'))
    ref = _reference(lm, corruption)
    assert got.per_example.abs().max() > 1e-3
    assert torch.allclose(got.per_example.double(), ref, atol=1e-5, rtol=1e-5), \
        float((got.per_example.double() - ref).abs().max())


def test_graddrop_equals_forward_detached_reference(lm):
    got = attribution_patching(lm, PAIRS, PC(graddrop=True), progress=False, precision=_P('fp32'))
    L = lm.sites.n_layers
    per_drop = [_reference(lm, "noise", drop=lp).abs() for lp in range(L)]
    ref = torch.zeros_like(per_drop[0])
    for l in range(L):
        ref[:, l] = sum(per_drop[lp][:, l] for lp in range(L) if lp != l) / (L - 1)
    assert torch.allclose(got.extra["graddrop"].double(), ref.mean(0), atol=1e-5, rtol=1e-5)
    # dropping the last layer's contributions leaves the last layer's heads at their plain AtP (drop >= own layer)
    assert torch.allclose(got.extra["graddrop"][L - 1].double(), got.per_example[:, L - 1].abs().double().mean(0),
                          atol=1e-6)


def test_zero_noise_gives_zero_and_small_noise_matches_patching(lm):
    zero = attribution_patching(lm, PAIRS, PC(noise_scale=0.0), progress=False, precision=_P('fp32'))
    assert zero.per_example.abs().max() == 0.0
    cfg = PC(noise_scale=0.01)  # first order is exact as the patch shrinks
    atp = attribution_patching(lm, PAIRS, cfg, progress=False, precision=_P('fp32'))
    act = activation_patching(lm, PAIRS, cfg, progress=False, precision=_P('fp32'))
    scale = float(act.effect.abs().max())
    assert scale > 0
    assert float((atp.effect - act.effect).abs().max()) < 0.05 * scale
    assert agreement(atp.effect.abs(), act.effect.abs(), k=4)["spearman"] > 0.95


def test_attribution_meta_says_what_was_skipped(lm):
    eff = attribution_patching(lm, PAIRS[:2], PC(corruption="mean"), progress=False, precision=_P('fp32'))
    assert "not applicable" in eff.meta["qk_fix"] and eff.method == "attribution"
    assert eff.meta["direction"] == "noise" and eff.n == 2
