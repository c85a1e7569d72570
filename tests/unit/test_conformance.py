"""Conformance matrix of edits (as peft's PeftCommonTester): every edit kind x every registered family x
{fp32, bf16}. Each edit must: be the identity when zero; reproduce its logits after save/load; leave
the model exactly as it was on exit, also on error; leave the heads outside its set untouched (their
o_proj input, and the edit's contribution); and export to a merged model with the same logits."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch

from locaudit.edit.base import NoEdit, edit_kinds, load_edit
from locaudit.edit.iti import ITIEdit
from locaudit.edit.lora import LoRAEdit, edit_masks
from locaudit.evaluate.view import edited
from locaudit.heads import HeadSet
from locaudit.models import interventions as iv
from locaudit.models.sites import SITES
from locaudit.models.tiny import FAMILIES, tiny_model
from locaudit.models.precision import resolve_precision as _P  # resolved once, as entry points do

KINDS = ("none", "iti", "lora_reparam", "lora_plain")
PRECISIONS = ("fp32", "bf16")
HEADS = HeadSet.parse("L1H0,L1H2,L2H3")  # not every head of a layer: masks matter
TOL = {"fp32": dict(rtol=1e-4, atol=1e-4), "bf16": dict(rtol=5e-2, atol=5e-2)}


def test_every_registered_family_and_edit_kind_is_in_the_matrix():
    assert len(FAMILIES) == len(SITES) and set(FAMILIES) == set(SITES)
    assert {k.split("_")[0] for k in KINDS} == set(edit_kinds())


@functools.lru_cache(maxsize=None)
def model(family: str):
    return tiny_model(family, n_layers=3)


def make_edit(kind: str, lm, zero: bool = False, seed: int = 0):
    L, H, D = lm.sites.shape
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return NoEdit()
    if kind == "iti":
        theta = torch.randn(L, H * D, generator=g) * HEADS.dim_mask(L, H, D)
        return ITIEdit(theta, alpha=0.0 if zero else 2.0, heads=HEADS, model={"fingerprint": lm.fingerprint},
                       n_heads=H)  # as fit_iti records it: the head check then runs without the model too
    reparam = kind == "lora_reparam"
    a_mask, b_mask = edit_masks(lm.sites, HEADS, reparam)
    a = torch.randn(L, 2, a_mask.shape[-1], generator=g) * a_mask
    b = torch.zeros(L, 2, b_mask.shape[-1]) if zero else torch.randn(L, 2, b_mask.shape[-1], generator=g) * b_mask
    return LoRAEdit(a, b, HEADS, reparam, {"model": {"fingerprint": lm.fingerprint}})


def ids_for(lm):
    return torch.randint(3, 250, (2, 7), generator=torch.Generator().manual_seed(1))


def logits(lm, edit, precision, ids):
    with edited(lm, edit, precision=_P(precision)):
        return lm.model(input_ids=ids).logits.float()


def state(lm):
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def hooks_left(lm):
    return [fn for m in lm.model.modules() for d in (m._forward_hooks, m._forward_pre_hooks)
            for fn in d.values() if getattr(fn, "__module__", "").startswith("locaudit")]


# every edit kind x every registered family x {fp32, bf16}
cell = pytest.mark.parametrize("family,kind,precision", list(itertools.product(FAMILIES, KINDS, PRECISIONS)))


@cell
def test_zero_edit_is_the_identity(family, kind, precision):
    lm = model(family)
    ids = ids_for(lm)
    base = logits(lm, None, precision, ids)
    assert torch.equal(logits(lm, make_edit(kind, lm, zero=True), precision, ids), base)


@cell
def test_save_load_round_trip(family, kind, precision, tmp_path):
    lm = model(family)
    ids = ids_for(lm)
    edit = make_edit(kind, lm)
    edit.save(tmp_path / "e")
    back = load_edit(tmp_path / "e")
    assert type(back) is type(edit) and back.describe() == edit.describe()
    assert torch.equal(logits(lm, back, precision, ids), logits(lm, edit, precision, ids))


@cell
def test_model_restored_on_exit_and_on_error(family, kind, precision):
    lm = model(family)
    ids = ids_for(lm)
    before, base = state(lm), logits(lm, None, precision, ids)
    edit = make_edit(kind, lm)
    out = logits(lm, edit, precision, ids)
    if kind != "none":
        assert not torch.allclose(out, base)
    with pytest.raises(RuntimeError, match="boom"):
        with edited(lm, edit, precision=_P(precision)):
            lm.model(input_ids=ids)
            raise RuntimeError("boom")
    after = state(lm)
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not hooks_left(lm)
    assert torch.equal(logits(lm, None, precision, ids), base)


@cell
def test_masked_heads_untouched(family, kind, precision):
    """At the edited layers, heads outside the set keep their o_proj input, and the edit's contribution
    to o_proj's output neither writes through them (ITI, reparameterised LoRA: it lies in the span of
    the set's W columns) nor reads them (ITI, plain LoRA: it does not change when they change)."""
    lm = model(family)
    s = lm.sites
    L, H, D = s.shape
    ids = ids_for(lm)
    edit = make_edit(kind, lm)
    first = min(HEADS.layers)
    outside = ~HEADS.dim_mask(L, H, D)
    with edited(lm, None, precision=_P(precision)), iv.capture(s, "heads", [first]) as cap:
        cap.forward(lm.model, ids)
        o_base = cap.values[first].float()
    with edited(lm, edit, precision=_P(precision)), iv.capture(s, "heads", HEADS.layers) as ci, \
            iv.capture(s, "attn_out", HEADS.layers) as co:
        lm.model(input_ids=ids)
    cols = outside[first]
    torch.testing.assert_close(ci.values[first].float()[..., cols], o_base[..., cols], **TOL[precision])
    if kind == "none":
        return
    for l in HEADS.layers:
        o = ci.values[l].float()  # the input o_proj saw (for ITI: already shifted)
        W = s.weight(l).detach().float()
        bias = s.bias(l)
        unedited = o @ W.t() + (0 if bias is None else bias.float())
        if kind == "iti":
            unedited = (o - edit.shift(l)) @ W.t() + (0 if bias is None else bias.float())
        contrib = (co.values[l].float() - unedited).reshape(-1, W.shape[0])  # [tokens, d_model]
        if kind in ("iti", "lora_reparam"):
            basis = W[:, ~outside[l]]  # the set's columns of W at layer l
            coef = torch.linalg.lstsq(basis, contrib.t()).solution
            residual = contrib.t() - basis @ coef
            assert residual.abs().max() <= 1e-3 + TOL[precision]["atol"] * contrib.abs().max()
        if kind == "lora_plain":
            st = edit.stack(s)
            g = torch.Generator().manual_seed(3)
            noise = torch.randn(o.shape, generator=g) * outside[l].float()
            i = st.layers.index(l)
            with torch.no_grad():
                torch.testing.assert_close(st.delta(i, o + noise), st.delta(i, o), rtol=1e-5, atol=1e-5)


