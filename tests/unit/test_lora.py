"""Invariants of the head-masked LoRA edit on tiny random models (edit/lora.py)."""

from __future__ import annotations

import pytest
import torch

from locaudit.edit.base import load_edit
from locaudit.edit.lora import LoRAEdit, build_stack, edit_masks, init_params
from locaudit.errors import ConfigError, DataError
from locaudit.heads import HeadSet
from locaudit.models.hooks import o_proj_hooks
from locaudit.models.tiny import tiny_model


def _ids(lm, n=3, T=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 250, (n, T), generator=g)


def _logits(lm, ids):
    with torch.no_grad():
        return lm.model(input_ids=ids, use_cache=False).logits


def _random_edit(lm, heads, rank=1, reparam=True, seed=1, scale=0.5):
    """An edit with random non-zero a and b (masked to `heads`)."""
    g = torch.Generator().manual_seed(seed)
    a_mask, b_mask = edit_masks(lm.sites, heads, reparam)
    L = lm.sites.n_layers
    a = torch.randn(L, rank, a_mask.shape[-1], generator=g) * scale * a_mask
    b = torch.randn(L, rank, b_mask.shape[-1], generator=g) * scale * b_mask
    return LoRAEdit(a, b, heads, reparam)


def test_zero_init_is_identity(tiny):
    lm = tiny
    ids = _ids(lm)
    base = _logits(lm, ids)
    heads = HeadSet.all(lm.sites.n_layers, lm.sites.n_heads)
    stack = build_stack(lm.sites, [heads], rank=2, seeds=[3])
    assert all(p.abs().sum() > 0 for p in stack.a_params)  # a random, b zero: gradients can flow
    with stack.attached():
        edited = _logits(lm, ids)
    assert torch.equal(base, edited)


def test_zero_init_has_gradient_on_b(tiny):
    lm = tiny
    stack = build_stack(lm.sites, [HeadSet.parse("L1H2")], seeds=[0])
    with stack.attached():
        out = lm.model(input_ids=_ids(lm), use_cache=False).logits
    out.float().pow(2).mean().backward()
    assert stack.b_params[0].grad.abs().sum() > 0
    assert stack.a_params[0].grad.abs().sum() == 0  # b = 0 at init: standard LoRA


@pytest.mark.parametrize("rank", [1, 3])
def test_single_head_edit_moves_output_by_formula(tiny, rank):
    lm = tiny
    sites = lm.sites
    l, h = 1, 2
    edit = _random_edit(lm, HeadSet.parse(f"L{l}H{h}"), rank=rank)
    seen = {}

    def grab(key):
        def fn(o, out):
            seen[key] = (o.detach().clone(), out.detach().clone())
        return fn

    ids = _ids(lm)
    with torch.no_grad():
        with o_proj_hooks(sites, post={l: grab("base")}):
            lm.model(input_ids=ids, use_cache=False)
        with edit.applied(lm), o_proj_hooks(sites, post={l: grab("edit")}):
            lm.model(input_ids=ids, use_cache=False)
    o0, out0 = seen["base"]
    o1, out1 = seen["edit"]
    assert torch.equal(o0, o1)  # nothing below the edit changes
    W = sites.weight(l)
    sl = sites.head_slice(h)
    expected = torch.zeros_like(out0)
    for k in range(rank):
        strength = o0 @ edit.a[l, k]  # <a_k, o>
        expected += strength[..., None] * (W[:, sl] @ edit.b[l, k, sl])
    torch.testing.assert_close(out1 - out0, expected, rtol=1e-4, atol=1e-5)


