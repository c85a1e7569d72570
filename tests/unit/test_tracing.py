"""Causal tracing: the batched computation equals an independent one-row-at-a-time computation in which the
noise enters through inputs_embeds (not a hook) and one hand-written hook restores the clean state."""

from __future__ import annotations

import pytest
import torch

from locaudit.data.facts import object_ids, subject_token_span
from locaudit.localize.tracing import (TraceConfig, _noise, category_heatmap, embedding_std, trace_fact,
                                       window_layers)
from locaudit.models.precision import resolve_precision

PROMPT, SUBJECT, TARGET = "The Eiffel Tower is in", "Eiffel Tower", "Paris"

FP32 = resolve_precision("fp32")


def _module(lm, kind, l):
    return {"hidden": lm.sites.layer, "mlp": lm.sites.mlp, "attn": lm.sites.o_proj}[kind](l)


@torch.no_grad()
def _reference(lm, cfg, kind, layer):
    """(p_corrupt, p_restored) averaged over noise samples, one sample and one restored layer set at a time."""
    tok = lm.tokenizer
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    s0, s1 = subject_token_span(tok, PROMPT, SUBJECT)
    ans = object_ids(tok, TARGET)[0]
    L = lm.sites.n_layers
    clean = {}
    hs = []
    for l in range(L):
        def grab(m, a, o, l=l):  # OPT's MLP runs on (batch * pos, d): view it as [batch, pos, d]
            clean[l] = (o[0] if isinstance(o, tuple) else o).reshape(1, ids.shape[1], -1)[0].clone()
        hs.append(_module(lm, kind, l).register_forward_hook(grab))
    lm.model(input_ids=ids)
    for h in hs:
        h.remove()
    std = lm.model.get_input_embeddings().weight.float().std()
    noise = _noise(cfg, 0, cfg.n_noise, s1 - s0, lm.sites.d_model, float(cfg.noise_scale * std))
    restore = [layer] if kind == "hidden" else window_layers(layer, cfg.window_for(L), L)
    pc, pr = [], []
    for n in range(cfg.n_noise):
        emb = lm.model.get_input_embeddings()(ids).clone()
        emb[0, s0:s1] += noise[n]
        pc.append(lm.model(inputs_embeds=emb).logits[0, -1].softmax(-1)[ans])
        hs = []
        for l in restore:
            def put(m, a, o, l=l):
                x = o[0] if isinstance(o, tuple) else o
                t = x.reshape(1, ids.shape[1], -1).clone()
                t[0, s1 - 1] = clean[l][s1 - 1]
                t = t.view(x.shape)
                return (t, *o[1:]) if isinstance(o, tuple) else t
            hs.append(_module(lm, kind, l).register_forward_hook(put))
        pr.append(lm.model(inputs_embeds=emb).logits[0, -1].softmax(-1)[ans])
        for h in hs:
            h.remove()
    return float(torch.stack(pc).mean()), float(torch.stack(pr).mean())


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt_neox", "opt"])  # opt: its MLP output is 2-D
def test_tracing_equals_independent_hooks(family):
    from locaudit.models.tiny import tiny_model

    lm = tiny_model(family, n_layers=4)
    cfg = TraceConfig(n_noise=3, window=2, seed=5, max_rows=7)  # max_rows splits the rows into several passes
    tf = trace_fact(lm, PROMPT, SUBJECT, TARGET, cfg, precision=FP32)
    for kind in ("hidden", "mlp", "attn"):
        for layer in range(4):
            pc, pr = _reference(lm, cfg, kind, layer)
            assert tf.p_corrupt == pytest.approx(pc, abs=1e-5)
            assert tf.effects[kind][layer] == pytest.approx(pr - pc, abs=1e-5), (kind, layer)
    p_clean = lm.model(input_ids=torch.tensor([lm.tokenizer(PROMPT)["input_ids"]])).logits[0, -1].softmax(-1)
    assert tf.p_clean == pytest.approx(float(p_clean[object_ids(lm.tokenizer, TARGET)[0]]), abs=1e-6)


