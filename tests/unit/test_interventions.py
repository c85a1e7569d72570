"""The intervention layer (models/interventions.py, models/surgery.py): every site on every registered
family, capture/add/replace/grad_capture against independent computations, hooks always removed."""

from __future__ import annotations

import pytest
import torch

from locaudit.errors import ConfigError, UnsupportedModelError
from locaudit.models import interventions as iv
from locaudit.models.batching import pad_right
from locaudit.models.sites import SITES
from locaudit.models.surgery import PREFIX_FAMILIES, capture_input, prefix_supported
from locaudit.models.tiny import FAMILIES, tiny_model

TEXTS = ["hello there, world", "hi", "a somewhat longer text here"]


def batch(lm):
    ids = [lm.tokenizer(t)["input_ids"] for t in TEXTS]
    return pad_right(ids, lm.tokenizer.pad_token_id)


def no_hooks(lm) -> bool:
    """No locaudit hook is left (transformers 5 installs its own output-recording hooks: ignored)."""
    return not [fn for m in lm.model.modules() for d in (m._forward_hooks, m._forward_pre_hooks)
                for fn in d.values() if getattr(fn, "__module__", "").startswith("locaudit")]


def test_every_registered_family_is_built_tiny():
    assert set(FAMILIES) == set(SITES) and len(FAMILIES) == len(SITES)
    assert "gemma3_text" in FAMILIES
    assert set(PREFIX_FAMILIES) <= set(SITES)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_site_on_every_family(family):
    """Shapes of every site; residual sites equal HF's hidden_states (an independent read)."""
    lm = tiny_model(family)
    s = lm.sites
    ids, mask = batch(lm)
    B, T = ids.shape
    L = s.n_layers
    with torch.no_grad():
        ref = lm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        for site in iv.SITE_NAMES:
            if site == "mlp_in" and SITES[family].mlp_down is None:
                with pytest.raises(UnsupportedModelError):
                    iv.site_module(s, site, 0)
                continue
            with iv.capture(s, site, range(L)) as cap:
                out = cap.forward(lm.model, ids, mask)
            assert torch.equal(out.logits, ref.logits)  # reading changes nothing
            for l in range(L):
                v = cap.values[l]
                assert v.shape[:2] == (B, T)
                if site == "heads":
                    assert v.shape[-1] == s.n_heads * s.head_dim
                elif site != "mlp_in":
                    assert v.shape[-1] == s.d_model
            if site == "resid_pre":
                for l in range(L):
                    torch.testing.assert_close(cap.values[l], ref.hidden_states[l])
            if site == "resid_post":
                for l in range(L - 1):  # the last entry of hidden_states has the final norm applied
                    torch.testing.assert_close(cap.values[l], ref.hidden_states[l + 1])
    assert no_hooks(lm)
    assert prefix_supported(lm) == SITES[family].prefix


def test_positions_last_and_indices_gather_the_all_positions_values():
    lm = tiny_model("llama")
    ids, mask = batch(lm)
    with torch.no_grad():
        with iv.capture(lm.sites, "heads", [0, 2], split=True) as cap:
            cap.forward(lm.model, ids, mask)
            full = dict(cap.values)
        with iv.capture(lm.sites, "heads", [0, 2], "last", split=True) as cap:
            cap.forward(lm.model, ids, mask)
            last = dict(cap.values)
        idx = torch.tensor([1, 0, 3])
        with iv.capture(lm.sites, "heads", [2], idx) as cap:
            cap.forward(lm.model, ids, mask)
            at = cap.values[2]
    lens = mask.sum(1) - 1
    for l in (0, 2):
        assert full[l].shape[-2:] == (4, 8)
        torch.testing.assert_close(last[l], full[l][torch.arange(3), lens])
    torch.testing.assert_close(at, full[2].flatten(-2)[torch.arange(3), idx])


def test_stop_ends_the_forward_after_the_deepest_layer():
    lm = tiny_model("qwen2")
    ids, mask = batch(lm)
    calls = []
    h = lm.model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad(), iv.capture(lm.sites, "resid_post", [0, 1], stop=True) as cap:
            assert cap.forward(lm.model, ids, mask) is None
            assert set(cap.values) == {0, 1}
        with torch.no_grad(), capture_input(lm, 2) as cap:
            assert cap.forward(lm.model, ids, mask) is None
            assert cap.values[2].shape == (3, ids.shape[1], lm.sites.d_model)
    finally:
        h.remove()
    assert not calls and no_hooks(lm)