def exported_logits(edit, lm, ids, precision, tmp_path):
    """Logits of the edit's merged export; where a family's config cannot hold a merged ITI edit (no
    o_proj bias, edit/export.py refuses with a ConfigError), of its PEFT adapter on a copy of the model."""
    import copy

    from transformers import AutoModelForCausalLM

    from locaudit.errors import ConfigError
    from locaudit.models.precision import as_precision

    try:
        out = edit.export(lm, tmp_path / "merged")
        exported = AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager")
    except ConfigError as e:
        if "PEFT adapter instead" not in str(e):
            raise
        from peft import PeftModel

        out = edit.export(lm, tmp_path / "adapter", format="peft")
        exported = PeftModel.from_pretrained(copy.deepcopy(lm.model), str(out))
    with torch.no_grad(), as_precision(precision, "cpu").autocast(torch.float32):
        return exported(input_ids=ids).logits.float()


@cell
def test_export_reproduces_logits(family, kind, precision, tmp_path):
    """Exact in fp32. Under bf16 the export computes (W + BA) o where the live edit computes W o + B(A o):
    other roundings, so the bound is the live edit's own bf16 error (MoE routing can flip under it)."""
    lm = model(family)
    ids = ids_for(lm)
    edit = make_edit(kind, lm)
    live = logits(lm, edit, precision, ids)
    got = exported_logits(edit, lm, ids, precision, tmp_path)
    if precision == "fp32":
        torch.testing.assert_close(got, live, **TOL["fp32"])
    else:
        reference = logits(lm, edit, "fp32", ids)
        noise = float((live - reference).abs().max())
        err = float((got - reference).abs().max())
        if err > max(TOL["bf16"]["atol"], 2 * noise) and SITES[family].mlp_down is None:
            pytest.xfail(f"{family} routes tokens to experts: a bf16 rounding flips the top-1 expert of a near-tie "
                         f"(error {err:.3g} vs live bf16 noise {noise:.3g}); the fp32 export is exact")
        assert err <= max(TOL["bf16"]["atol"], 2 * noise)