def test_plain_lora_form(tiny):
    lm = tiny
    sites = lm.sites
    l, h = 2, 1
    edit = _random_edit(lm, HeadSet.parse(f"L{l}H{h}"), reparam=False)
    assert edit.b.shape[-1] == sites.d_model
    # the plain form reads only head h: a is masked to its coordinates
    sl = sites.head_slice(h)
    outside = torch.ones(edit.a.shape[-1], dtype=torch.bool)
    outside[sl] = False
    assert edit.a[l, :, outside].abs().sum() == 0
    seen = {}
    ids = _ids(lm)
    with torch.no_grad():
        with o_proj_hooks(sites, post={l: lambda o, out: seen.update(b=(o.clone(), out.clone()))}):
            lm.model(input_ids=ids, use_cache=False)
        with edit.applied(lm), o_proj_hooks(sites, post={l: lambda o, out: seen.update(e=out.clone())}):
            lm.model(input_ids=ids, use_cache=False)
    o0, out0 = seen["b"]
    expected = (o0 @ edit.a[l, 0])[..., None] * edit.b[l, 0]
    torch.testing.assert_close(seen["e"] - out0, expected, rtol=1e-4, atol=1e-5)


def test_detach_restores_model_bit_for_bit(tiny):
    lm = tiny
    ids = _ids(lm)
    before_sd = {k: v.clone() for k, v in lm.model.state_dict().items()}
    base = _logits(lm, ids)
    edit = _random_edit(lm, HeadSet.parse("L0H1,L2H3"))
    with edit.applied(lm):
        edited = _logits(lm, ids)
    assert not torch.allclose(base, edited)
    after = _logits(lm, ids)
    assert torch.equal(base, after)
    sd = lm.model.state_dict()
    assert all(torch.equal(before_sd[k], sd[k]) for k in before_sd)
    assert all(not lm.sites.o_proj(l)._forward_hooks for l in range(lm.sites.n_layers))


def test_detach_on_error_removes_hooks():
    lm = tiny_model("llama")
    edit = _random_edit(lm, HeadSet.parse("L1H0"))
    with pytest.raises(RuntimeError):
        with edit.applied(lm):
            raise RuntimeError("boom")
    assert not lm.sites.o_proj(1)._forward_hooks


def test_init_is_independent_of_other_layers():
    lm = tiny_model("llama")
    a1, b1 = init_params(lm.sites, HeadSet.parse("L1H0"), seed=4)
    a2, _ = init_params(lm.sites, HeadSet.parse("L0H1,L1H3"), seed=4)
    assert torch.equal(a1[1], a2[1]) and a1[0].abs().sum() == 0 and b1.abs().sum() == 0


def test_save_load_roundtrip(tmp_path):
    lm = tiny_model("qwen2")
    heads = HeadSet.parse("L0H1,L2H3")
    edit = _random_edit(lm, heads, rank=2)
    edit.meta = {"model": {"name": lm.name, "fingerprint": lm.fingerprint}, "objective": "ipo"}
    edit.save(tmp_path / "e")
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / "e" / "edit.safetensors"))
    L, H, D = lm.sites.shape
    assert t["a"].shape == (L, 2, H * D) and t["b"].shape == (L, 2, H * D)
    assert t["a"][1].abs().sum() == 0  # zero rows for untouched layers
    loaded = load_edit(tmp_path / "e")
    assert isinstance(loaded, LoRAEdit) and loaded.heads == heads and loaded.rank == 2
    assert torch.equal(loaded.a, edit.a) and torch.equal(loaded.b, edit.b)
    ids = _ids(lm)
    with edit.applied(lm):
        x = _logits(lm, ids)
    with loaded.applied(lm):
        y = _logits(lm, ids)
    assert torch.equal(x, y)
    d = loaded.describe()
    assert d["kind"] == "lora" and d["objective"] == "ipo" and d["heads"]["heads"] == [[0, 1], [2, 3]]


def test_errors_name_the_problem(tmp_path):
    lm = tiny_model("llama")
    heads = HeadSet.parse("L1H0")
    L, H, D = lm.sites.shape
    bad = LoRAEdit(torch.zeros(L, 1, H * D), torch.ones(L, 1, H * D), heads)
    with pytest.raises(DataError, match="outside its head set"):
        with bad.applied(lm):
            pass
    wrong = LoRAEdit(torch.zeros(L + 1, 1, H * D), torch.zeros(L + 1, 1, H * D), heads)
    with pytest.raises(ConfigError, match="layers"):
        with wrong.applied(lm):
            pass
    with pytest.raises(ConfigError, match="missing"):
        LoRAEdit.load(tmp_path)