def test_add_equals_the_o_proj_bias_shift():
    """Adding v to the heads site equals adding W v to o_proj's bias (independent: weights, no hook)."""
    lm = tiny_model("gpt2", with_bias=True)
    ids, mask = batch(lm)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(lm.sites.n_heads * lm.sites.head_dim, generator=g)
    with torch.no_grad():
        with iv.add(lm.sites, "heads", {1: v}):
            hooked = lm.model(input_ids=ids, attention_mask=mask).logits
        bias = lm.sites.bias(1)
        saved = bias.clone()
        bias += lm.sites.weight(1) @ v
        try:
            baked = lm.model(input_ids=ids, attention_mask=mask).logits
        finally:
            bias.copy_(saved)
        plain = lm.model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(hooked, baked, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(hooked, plain)
    assert no_hooks(lm)


def test_add_at_one_position_per_row_changes_only_later_tokens():
    lm = tiny_model("llama")
    ids, mask = batch(lm)
    pos = torch.tensor([2, 0, 5])
    d = torch.ones(lm.sites.d_model) * 3
    with torch.no_grad():
        plain = lm.model(input_ids=ids, attention_mask=mask).logits
        with iv.add(lm.sites, "resid_post", {0: d}, positions=pos):
            moved = lm.model(input_ids=ids, attention_mask=mask).logits
    for r in range(3):
        p = int(pos[r])
        torch.testing.assert_close(moved[r, :p], plain[r, :p])  # causal: earlier tokens untouched
        assert not torch.allclose(moved[r, p], plain[r, p])


def test_replace_patches_chosen_heads_from_another_run():
    lm = tiny_model("llama")
    s = lm.sites
    ids, mask = batch(lm)
    other = torch.roll(ids, 1, dims=1)
    with torch.no_grad():
        with iv.capture(s, "heads", [1]) as cap:
            cap.forward(lm.model, other, mask)
            src = cap.values[1]
        with iv.capture(s, "heads", [1]) as cap:
            cap.forward(lm.model, ids, mask)
            mine = cap.values[1]
        # replace first, then capture: the capture sees the patched value in the same forward
        with iv.replace(s, "heads", {1: src}, heads={1: [2]}), iv.capture(s, "heads", [1]) as cap:
            cap.forward(lm.model, ids, mask)
            patched = cap.values[1]
        # the full site replaced: o_proj's output is the other run's attention output
        with iv.capture(s, "attn_out", [1]) as cap:
            cap.forward(lm.model, other, mask)
            other_attn = cap.values[1]
        with iv.replace(s, "heads", {1: src}), iv.capture(s, "attn_out", [1]) as cap:
            cap.forward(lm.model, ids, mask)
            patched_attn = cap.values[1]
        plain = lm.model(input_ids=ids, attention_mask=mask).logits
    D = s.head_dim
    torch.testing.assert_close(patched[..., 2 * D: 3 * D], src[..., 2 * D: 3 * D])
    torch.testing.assert_close(patched[..., : 2 * D], mine[..., : 2 * D])
    torch.testing.assert_close(patched[..., 3 * D:], mine[..., 3 * D:])
    torch.testing.assert_close(patched_attn, other_attn)
    with torch.no_grad():  # replacing a run's heads by its own values is the identity
        with iv.capture(s, "heads", [0]) as cap:
            cap.forward(lm.model, ids, mask)
        with iv.replace(s, "heads", {0: cap.values[0]}):
            same = lm.model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(same, plain)
    assert no_hooks(lm)


def test_replace_at_positions_and_bad_inputs():
    lm = tiny_model("gpt_neox")
    s = lm.sites
    ids, mask = batch(lm)
    pos = torch.tensor([1, 1, 1])
    with torch.no_grad():
        with iv.capture(s, "mlp_out", [0], pos) as cap:
            cap.forward(lm.model, ids, mask)
        src = cap.values[0] + 1.0
        with iv.replace(s, "mlp_out", {0: src}, positions=pos), iv.capture(s, "mlp_out", [0]) as cap2:
            cap2.forward(lm.model, ids, mask)
    torch.testing.assert_close(cap2.values[0][:, 1], src)
    with pytest.raises(ConfigError, match="heads="):
        with iv.replace(s, "mlp_out", {0: src}, heads={0: [1]}):
            pass
    with pytest.raises(ConfigError, match="unknown site"):
        iv.site_module(s, "nowhere", 0)
    with pytest.raises(ConfigError, match="source shape"):
        with torch.no_grad(), iv.replace(s, "heads", {0: torch.zeros(1, 1, 32)}):
            lm.model(input_ids=ids, attention_mask=mask)
    assert no_hooks(lm)


def test_grad_capture_matches_the_chain_rule_through_o_proj():
    """d loss / d heads = W^T (d loss / d attn_out): two sites' grads from one backward."""
    lm = tiny_model("llama", with_bias=True)
    s = lm.sites
    ids, mask = batch(lm)
    with iv.grad_capture(s, "heads", [0, 2]) as gh, iv.grad_capture(s, "attn_out", [0, 2]) as ga:
        logits = lm.model(input_ids=ids, attention_mask=mask).logits
        loss = logits.log_softmax(-1)[..., 5].sum()
        loss.backward()
    for l in (0, 2):
        assert gh.values[l].shape == gh.grads[l].shape
        assert gh.grads[l].abs().sum() > 0
        torch.testing.assert_close(gh.grads[l], ga.grads[l] @ s.weight(l), rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in lm.model.parameters())
    assert no_hooks(lm)


def test_grad_capture_against_autograd_on_a_leaf():
    """The same gradient from an independent route: run the layers above by hand from a leaf input."""
    lm = tiny_model("gpt2")
    s = lm.sites
    ids, mask = batch(lm)
    with iv.grad_capture(s, "resid_pre", [2]) as g:
        out = lm.model(input_ids=ids, attention_mask=mask).logits
        out[:, -1].logsumexp(-1).sum().backward()
    with torch.no_grad(), iv.capture(s, "resid_pre", [2]) as cap:
        cap.forward(lm.model, ids, mask)
    x = cap.values[2].clone().requires_grad_(True)
    with iv.replace(s, "resid_pre", {2: x}):
        out2 = lm.model(input_ids=ids, attention_mask=mask).logits
    out2[:, -1].logsumexp(-1).sum().backward()
    torch.testing.assert_close(g.grads[2], x.grad, rtol=1e-5, atol=1e-7)


def test_hooks_removed_on_error_for_every_primitive():
    lm = tiny_model("opt")
    s = lm.sites
    v = torch.zeros(s.n_heads * s.head_dim)
    managers = [lambda: iv.capture(s, "heads", [0]), lambda: iv.add(s, "heads", {0: v}),
                lambda: iv.replace(s, "attn_out", {0: torch.zeros(1)}), lambda: iv.grad_capture(s, "mlp_out", [1])]
    for make in managers:
        with pytest.raises(RuntimeError, match="boom"):
            with make():
                raise RuntimeError("boom")
        assert no_hooks(lm)


def test_one_dtype_map():
    from locaudit.models.dtypes import DTYPE_CHOICES, dtype_name, torch_dtype

    for name in DTYPE_CHOICES:
        assert dtype_name(torch_dtype(name)) == dtype_name(name)
    assert torch_dtype("bfloat16") is torch.bfloat16 and torch_dtype(None) is torch.float32
    assert dtype_name(torch.float16) == "fp16" and dtype_name("torch.float32") == "fp32"
    with pytest.raises(ConfigError, match="fp32"):
        dtype_name("int8")


def test_batching_helpers():
    from types import SimpleNamespace

    from locaudit.models.batching import add_special_tokens_for, pad_right_tensors

    a, b = torch.ones(2, 3), torch.full((4, 3), 2.0)
    out = pad_right_tensors([a, b])
    assert out.shape == (2, 4, 3) and torch.equal(out[0, :2], a) and not out[0, 2:].any()
    assert pad_right_tensors([a], 5, torch.float64).dtype == torch.float64
    with pytest.raises(ValueError):
        pad_right_tensors([b], 2)
    from locaudit.models.batching import pad_left

    ids, mask = pad_left([[5, 6, 7], [8]], pad=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pad_left([[], [1]], pad=9, length=3)[0].tolist() == [[9, 9, 9], [9, 9, 1]]
    tok = SimpleNamespace(bos_token="<bos>")
    assert not add_special_tokens_for(SimpleNamespace(kind="chat"), tok, "<bos>hi")
    assert add_special_tokens_for(SimpleNamespace(kind="plain"), tok, "<bos>hi")
    assert add_special_tokens_for(SimpleNamespace(kind="chat"), tok, "hi")


def test_edit_registry(tmp_path):
    from locaudit.edit.base import NoEdit, edit_kinds, load_edit, register_edit

    assert set(edit_kinds()) >= {"none", "iti", "lora"}
    NoEdit().save(tmp_path / "n")
    assert isinstance(load_edit(tmp_path / "n"), NoEdit)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "meta.json").write_text('{"kind": "steering-wheel"}')
    with pytest.raises(ConfigError, match="unknown edit kind 'steering-wheel'.*'iti'"):
        load_edit(tmp_path / "x")
    with pytest.raises(TypeError, match="save"):
        register_edit("broken")(type("Broken", (), {"applied": lambda s, lm: None, "describe": lambda s: {}}))
    with pytest.raises(ConfigError, match="already registered"):
        register_edit("iti")(type("Other", (NoEdit,), {}))