def tampered(kind: str, lm, how: str):
    """An edit of `kind` that is not what it declares: non-zero at a head outside its set ('outside'), or
    non-finite ('nan'), or unbounded ('huge')."""
    L, H, D = lm.sites.shape
    edit = make_edit(kind, lm)
    outside = ~HEADS.dim_mask(L, H, D)  # [L, HD]
    l = min(HEADS.layers)
    c = int(torch.nonzero(outside[l])[0])  # a coordinate of a head outside the set, on an edited layer
    value = {"outside": 0.5, "nan": float("nan"), "huge": 1e30}[how]
    if kind == "iti":
        if how == "outside":
            edit.theta[l, c] = value
        else:
            edit.theta[l, int(torch.nonzero(~outside[l])[0])] = value
    elif how == "outside" and kind == "lora_plain":
        edit.a[l, 0, c] = value  # plain LoRA reads only the set's head coordinates
    elif how == "outside":
        edit.b[l, 0, c] = value  # reparameterised LoRA writes only through the set's heads
    else:
        edit.b[l, 0, 0 if kind == "lora_plain" else int(torch.nonzero(~outside[l])[0])] = value
    return edit


TAMPER = ("outside", "nan", "huge")


@pytest.mark.parametrize("family,kind", list(itertools.product(FAMILIES, KINDS)))
def test_edit_verification(family, kind, tmp_path):
    """Every kind verifies through the registry (edit/base.py): the genuine edit passes; an edit acting at
    a head outside its declared set, or with non-finite or unbounded values, is refused before it is
    applied, saved or exported, and when a tampered file is loaded, naming what is wrong."""
    from locaudit.errors import LocauditError

    lm = model(family)
    ids = ids_for(lm)
    genuine = make_edit(kind, lm)
    genuine.verify(lm)
    genuine.verify(None)
    if kind == "none":
        return
    genuine.save(tmp_path / "good")
    for how in TAMPER:
        bad = tampered(kind, lm, how)
        match = {"outside": "non-zero outside its", "nan": "non-finite", "huge": "above the bound"}[how]
        with pytest.raises(LocauditError, match=match):
            bad.verify(lm)
        with pytest.raises(LocauditError, match=match):
            with edited(lm, bad, precision=_P('fp32')):
                lm.model(input_ids=ids)
        assert not hooks_left(lm)
        with pytest.raises(LocauditError, match=match):
            bad.export(lm, tmp_path / f"export-{how}")
        assert not (tmp_path / f"export-{how}").exists()
        if how == "outside" and kind.startswith("lora"):
            bad.save(tmp_path / f"saved-{how}")  # without the model a LoRA edit is checked layer by layer
        else:
            with pytest.raises(LocauditError, match=match):
                bad.save(tmp_path / f"saved-{how}")
        # a tampered file: the genuine folder with the bad tensors written over its own
        folder = tmp_path / f"file-{how}"
        import shutil

        from safetensors.torch import save_file

        shutil.copytree(tmp_path / "good", folder)
        if kind == "iti":
            save_file({"theta": bad.theta.contiguous()}, str(folder / "iti.safetensors"))
        else:
            save_file({"a": bad.a.contiguous(), "b": bad.b.contiguous()}, str(folder / "edit.safetensors"))
        if how == "outside" and kind.startswith("lora"):
            # without the model, a stored LoRA edit is checked layer by layer; the head check runs on apply
            back = load_edit(folder)
            with pytest.raises(LocauditError, match=match):
                with edited(lm, back, precision=_P('fp32')):
                    pass
        else:
            on_file = "finite" if how == "nan" else match  # the loaders' own finite checks come first
            with pytest.raises(LocauditError, match=f"(?s){folder.name}.*{on_file}"):
                load_edit(folder)
    # acting on a layer outside the set is refused even without the model
    if kind.startswith("lora"):
        bad = make_edit(kind, lm)
        off = next(l for l in range(lm.sites.n_layers) if l not in HEADS.layers)
        bad.a[off] = 0.1
        bad.b[off] = 0.1
        with pytest.raises(LocauditError, match="outside its declared layers"):
            bad.verify(None)


def test_a_kind_without_verify_cannot_register_and_a_kind_cannot_skip_it():
    from locaudit.edit.base import EDIT_KINDS, ExportMixin, register_edit

    class NoVerify(ExportMixin):
        def applied(self, lm): ...
        def describe(self): return {}
        def save(self, path): ...
        @classmethod
        def load(cls, path): return cls()

    with pytest.raises(TypeError, match="no method verify"):
        register_edit("noverify_test")(NoVerify)

    calls = []

    class Skips(NoVerify):
        def verify(self, lm=None):
            calls.append(lm)
            raise ValueError("refused")

    try:
        register_edit("skips_test")(Skips)
        with pytest.raises(ValueError, match="refused"):
            Skips().applied("LM")  # its own applied never calls verify: the registry does
        with pytest.raises(ValueError, match="refused"):
            Skips().save("/nonexistent")
        with pytest.raises(ValueError, match="refused"):
            Skips.load("/nonexistent")
        with pytest.raises(ValueError, match="refused"):
            Skips().export("LM", "/nonexistent")
        assert calls == ["LM", None, None, "LM"]
    finally:
        EDIT_KINDS.pop("skips_test", None)