def test_restoring_the_last_layer_everywhere_is_clean_and_grid_matches():
    from locaudit.models.tiny import tiny_model

    lm = tiny_model("llama", n_layers=3)
    cfg = TraceConfig(n_noise=2, kinds=["hidden"], seed=1)
    tf = trace_fact(lm, PROMPT, SUBJECT, TARGET, cfg, grid=True, precision=FP32)
    grid = torch.tensor(tf.grid["hidden"])  # [L, T]
    s1 = tf.subject[1]
    # the grid's column at the last subject token is the layer-level effect (same noise samples)
    assert torch.allclose(grid[:, s1 - 1], torch.tensor(tf.effects["hidden"]), atol=1e-6)
    # restoring the last layer's output at the last position restores the clean prediction exactly
    assert float(grid[-1, -1]) == pytest.approx(tf.p_clean - tf.p_corrupt, abs=1e-5)
    # positions before the subject carry no noise: restoring them changes nothing
    assert torch.allclose(grid[:, : tf.subject[0]], torch.zeros(1), atol=1e-6)
    H = category_heatmap([tf, tf], "hidden")
    assert H.shape == (3, 6) and torch.isfinite(H[:, [0, 2, 5]]).all()


def test_seeded_and_scaled():
    from locaudit.models.tiny import tiny_model

    lm = tiny_model("llama", n_layers=2)
    a = trace_fact(lm, PROMPT, SUBJECT, TARGET, TraceConfig(n_noise=2, seed=3), precision=FP32)
    b = trace_fact(lm, PROMPT, SUBJECT, TARGET, TraceConfig(n_noise=2, seed=3), precision=FP32)
    c = trace_fact(lm, PROMPT, SUBJECT, TARGET, TraceConfig(n_noise=2, seed=4), precision=FP32)
    assert a.effects == b.effects and a.effects != c.effects
    assert TraceConfig().window_for(48) == 10 and TraceConfig().window_for(30) == 6
    assert window_layers(0, 6, 30) == [0, 1, 2] and window_layers(29, 6, 30) == [26, 27, 28, 29]
    assert embedding_std(lm) > 0


def test_fraction_is_the_max_over_positions_of_the_grid():
    """Hase's variable: max over positions of max(0, restored - corrupt) / |clean - corrupt|, from the same
    noise samples as the (layer x position) grid, which is checked against independent hooks above."""
    from locaudit.models.tiny import tiny_model

    lm = tiny_model("llama", n_layers=3)
    cfg = TraceConfig(n_noise=4, kinds=["hidden", "mlp"], window=2, seed=2, measure="fraction")
    tf = trace_fact(lm, PROMPT, SUBJECT, TARGET, cfg, grid=True, precision=FP32)
    den = abs(tf.p_clean - tf.p_corrupt)
    assert den > 1e-4
    for kind in ("hidden", "mlp"):
        grid = torch.tensor(tf.grid[kind])
        want = (grid.max(1).values.clamp(min=0) / den).tolist()
        assert tf.effects[kind] == pytest.approx(want, abs=1e-5), kind
        assert all(v >= 0 for v in tf.effects[kind])
    if tf.p_clean > tf.p_corrupt:  # restoring the last layer's output at the last position restores it all
        assert tf.effects["hidden"][-1] >= 1 - 1e-4
    # over the subject's tokens and the last one only: the max over those grid columns
    cols = sorted(set(range(*tf.subject)) | {tf.n_tokens - 1})
    sub = trace_fact(lm, PROMPT, SUBJECT, TARGET, cfg.model_copy(update={"fraction_positions": "subject_and_last"}),
                     precision=FP32)
    for kind in ("hidden", "mlp"):
        want = (torch.tensor(tf.grid[kind])[:, cols].max(1).values.clamp(min=0) / den).tolist()
        assert sub.effects[kind] == pytest.approx(want, abs=1e-5), kind
    # the default measure is still the original difference at the last subject token
    old = trace_fact(lm, PROMPT, SUBJECT, TARGET, cfg.model_copy(update={"measure": "diff"}), precision=FP32)
    assert old.effects["hidden"] == pytest.approx(torch.tensor(tf.grid["hidden"])[:, tf.subject[1] - 1].tolist(),
                                                  abs=1e-6)


