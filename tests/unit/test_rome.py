"""ROME at a chosen layer on a tiny model, against a hand computation: the key second moment equals
mean k k^T of the down-projection's inputs (and is cached by content); after the update the edited
down-projection maps k* to v* exactly; the update equals delta (C^-1 k*)^T / (k*^T C^-1 k*) computed
independently in float64; the scores it returns equal a full forward with the edit baked in; the edit
raises the target's probability; a wrong site or key position is refused, naming it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from locaudit.edit.layer_edit import EditRow, LayerEditConfig, score_rows
from locaudit.edit.rome import (compute_second_moment, compute_second_moments, key_second_moment, rank_one,
                                relative_norms, rome_layer_edits)
from locaudit.errors import ConfigError
from locaudit.models.precision import resolve_precision
from locaudit.models.tiny import tiny_model

P = resolve_precision("fp32")
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
        "of a wife. However little known the feelings or views of such a man may be on his first entering a "
        "neighbourhood, this truth is so well fixed in the minds of the surrounding families.") * 3


def _windows(lm, n=96):
    ids = lm.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    return [ids[s: s + n] for s in range(0, len(ids), n)]


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", n_layers=3)


def _keys_by_hand(lm, layer, windows):
    ks = []
    mod = lm.sites.mlp_down(layer)
    h = mod.register_forward_hook(lambda m, a, o: ks.append(a[0][0].detach().double()))
    try:
        with torch.no_grad():
            for w in windows:
                lm.model(input_ids=torch.tensor([w]))
    finally:
        h.remove()
    K = torch.cat(ks).numpy()
    return K.T @ K / K.shape[0], K.shape[0]


def test_second_moment_by_hand_and_cached(lm, monkeypatch):
    w = _windows(lm)
    C, n = compute_second_moment(lm, 1, w, P)
    ref, n_ref = _keys_by_hand(lm, 1, w)
    assert n == n_ref == sum(len(x) for x in w)
    np.testing.assert_allclose(C.numpy(), ref, rtol=1e-5, atol=1e-7)
    C1 = key_second_moment(lm, 1, w, P, text_id="tiny-text")
    import locaudit.edit.rome as rome

    def boom(*a, **k):
        raise AssertionError("recomputed although cached")

    # several layers in the same passes (stopped after the deepest) equal each one alone
    Cs, n2 = compute_second_moments(lm, [2, 0], w, P)
    assert n2 == n and set(Cs) == {0, 2}
    for l in (0, 2):
        np.testing.assert_allclose(Cs[l].numpy(), _keys_by_hand(lm, l, w)[0], rtol=1e-5, atol=1e-7)
    monkeypatch.setattr(rome, "compute_second_moments", boom)
    assert torch.equal(key_second_moment(lm, 1, w, P, text_id="tiny-text"), C1)
    with pytest.raises(AssertionError, match="recomputed"):  # another text or layer is another cache entry
        key_second_moment(lm, 1, w[:-1], P, text_id="tiny-text")
    with pytest.raises(AssertionError, match="recomputed"):
        key_second_moment(lm, 2, w, P, text_id="tiny-text")


def _facts(lm):
    tok = lm.tokenizer
    P_ = lambda t: list(tok(t)["input_ids"])  # noqa: E731
    prompts = [("Paris is a city in", "Paris", " Spain"), ("Tokyo is the capital of", "Tokyo", " Peru")]
    train, keys, score = [], [], []
    for e, (p, subj, new) in enumerate(prompts):
        ids = P_(p)
        from locaudit.data.facts import subject_token_span

        keys.append(subject_token_span(tok, p, subj)[1] - 1)
        tgt = list(tok(new, add_special_tokens=False)["input_ids"])
        train.append(EditRow(ids, tgt, e, "target"))
        score.append(EditRow(ids, tgt, e))
        score.append(EditRow(P_("Rome is a city in"), tgt, e))
    return train, keys, score


@pytest.mark.parametrize("layer", [0, 1])
def test_rome_update_equals_hand_computation(lm, layer):
    C = key_second_moment(lm, layer, _windows(lm), P, text_id="tiny-text")
    train, keys, score = _facts(lm)
    cfg = LayerEditConfig(method="rome", steps=25, lr=0.5, batch_facts=2)
    pre = score_rows(lm, score, precision=P)
    edits, post, info = rome_layer_edits(lm, layer, train, keys, score, 2, "error_injection", cfg, C, P)
    W = lm.sites.mlp_down(layer).weight.detach().double().numpy()
    Cn = C.numpy()
    for e in range(2):
        k, v = info["k"][e].double().numpy(), info["v"][e].double().numpy()
        dW = edits.delta(e).double().numpy()
        # the constraint, exactly: (W + dW) k* = v* (no bias on Llama's down_proj)
        np.testing.assert_allclose((W + dW) @ k, v, rtol=1e-4, atol=1e-4 * np.abs(v).max())
        # the closed form, by hand in float64
        u = np.linalg.solve(Cn, k)
        hand = np.outer(v - W @ k, u) / (k @ u)
        np.testing.assert_allclose(dW, hand, rtol=1e-3, atol=1e-5 * np.abs(hand).max())
        assert np.linalg.matrix_rank(dW, tol=1e-6 * np.abs(dW).max()) == 1
        # the edited model's own forward gives v* at the key position
        got = {}
        h = lm.sites.mlp_down(layer).register_forward_hook(lambda m, a, o: got.setdefault("v", o[0, keys[e]].clone()))
        try:
            with edits.applied(lm, e), torch.no_grad():
                lm.model(input_ids=torch.tensor([train[e].prompt]))
        finally:
            h.remove()
        np.testing.assert_allclose(got["v"].double().numpy(), v, rtol=1e-4, atol=1e-4 * np.abs(v).max())
    # the returned scores equal a full forward with each edit baked in; the target became more likely
    for i, row in enumerate(score):
        with edits.applied(lm, row.edit):
            full = score_rows(lm, [row], precision=P)[0]
        assert float(post[i]) == pytest.approx(float(full), abs=1e-4)
    if layer == 0:  # in a 3-layer random model, the subject position reaches the last one from layer 0 only
        assert float(post[0]) > float(pre[0]) + 2 and float(post[2]) > float(pre[2]) + 2
        assert info["loss_last"] < info["loss_first"] - 0.5
    norms = relative_norms(lm, edits)
    assert len(norms) == 2 and all(0 < x < 10 for x in norms)
    # the weight was restored after every `applied`
    np.testing.assert_array_equal(lm.sites.mlp_down(layer).weight.detach().double().numpy(), W)


def test_rank_one_constraint_and_refusals(lm):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(8, 5, generator=g, dtype=torch.float64)
    C = A @ A.t() / 5 + 0.1 * torch.eye(8, dtype=torch.float64)
    k = torch.randn(3, 8, generator=g, dtype=torch.float64)
    a = rank_one(C, k)
    assert torch.allclose((a * k).sum(1), torch.ones(3, dtype=torch.float64))
    with pytest.raises(Exception, match="positive definite"):
        rank_one(-C, k)
    train, keys, score = _facts(lm)
    C1 = torch.eye(lm.sites.mlp_down(0).weight.shape[1], dtype=torch.float64)
    with pytest.raises(ConfigError, match="o_proj"):
        rome_layer_edits(lm, 0, train, keys, score, 2, "error_injection",
                         LayerEditConfig(method="rome", site="o_proj"), C1, P)
    with pytest.raises(ConfigError, match="key positions"):
        rome_layer_edits(lm, 0, train, [99, 0], score, 2, "error_injection", LayerEditConfig(method="rome"), C1, P)
