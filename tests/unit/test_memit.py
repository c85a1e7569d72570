"""MEMIT over a window of layers on a tiny model, against an independent float64 computation: the batched
least-squares update is the normal equations' solution; each window layer's update is r_i a_i^T with the keys
and residuals recomputed by hand (a forward with the earlier layers' updates baked into the weights); with
lambda = 0 the residual is written fully; the returned scores equal a forward with the whole edit baked in;
a one-layer window with lambda = 0 (no decay, no clamp) is ROME's update, and with lambda > 0 ROME's scaled
by k^T C^-1 k / (lambda + k^T C^-1 k). Under fp32 and bf16."""

from __future__ import annotations

from contextlib import ExitStack

import numpy as np
import pytest
import torch

from locaudit.edit.layer_edit import LayerEditConfig, score_rows
from locaudit.edit.memit import memit_layer_edits, memit_update, rank_one_keys, window_layers, window_relative_norms
from locaudit.edit.rome import key_second_moment, rome_layer_edits
from locaudit.errors import ConfigError
from locaudit.models.precision import resolve_precision
from locaudit.models.tiny import tiny_model
from test_rome import _facts, _windows

FP32 = resolve_precision("fp32")


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", n_layers=4)


def _Cs(lm, layers, prec=FP32):
    return {l: key_second_moment(lm, l, _windows(lm), prec, text_id="tiny-text") for l in layers}


def test_window_layers_as_hase():
    assert window_layers(0, 12, 5) == [0, 1, 2]
    assert window_layers(5, 12, 5) == [3, 4, 5, 6, 7]
    assert window_layers(11, 12, 5) == [9, 10, 11]
    assert window_layers(3, 12, 1) == [3]
    assert window_layers(3, 12, 4) == [1, 2, 3, 4]  # range(l - w//2, l + ceil(w/2)), as belief-localization
    with pytest.raises(ConfigError, match="outside"):
        window_layers(12, 12, 5)


def test_batched_solve_is_the_normal_equations():
    g = np.random.default_rng(0)
    A = g.normal(size=(8, 20))
    C = A @ A.T / 20
    K, R = g.normal(size=(3, 8)), g.normal(size=(3, 5))
    lam = 0.7
    dW = memit_update(torch.tensor(C), torch.tensor(K), torch.tensor(R), lam).numpy()
    # normal equations of min ||dW K^T - R^T||^2 + lam tr(dW C dW^T):  dW (K^T K + lam C) = R^T K
    hand = np.linalg.solve((K.T @ K + lam * C).T, (R.T @ K).T).T
    np.testing.assert_allclose(dW, hand, rtol=1e-10, atol=1e-12)
    # one key: the rank-one form r a^T (Sherman-Morrison) is the same update, at any lambda
    for lam1 in (0.0, 0.3, 50.0):
        if lam1 == 0.0:  # lambda C + k k^T is singular for lambda = 0; the limit is ROME's closed form
            u = np.linalg.solve(C, K[0])
            ref = np.outer(R[0], u / (K[0] @ u))
        else:
            ref = memit_update(torch.tensor(C), torch.tensor(K[:1]), torch.tensor(R[:1]), lam1).numpy()
        a = rank_one_keys(torch.tensor(C), torch.tensor(K[:1]), lam1).numpy()
        np.testing.assert_allclose(np.outer(R[0], a[0]), ref, rtol=1e-9, atol=1e-12)


def _read_by_hand(lm, edits_before, e, prompt, pos, key_layer, z_layer):
    """(k at key_layer's down-projection input, h at z_layer's output) at `pos`, float64, with the earlier
    window layers' updates of edit e baked into the weights."""
    got = {}

    def grab_k(m, a, o):  # returns None: a hook that returns a value replaces the output
        got["k"] = a[0][0, pos].detach().double()

    def grab_h(m, a, o):
        got["h"] = (o[0] if isinstance(o, tuple) else o)[0, pos].detach().double()

    hs = [lm.sites.mlp_down(key_layer).register_forward_hook(grab_k), lm.sites.layer(z_layer).register_forward_hook(grab_h)]
    try:
        with ExitStack() as st, torch.no_grad():
            for ed in edits_before:
                st.enter_context(ed.applied(lm, e))
            lm.model(input_ids=torch.tensor([prompt]))
    finally:
        for h in hs:
            h.remove()
    return got["k"].numpy(), got["h"].numpy()


