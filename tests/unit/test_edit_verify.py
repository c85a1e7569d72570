"""Per-layer fact edits (edit/layer_edit.py) verify themselves as the registered kinds do (edit/base.py): one
declared layer and site, finite and bounded updates of that site's weight shape, before they are applied."""

from __future__ import annotations

import pytest
import torch

from locaudit.edit.layer_edit import LayerEdits, site_module
from locaudit.errors import LocauditError
from locaudit.models.tiny import tiny_model


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", n_layers=3)


def _ft(lm, layer=1, **over):
    out, inp = site_module(lm, "mlp_down", layer).weight.shape
    dw = torch.full((2, out, inp), 1e-3)
    return LayerEdits(layer, "mlp_down", "ft", dw=over.get("dw", dw), a=over.get("a"), b=over.get("b"))


def test_a_genuine_layer_edit_applies_and_restores(lm):
    e = _ft(lm)
    w = site_module(lm, "mlp_down", 1).weight
    before = w.detach().clone()
    with e.applied(lm, 0):
        assert not torch.equal(w, before)
    assert torch.equal(w, before)


@pytest.mark.parametrize("how, match", [
    ("nan", "non-finite"),
    ("huge", "above the bound"),
    ("shape", "has shape"),
    ("layer", "declares layer 7"),
    ("site", "is not one of"),
    ("mixed", "carries lora factors"),
    ("int", "floating-point"),
])
def test_a_layer_edit_that_is_not_what_it_declares_is_refused_before_it_is_applied(lm, how, match):
    e = _ft(lm)
    if how == "nan":
        e.dw[1, 0, 0] = float("nan")
    elif how == "huge":
        e.dw[0, 0, 0] = 1e9
    elif how == "shape":
        e.dw = e.dw[:, :, :-1]
    elif how == "layer":
        e.layer = 7
    elif how == "site":
        e.site = "embed"
    elif how == "mixed":
        e.a, e.b = torch.zeros(2, 4), torch.zeros(2, 4)
    elif how == "int":
        e.dw = e.dw.to(torch.int64)
    w = site_module(lm, "mlp_down", 1).weight
    before = w.detach().clone()
    with pytest.raises(LocauditError, match=match):
        with e.applied(lm, 0):
            pass
    assert torch.equal(w, before)


def test_a_lora_layer_edit_is_checked_against_the_site(lm):
    out, inp = site_module(lm, "o_proj", 2).weight.shape
    good = LayerEdits(2, "o_proj", "lora", a=torch.zeros(3, inp), b=torch.zeros(3, out))
    good.verify(lm)
    with pytest.raises(LocauditError, match="has shape"):
        LayerEdits(2, "o_proj", "lora", a=torch.zeros(3, inp), b=torch.zeros(3, out + 1)).verify(lm)
