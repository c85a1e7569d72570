"""GPT-J's registry card (models/sites.py "gptj") against a hand computation of its block: head h's
output is columns [h*D, (h+1)*D) of out_proj's input (partial rotary, interleaved pairs), attention and
MLP run in parallel from one LayerNorm, and zeroing one head's slice at the heads site changes out_proj's
output by exactly that head's W columns. The generic family tests (conformance, every site, prefix,
export) run gptj through FAMILIES."""

from __future__ import annotations

import math

import pytest
import torch

from locaudit.models import interventions as iv
from locaudit.models.batching import pad_right
from locaudit.models.sites import SITES
from locaudit.models.tiny import tiny_model

TEXTS = ["hello there, world", "hi", "a somewhat longer text here"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm():
    return tiny_model("gptj")


def batch(lm):
    return pad_right([lm.tokenizer(t)["input_ids"] for t in TEXTS], lm.tokenizer.pad_token_id)


def _rotate_every_two(x):  # GPT-J's rotary pairs adjacent dims (2i, 2i+1), not the two halves
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def hand_heads(block, h_in, rotary_dim):
    """Float[B, T, H, D]: each head's attention output, from the block input, by hand (causal, positions
    0..T-1; right padding leaves the real tokens' outputs unchanged)."""
    attn = block.attn
    B, T, _ = h_in.shape
    H = attn.num_attention_heads
    D = attn.head_dim
    x = block.ln_1(h_in)
    q, k, v = (p(x).view(B, T, H, D) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    inv = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    ang = torch.arange(T).float()[:, None] * inv  # [T, rotary_dim/2]
    sin = ang.sin().repeat_interleave(2, -1)[None, :, None, :]
    cos = ang.cos().repeat_interleave(2, -1)[None, :, None, :]

    def rope(t):
        r, rest = t[..., :rotary_dim], t[..., rotary_dim:]
        return torch.cat([r * cos + _rotate_every_two(r) * sin, rest], dim=-1)

    q, k = rope(q), rope(k)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


def test_card():
    spec = SITES["gptj"]
    paths = (spec.layers, spec.o_proj, spec.mlp, spec.mlp_down)
    assert paths == ("transformer.h", "attn.out_proj", "mlp", "mlp.fc_out")
    assert not spec.conv1d and spec.prefix


def test_sites_and_partial_rotary(lm):
    s = lm.sites
    cfg = lm.model.config
    assert s.shape == (3, 4, 8) and s.d_model == 32
    assert 0 < cfg.rotary_dim < s.head_dim  # partial rotary, as GPT-J-6B (64 of 256)
    assert s.o_proj(1) is lm.model.transformer.h[1].attn.out_proj and s.bias(1) is None
    assert s.mlp_down(1) is lm.model.transformer.h[1].mlp.fc_out


def test_head_slices_equal_a_hand_computation(lm):
    """The heads site split into [H, D] is, head by head, the attention computed by hand."""
    s = lm.sites
    ids, mask = batch(lm)
    real = mask.bool()
    with torch.no_grad(), iv.capture(s, "heads", range(s.n_layers), split=True) as heads, \
            iv.capture(s, "resid_pre", range(s.n_layers)) as pre:
        heads.forward(lm.model, ids, mask)
        for l in range(s.n_layers):
            want = hand_heads(s.layer(l), pre.values[l], lm.model.config.rotary_dim)
            assert heads.values[l].shape == want.shape
            torch.testing.assert_close(heads.values[l][real], want[real], rtol=1e-4, atol=1e-5)
            # a different head order would not match: the slices are not interchangeable
            assert not torch.allclose(heads.values[l][real][:, 0], want[real][:, 1], atol=1e-3)


def test_zeroing_one_head_slice(lm):
    """Zeroing head h's slice at the heads site changes out_proj's output by -W[:, slice_h] o_h, and
    nothing else of the layer's input."""
    s = lm.sites
    ids, mask = batch(lm)
    l, h = 1, 2
    cols = s.head_slice(h)
    with torch.no_grad():
        with iv.capture(s, "heads", [l]) as o, iv.capture(s, "attn_out", [l]) as out:
            base = o.forward(lm.model, ids, mask).logits
        zero = torch.zeros_like(o.values[l])
        with iv.replace(s, "heads", {l: zero}, heads={l: [h]}), iv.capture(s, "heads", [l]) as o2, \
                iv.capture(s, "attn_out", [l]) as out2:
            ablated = o2.forward(lm.model, ids, mask).logits
    W = s.weight(l).detach()
    assert torch.equal(o2.values[l][..., cols], torch.zeros_like(o2.values[l][..., cols]))
    keep = torch.ones(s.n_heads * s.head_dim, dtype=torch.bool)
    keep[cols] = False
    assert torch.equal(o2.values[l][..., keep], o.values[l][..., keep])  # other heads: same input
    torch.testing.assert_close(out2.values[l], out.values[l] - o.values[l][..., cols] @ W[:, cols].T,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out2.values[l], o2.values[l] @ W.T, rtol=1e-5, atol=1e-5)  # no bias
    assert not torch.allclose(ablated, base)


def test_parallel_block_sums_its_sites(lm):
    """resid_post = resid_pre + attn_out + mlp_out, both branches read ln_1(resid_pre); mlp_in is
    act(fc_in(ln_1(resid_pre)))."""
    s = lm.sites
    ids, mask = batch(lm)
    L = range(s.n_layers)
    with torch.no_grad(), iv.capture(s, "resid_pre", L) as pre, iv.capture(s, "resid_post", L) as post, \
            iv.capture(s, "attn_out", L) as att, iv.capture(s, "mlp_out", L) as mlp, \
            iv.capture(s, "mlp_in", L) as mid:
        pre.forward(lm.model, ids, mask)
        for l in L:
            block = s.layer(l)
            torch.testing.assert_close(post.values[l], pre.values[l] + att.values[l] + mlp.values[l],
                                       rtol=1e-5, atol=1e-5)
            x = block.ln_1(pre.values[l])
            torch.testing.assert_close(mid.values[l], block.mlp.act(block.mlp.fc_in(x)), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(mlp.values[l], block.mlp(x), rtol=1e-5, atol=1e-5)