def test_split_halves_and_reliability():
    from locaudit.localize.tracing import TracedFact, split_half_reliability
    from locaudit.models.tiny import tiny_model

    lm = tiny_model("llama", n_layers=3)
    tf = trace_fact(lm, PROMPT, SUBJECT, TARGET, TraceConfig(n_noise=4, kinds=["mlp"], window=2), precision=FP32)
    a, b = tf.halves["mlp"]
    # the two halves are two independent noise draws; their mean is the 4-sample curve
    assert [(x + y) / 2 for x, y in zip(a, b)] == pytest.approx(tf.effects["mlp"], abs=1e-6)
    assert a != b
    assert trace_fact(lm, PROMPT, SUBJECT, TARGET, TraceConfig(n_noise=1, kinds=["mlp"]), precision=FP32).halves == {}
    g = torch.Generator().manual_seed(0)

    def fact(x, y):
        return TracedFact(0.5, 0.1, {"mlp": x}, (0, 1), 3, halves={"mlp": [x, y]})

    same = [fact(c, c) for c in torch.randn(30, 5, generator=g).tolist()]
    r = split_half_reliability(same, "mlp")
    assert r["r"] == pytest.approx(1.0) and r["spearman_brown"] == pytest.approx(1.0) and r["n_facts"] == 30
    noise = [fact(torch.randn(5, generator=g).tolist(), torch.randn(5, generator=g).tolist()) for _ in range(200)]
    assert abs(split_half_reliability(noise, "mlp")["r"]) < 0.15
    signal = [fact((c + 0.3 * torch.randn(5, generator=g)).tolist(), (c + 0.3 * torch.randn(5, generator=g)).tolist())
              for c in torch.randn(200, 5, generator=g)]
    rel = split_half_reliability(signal, "mlp")
    assert 0.85 < rel["r"] < 0.97 and rel["spearman_brown"] > rel["r"]  # 1 / (1 + 0.09) = 0.917


def test_subject_noise_unit_and_clean_position_0():
    from types import SimpleNamespace

    from locaudit.localize.tracing import subject_embedding_std
    from locaudit.models.tiny import tiny_model

    lm = tiny_model("llama", n_layers=2)
    tok = lm.tokenizer
    facts = [SimpleNamespace(prompt=PROMPT, subject=SUBJECT), SimpleNamespace(prompt="Paris is in", subject="Paris")]
    ids = []
    for f in facts:
        s0, s1 = subject_token_span(tok, f.prompt, f.subject)
        ids += tok(f.prompt)["input_ids"][s0:s1]
    W = lm.sites.embed().weight.detach()
    assert subject_embedding_std(lm, facts) == pytest.approx(float(W[ids].std()), rel=1e-6)
    assert subject_embedding_std(lm, facts) != pytest.approx(embedding_std(lm), rel=1e-3)
    # a one-token subject at position 0 (the tiny tokenizer adds no BOS): with clean_pos0 nothing is noised
    prompt, subj, target = "X is a city in", "X", "Paris"
    assert subject_token_span(tok, prompt, subj) == (0, 1)
    on = trace_fact(lm, prompt, subj, target, TraceConfig(n_noise=2, kinds=["hidden"], clean_pos0=True), precision=FP32)
    off = trace_fact(lm, prompt, subj, target, TraceConfig(n_noise=2, kinds=["hidden"]), precision=FP32)
    assert on.p_corrupt == pytest.approx(on.p_clean, abs=1e-6) and not on.pos0_noised
    assert off.p_corrupt != pytest.approx(off.p_clean, abs=1e-6) and off.pos0_noised
    # a subject after position 0 is noised the same with or without clean_pos0
    a = trace_fact(lm, "A " + PROMPT, SUBJECT, TARGET, TraceConfig(n_noise=2, kinds=["hidden"], clean_pos0=True),
                   precision=FP32)
    b = trace_fact(lm, "A " + PROMPT, SUBJECT, TARGET, TraceConfig(n_noise=2, kinds=["hidden"]), precision=FP32)
    assert a.effects == b.effects and not a.pos0_noised and not b.pos0_noised
    # new fields at their defaults stay out of trial keys (old studies keep their keys)
    assert TraceConfig().key_dump() == TraceConfig().model_dump(exclude={"measure", "noise_from", "clean_pos0",
                                                                         "fraction_positions", "corruption", "compare"})
    assert TraceConfig(measure="fraction").key_dump()["measure"] == "fraction"
