"""The whole-model sites (embed, final) and the primitives for per-copy patching, gradient hooks and
module (input, output) hooks of models/interventions.py, each against a hand-written hook."""

from __future__ import annotations

import pytest
import torch

from locaudit.errors import ConfigError
from locaudit.models import interventions as iv
from locaudit.models.batching import pad_right
from locaudit.models.tiny import tiny_model

TEXTS = ["hello there, world", "hi", "a somewhat longer text here"]
FAMILIES = ["llama", "qwen2", "gpt2", "gpt_neox"]

pytestmark = pytest.mark.usefixtures("one_thread")


def batch(lm):
    return pad_right([lm.tokenizer(t)["input_ids"] for t in TEXTS], lm.tokenizer.pad_token_id)


def no_hooks(lm) -> bool:
    return not [fn for m in lm.model.modules() for d in (m._forward_hooks, m._forward_pre_hooks)
                for fn in d.values() if getattr(fn, "__module__", "").startswith("locaudit")]


@pytest.mark.parametrize("family", FAMILIES)
def test_embed_noise_via_the_site_equals_a_hand_hook(family):
    lm = tiny_model(family, with_bias=True)
    ids, mask = batch(lm)
    noise = torch.randn(*ids.shape, lm.sites.d_model, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h = lm.model.get_input_embeddings().register_forward_hook(lambda m, a, out: out + noise)
        try:
            ref = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        finally:
            h.remove()
        with iv.site_hooks(lm.sites, {("embed", 0): lambda x: x + noise}):
            got = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        with iv.add(lm.sites, "embed", {0: noise}):
            added = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        plain = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert torch.equal(got, ref) and torch.equal(added, ref)
    assert not torch.allclose(plain, ref)
    assert no_hooks(lm)


@pytest.mark.parametrize("family", FAMILIES)
def test_final_capture_is_the_lm_head_input_and_the_last_hidden_state(family):
    lm = tiny_model(family)
    ids, mask = batch(lm)
    seen = {}
    with torch.no_grad():
        h = lm.model.get_output_embeddings().register_forward_pre_hook(lambda m, a: seen.__setitem__("h", a[0]))
        try:
            ref = lm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        finally:
            h.remove()
        with iv.capture(lm.sites, "final", [0]) as cap:
            out = cap.forward(lm.model, ids, mask)
        assert torch.equal(out.logits, ref.logits)
        torch.testing.assert_close(cap.values[0], seen["h"], rtol=0, atol=0)
        torch.testing.assert_close(cap.values[0], ref.hidden_states[-1])  # HF's last entry: after the final norm
        with iv.capture(lm.sites, "final", [0], "last", stop=True) as cap:
            assert cap.forward(lm.model, ids, mask) is None  # the LM head never ran
        last = mask.sum(1) - 1
        torch.testing.assert_close(cap.values[0], seen["h"][torch.arange(len(ids)), last])
    assert lm.sites.lm_head() is lm.model.get_output_embeddings()
    assert no_hooks(lm)


def test_whole_model_sites_exist_at_layer_zero_only():
    lm = tiny_model("llama")
    assert iv.site_module(lm.sites, "embed", 0) is lm.model.get_input_embeddings()
    assert iv.site_module(lm.sites, "final", 0) is lm.model.get_output_embeddings()
    for site in iv.MODEL_SITE_NAMES:
        with pytest.raises(ConfigError, match="layer 0 only"):
            iv.site_module(lm.sites, site, 1)
    with pytest.raises(ConfigError, match="embed, final"):
        iv.site_module(lm.sites, "nowhere", 0)
    with pytest.raises(ConfigError):
        iv.hook_module(lm.sites, "nowhere", 0)


def _hand_patch(lm, ids, mask, layer, head, src, at):
    """Logits with head `head` of `layer` patched from src at the positions `at` (Bool[B, T]), by hand."""
    cols = lm.sites.head_slice(head)

    def pre(m, a):
        o = a[0].clone()
        o[at, cols] = src[at][:, cols].to(o.dtype)
        return (o, *a[1:])

    h = lm.sites.o_proj(layer).register_forward_pre_hook(pre)
    try:
        return lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    finally:
        h.remove()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_per_copy_head_patching_equals_patching_each_copy_alone(family):
    lm = tiny_model(family, with_bias=True)
    s = lm.sites
    ids, mask = batch(lm)
    B, T = ids.shape
    other = ids.flip(0) * mask  # another run of the same shape, its heads-site values the sources
    with torch.no_grad(), iv.capture(s, "heads", range(s.n_layers)) as cap:
        cap.forward(lm.model, other, mask)
    src = cap.values
    g = torch.Generator().manual_seed(3)
    at = (torch.rand(B, T, generator=g) < 0.5) & mask.bool()  # the patched positions of every copy
    copies = [(0, 1), (0, 3), (2, 0), (1, 2), (2, 2)]  # (layer, head) patched by copy c
    k = len(copies)
    layers = sorted({l for l, _ in copies})
    masks = {l: iv.head_mask(s, [[h] if hl == l else [] for hl, h in copies])[:, None, None, :]
             & at[None, :, :, None] for l in layers}
    with torch.no_grad():
        with iv.replace(s, "heads", {l: src[l] for l in layers}, mask=masks, copies=k):
            stacked = lm.model(input_ids=ids.repeat(k, 1), attention_mask=mask.repeat(k, 1), use_cache=False).logits
        for c, (l, h) in enumerate(copies):
            ref = _hand_patch(lm, ids, mask, l, h, src[l], at)
            torch.testing.assert_close(stacked[c * B: (c + 1) * B], ref, rtol=1e-5, atol=1e-5)
        # a per-row column mask over every position equals replace(heads=...)
        full = {0: iv.head_mask(s, [[1]] * B)[:, None, :].expand(B, T, -1)}
        with iv.replace(s, "heads", {0: src[0]}, mask=full):
            one = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        with iv.replace(s, "heads", {0: src[0]}, heads={0: [1]}):
            by_heads = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert torch.equal(one, by_heads)
    assert no_hooks(lm)


def test_replace_mask_checks_its_arguments():
    lm = tiny_model("llama")
    s = lm.sites
    ids, mask = batch(lm)
    src = torch.zeros(*ids.shape, s.n_heads * s.head_dim)
    m = torch.ones_like(src, dtype=torch.bool)
    with pytest.raises(ConfigError):
        with iv.replace(s, "heads", {0: src}, mask={0: m}, heads={0: [1]}):
            pass
    with pytest.raises(ConfigError):
        with iv.replace(s, "heads", {0: src}, mask={1: m}):
            pass
    with pytest.raises(ConfigError):
        with iv.replace(s, "heads", {0: src}, copies=2):
            pass
    with pytest.raises(ConfigError, match="stacked copies"), torch.no_grad():
        with iv.replace(s, "heads", {0: src}, mask={0: m}, copies=2):
            lm.model(input_ids=ids, attention_mask=mask, use_cache=False)
    assert no_hooks(lm)


def test_grad_hooks_change_the_gradient_not_the_forward():
    """Doubling the gradient at the last layer's output doubles every gradient below it; zeroing the
    attention and MLP outputs' gradients of every layer leaves the residual path (identity) only."""
    lm = tiny_model("llama")
    s = lm.sites
    ids, mask = batch(lm)
    L = s.n_layers

    def run(fns):
        with iv.grad_capture(s, "embed", [0]) as g, iv.grad_hooks(s, fns):
            logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            logits.float().logsumexp(-1).sum().backward()
        return logits.detach(), g.grads[0]

    base_logits, base = run({})
    logits, doubled = run({("resid_post", L - 1): lambda grad: 2 * grad})
    assert torch.equal(logits, base_logits)
    torch.testing.assert_close(doubled, 2 * base)
    _, residual = run({(site, l): torch.zeros_like for l in range(L) for site in ("attn_out", "mlp_out")})
    with iv.grad_capture(s, "resid_post", [L - 1]) as g:
        lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float().logsumexp(-1).sum().backward()
    torch.testing.assert_close(residual, g.grads[L - 1])
    assert no_hooks(lm)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_module_hooks_pass_input_and_output(family):
    lm = tiny_model(family, with_bias=True)
    s = lm.sites
    ids, mask = batch(lm)
    seen = {}

    def keep(name):
        def fn(x, out):
            seen[name] = (x, out)
        return fn

    with torch.no_grad():
        with iv.module_hooks(s, {("o_proj", 1): keep("o_proj"), ("layer", 1): keep("layer")}), \
                iv.capture(s, "resid_post", [1]) as post, iv.capture(s, "resid_pre", [1]) as pre:
            ref = post.forward(lm.model, ids, mask).logits
        x, out = seen["o_proj"]
        torch.testing.assert_close(out, x @ s.weight(1).T + s.bias(1), rtol=1e-5, atol=1e-5)
        assert torch.equal(seen["layer"][0], pre.values[1]) and torch.equal(seen["layer"][1], post.values[1])
        # a replacement output: adding d through the o_proj output equals the attn_out site's add
        d = torch.randn(s.d_model, generator=torch.Generator().manual_seed(2))
        with iv.module_hooks(s, {("o_proj", 1): lambda x, out: out + d}):
            got = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        with iv.add(s, "attn_out", {1: d}):
            want = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert torch.equal(got, want) and not torch.allclose(got, ref)
    assert no_hooks(lm)