@pytest.mark.parametrize("prec_name,lam", [("fp32", 0.0), ("fp32", 2.0), ("bf16", 2.0)])
def test_memit_window_equals_hand_computation(lm, prec_name, lam):
    prec = resolve_precision(prec_name)
    tol = 1e-4 if prec_name == "fp32" else 3e-2
    layers = window_layers(1, 4, 3)  # [0, 1, 2]
    Cs = _Cs(lm, layers)
    train, keys, score = _facts(lm)
    cfg = LayerEditConfig(method="memit", steps=25, lr=0.5, batch_facts=2, mom2_update_weight=lam, clamp_norm_factor=4)
    pre = score_rows(lm, score, precision=prec)
    edits, post, info = memit_layer_edits(lm, layers, train, keys, score, 2, "error_injection", cfg, Cs, prec)
    assert [e.layer for e in edits] == layers and all(e.method == "memit" for e in edits)
    Ws = {l: lm.sites.mlp_down(l).weight.detach().double().numpy().copy() for l in layers}
    for e in range(2):
        z = info["z"][e].double().numpy()
        for i, l in enumerate(layers):
            k, h = _read_by_hand(lm, edits[:i], e, train[e].prompt, keys[e], l, layers[-1])
            scale = np.abs(z).max()
            np.testing.assert_allclose(info["k"][i][e].double().numpy(), k, rtol=tol, atol=tol * np.abs(k).max())
            r = (z - h) / (len(layers) - i)
            np.testing.assert_allclose(info["r"][i][e].double().numpy(), r, rtol=tol, atol=tol * scale)
            # the update by hand in float64, from its own key and residual: r (lambda C + k k^T)^-1 k
            kk, rr = info["k"][i][e].double().numpy(), info["r"][i][e].double().numpy()
            C = Cs[l].numpy()
            if lam > 0:
                hand = np.outer(rr, np.linalg.solve(lam * C + np.outer(kk, kk), kk))
            else:
                u = np.linalg.solve(C, kk)
                hand = np.outer(rr, u / (kk @ u))
            dW = edits[i].delta(e).double().numpy()
            np.testing.assert_allclose(dW, hand, rtol=1e-3, atol=1e-4 * np.abs(hand).max())
        _, h_end = _read_by_hand(lm, edits, e, train[e].prompt, keys[e], layers[0], layers[-1])
        left = np.linalg.norm(z - h_end) / np.linalg.norm(z - info["h0"][e].double().numpy())
        assert info["residual_left"][e] == pytest.approx(left, abs=5 * tol)
        if lam == 0:  # the last window layer writes what is left, exactly
            assert left < 10 * tol
        else:  # a soft constraint: part of the residual stays unwritten
            assert 0 < left < 1
    for i, row in enumerate(score):
        with ExitStack() as st:
            for ed in edits:
                st.enter_context(ed.applied(lm, row.edit))
            full = score_rows(lm, [row], precision=prec)[0]
        assert float(post[i]) == pytest.approx(float(full), abs=50 * tol)
    # the target became more likely on both facts' own prompts (in a 4-layer random model the subject position
    # reaches the last one weakly, so the gain is small: the algebra above is the test)
    assert float(post[0]) > float(pre[0]) and float(post[2]) > float(pre[2])
    assert info["loss_last"] < info["loss_first"]
    norms = window_relative_norms(lm, edits)
    assert len(norms) == 2 and all(0 < x < 10 for x in norms)
    for l in layers:  # the weights were restored
        np.testing.assert_array_equal(lm.sites.mlp_down(l).weight.detach().double().numpy(), Ws[l])


@pytest.mark.parametrize("prec_name", ["fp32", "bf16"])
def test_one_layer_window_is_rome(lm, prec_name):
    prec = resolve_precision(prec_name)
    layer = 1
    C = _Cs(lm, [layer])[layer]
    train, keys, score = _facts(lm)
    # the same value objective: no weight decay, a clamp that never acts (the scales differ: ||h|| vs ||W k||)
    base = dict(steps=15, lr=0.5, batch_facts=2, v_weight_decay=0.0, clamp_norm_factor=1e6)
    rome, _, rinfo = rome_layer_edits(lm, layer, train, keys, score, 2, "error_injection",
                                      LayerEditConfig(method="rome", **base), C, prec)
    tol = 1e-3 if prec_name == "fp32" else 5e-2
    for lam in (0.0, 3.0):
        mem, _, minfo = memit_layer_edits(lm, [layer], train, keys, score, 2, "error_injection",
                                          LayerEditConfig(method="memit", mom2_update_weight=lam, **base),
                                          {layer: C}, prec)
        for e in range(2):
            k = minfo["k"][0][e].double().numpy()
            u = np.linalg.solve(C.numpy(), k)
            s = (k @ u) / (lam + k @ u)  # 1 at lambda = 0
            dr, dm = rome.delta(e).double().numpy(), mem[0].delta(e).double().numpy()
            np.testing.assert_allclose(dm, s * dr, rtol=tol, atol=tol * np.abs(dr).max())
        if lam > 0:
            assert s < 1


def test_refusals(lm):
    train, keys, score = _facts(lm)
    Cs = _Cs(lm, [0, 1])
    cfg = LayerEditConfig(method="memit")
    with pytest.raises(ConfigError, match="ascending"):
        memit_layer_edits(lm, [1, 0], train, keys, score, 2, "error_injection", cfg, Cs, FP32)
    with pytest.raises(ConfigError, match="no key second moment"):
        memit_layer_edits(lm, [0, 1, 2], train, keys, score, 2, "error_injection", cfg, Cs, FP32)
    with pytest.raises(ConfigError, match="key positions"):
        memit_layer_edits(lm, [0, 1], train, [99, 0], score, 2, "error_injection", cfg, Cs, FP32)
    with pytest.raises(TypeError):
        memit_layer_edits(lm, [0, 1], train, keys, score, 2, "error_injection", cfg, Cs, "auto")
