"""Fact forcing (Hase et al. 2023), the fifth editing problem: the edit must give the true object when the subject's
token embeddings are noised as in causal tracing. Checked by hand on a tiny model: a row's embedding noise is what
a forward on (embeddings + noise) gives, through the full forward and through the frozen prefix; FT trains on the
noised prompt (its first loss is the target NLL under each noise draw, computed by hand) and its returned scores
equal a forward of the noised prompt with the edit baked in; ROME's k* is the noised prompt's key and
(W + dW) k* = v* holds on it; the scores by hand; the study runs fact forcing end to end and scores the noised
prompt under the noise it trained on."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from locaudit.data.facts import subject_token_span
from locaudit.edit.layer_edit import EditRow, LayerEditConfig, RowNoise, score_rows, train_layer_edits
from locaudit.errors import ConfigError
from locaudit.evaluate.facts import PROBLEMS, efficacy, fact_metrics, rewrite_score
from locaudit.models.precision import resolve_precision
from locaudit.models.tiny import tiny_model

P = resolve_precision("fp32")
L = math.log


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", n_layers=3)


def _logp_by_hand(lm, prompt, completion, noise=None, start=0):
    """Summed log p(completion | prompt) from inputs_embeds = embed(ids) + noise at start.. (no hooks)."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        e = lm.model.get_input_embeddings()(ids).clone()
        if noise is not None:
            e[0, start: start + noise.shape[0]] += noise
        lp = torch.log_softmax(lm.model(inputs_embeds=e).logits[0].float(), -1)
    return float(sum(lp[len(prompt) - 1 + i, t] for i, t in enumerate(completion)))


def _row(lm, prompt, subject, target, seed, scale=2.0):
    tok = lm.tokenizer
    ids = list(tok(prompt)["input_ids"])
    s0, s1 = subject_token_span(tok, prompt, subject)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(s1 - s0, lm.sites.d_model, generator=g) * scale
    return ids, list(tok(target, add_special_tokens=False)["input_ids"]), RowNoise(s0, z, f"t{seed}"), (s0, s1)


def test_scores_by_hand():
    assert "fact_forcing" in PROBLEMS
    # p(o_true | noised) 0.2 -> 0.6: (0.6 - 0.2) / 0.8 of what could be recovered
    assert rewrite_score("fact_forcing", L(0.2), L(0.6)) == pytest.approx(0.5)
    assert efficacy("fact_forcing", L(0.2), L(0.6), L(0.3)) == 1.0  # beats the corrupted run's prediction
    assert efficacy("fact_forcing", L(0.2), L(0.6), L(0.7)) == 0.0
    assert efficacy("fact_forcing", L(0.2), L(0.6), None) == 1.0 and efficacy("fact_forcing", L(0.2), L(0.1)) == 0.0
    m = fact_metrics("fact_forcing", {"true": L(0.2), "new": L(0.5), "nb_true": [L(0.4)], "nb_target": [L(0.1)]},
                     {"true": L(0.6), "new": L(0.3), "nb_true": [L(0.4)], "nb_target": [L(0.2)]})
    assert m["rewrite_score"] == pytest.approx(0.5) and m["efficacy"] == 1.0
    assert (m["p_noise_top_pre"], m["p_noise_top_post"]) == pytest.approx((0.5, 0.3))
    assert m["neighbourhood_stability"] == pytest.approx(1 - 0.1 / 0.9)
    assert "neighbourhood_score" not in m  # ROME's NS compares a new object: none here


def test_row_noise_is_embeddings_plus_noise(lm):
    ids, tgt, z, _ = _row(lm, "Paris is a city in", "Paris", " France", 1)
    clean = EditRow(ids, tgt, 0)
    noised = EditRow(ids, tgt, 0, noise=z)
    got = score_rows(lm, [clean, noised], precision=P)
    assert float(got[0]) == pytest.approx(_logp_by_hand(lm, ids, tgt), abs=1e-4)
    assert float(got[1]) == pytest.approx(_logp_by_hand(lm, ids, tgt, z.values, z.start), abs=1e-4)
    assert abs(float(got[1]) - float(got[0])) > 1e-3  # the noise changed the prediction
    with pytest.raises(ConfigError, match="does not fit"):
        score_rows(lm, [EditRow(ids[:1], tgt, 0, noise=z)], precision=P)


@pytest.mark.parametrize("layer", [0, 2])
def test_ft_trains_and_scores_on_the_noised_prompt(lm, layer):
    ids, tgt, z1, _ = _row(lm, "Paris is a city in", "Paris", " France", 1)
    _, _, z2, _ = _row(lm, "Paris is a city in", "Paris", " France", 2)
    train = [EditRow(ids, tgt, 0, "target", noise=z1), EditRow(ids, tgt, 0, "target", noise=z2)]
    score = [EditRow(ids, tgt, 0, noise=z1), EditRow(ids, tgt, 0)]
    cfg = LayerEditConfig(method="ft", steps=4, lr=0.05, norm_bound=0.05, nll="sum")
    edits, post, info = train_layer_edits(lm, layer, train, score, 1, "fact_forcing", cfg, P)
    # the first step's loss (before any update) is the mean NLL over the two noise draws, by hand
    first = -(_logp_by_hand(lm, ids, tgt, z1.values, z1.start) + _logp_by_hand(lm, ids, tgt, z2.values, z2.start)) / 2
    assert info["loss_first"] == pytest.approx(first, abs=1e-4)
    # the frozen prefix carried the noise: scores equal a hand forward with the edit baked in
    with edits.applied(lm, 0):
        assert float(post[0]) == pytest.approx(_logp_by_hand(lm, ids, tgt, z1.values, z1.start), abs=1e-4)
        assert float(post[1]) == pytest.approx(_logp_by_hand(lm, ids, tgt), abs=1e-4)
    if layer == 0:  # the edit made the object more likely on the noised prompt it was trained on
        assert float(post[0]) > _logp_by_hand(lm, ids, tgt, z1.values, z1.start) + 0.1


def test_rome_key_and_constraint_on_the_noised_prompt(lm):
    from locaudit.edit.rome import rank_one, rome_layer_edits

    layer = 1
    ids, tgt, z, (s0, s1) = _row(lm, "Paris is a city in", "Paris", " France", 3)
    g = torch.Generator().manual_seed(0)
    A = torch.randn(4 * lm.sites.d_model, lm.sites.mlp_down(layer).weight.shape[1], generator=g, dtype=torch.float64)
    C = A.t() @ A / A.shape[0]
    cfg = LayerEditConfig(method="rome", steps=10, lr=0.5)
    train = [EditRow(ids, tgt, 0, "target", noise=z)]
    edits, post, info = rome_layer_edits(lm, layer, train, [s1 - 1], [EditRow(ids, tgt, 0, noise=z)], 1,
                                         "fact_forcing", cfg, C, P)
    # k* by hand: the down-projection's input at the last subject token of the noised prompt
    seen = {}
    def grab(m, a, o):
        seen["k"] = a[0][0, s1 - 1].clone()

    h = lm.sites.mlp_down(layer).register_forward_hook(grab)
    try:
        with torch.no_grad():
            e = lm.model.get_input_embeddings()(torch.tensor([ids])).clone()
            e[0, s0:s1] += z.values
            lm.model(inputs_embeds=e)
    finally:
        h.remove()
    k = info["k"][0].double()
    np.testing.assert_allclose(k.numpy(), seen["k"].double().numpy(), rtol=1e-5, atol=1e-6)
    W = lm.sites.mlp_down(layer).weight.detach().double()
    dW = edits.delta(0).double()
    v = info["v"][0].double()
    np.testing.assert_allclose(((W + dW) @ k).numpy(), v.numpy(), rtol=1e-4, atol=1e-4 * float(v.abs().max()))
    np.testing.assert_allclose(edits.a[0].double().numpy(), rank_one(C, k.unsqueeze(0))[0].numpy(), rtol=1e-4)
    with edits.applied(lm, 0):
        assert float(post[0]) == pytest.approx(_logp_by_hand(lm, ids, tgt, z.values, z.start), abs=1e-4)


def test_forcing_settings():
    c = LayerEditConfig(method="ft", steps=25, forcing={"steps": 50})
    assert c.for_problem("fact_forcing").steps == 50 and c.for_problem("error_injection").steps == 25
    assert c.noise_samples() == 10 and LayerEditConfig(method="rome").noise_samples() == 1
    assert LayerEditConfig(method="ft", forcing_samples=3).noise_samples() == 3
    assert "forcing" not in LayerEditConfig().key_dump()  # old trial keys stay
    with pytest.raises(ValueError, match="forcing"):
        LayerEditConfig(forcing={"bogus": 1})
    with pytest.raises(ValueError):
        LayerEditConfig(forcing={"steps": 0})


def test_tiny_study_fact_forcing(tmp_path, lm):
    import pandas as pd

    from locaudit.study.hase.report import build_report, summary_text
    from locaudit.study.hase.run import run_hase
    from locaudit.study.hase.spec import load_hase_spec

    recs = [{"id": str(i), "subject": s, "prompt": f"The city of {s} is in", "target": o, "relation_id": "R1",
             **({"paraphrases": [f"Where is {s}? {s} lies in"]} if i % 2 == 0 else {})}
            for i, (s, o) in enumerate([("Paris", "France"), ("Rome", "Italy"), ("Oslo", "Norway"), ("Bern", "Swiss"),
                                        ("Lima", "Peru")])]
    (tmp_path / "facts.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    (tmp_path / "study.yaml").write_text(
        "name: tiny\nfacts: {path: facts.jsonl, known_top_k: 259, max_facts: 5, n_neighbours: 2}\n"
        "tracing: {n_noise: 4, kinds: [mlp], measure: fraction, noise_from: subject, clean_pos0: true,\n"
        "  compare: [{noise_scale: 1.5}, {clean_pos0: false}, {corruption: str}]}\n"
        "layers: [0, 2]\n"
        "editing: {problems: [fact_forcing], methods: [ft, rome],\n"
        "  ft: {steps: 3, lr: 0.05, norm_bound: 0.1, batch_facts: 5, nll: sum, forcing_samples: 3},\n"
        "  rome: {steps: 5, lr: 0.5, batch_facts: 5, cov_tokens: 3000, forcing: {steps: 6}}}\n"
        "analysis: {bootstrap: 20, permutations: 50}\n")
    spec = load_hase_spec(tmp_path / "study.yaml")
    res = run_hase(spec, tmp_path / "run", lm=lm, progress=False)
    assert res["counts"]["failed"] == 0 and res["counts"]["done"] == 2 + 2 * 2, res
    index = build_report(tmp_path / "run")
    edits = pd.read_csv(index.parent / "edits.csv")
    # the tracing variable under each compared setting, beside the main one, per editor
    vt = pd.read_csv(index.parent / "r2_by_tracing.csv")
    assert len(vt) == 4 * 2 and vt["tracing"].iloc[0] == "main" and vt["r2_tracing"].notna().all()
    assert set(vt[vt["tracing"].str.contains("str")]["n_facts"]) == {4}  # Paris has no 5-letter partner
    assert "tracing.compare" in index.read_text() and "position 0" in summary_text(tmp_path / "run")
    assert set(edits["problem"]) == {"fact_forcing"} and len(edits) == 5 * 2 * 2
    assert edits["rewrite_score"].notna().all() and edits["paraphrase_score"].notna().sum() == 3 * 4
    # the pre-edit probability is the noised prompt's: below the clean prompt's for most facts
    from locaudit.study.hase.steps import forcing_noise_std, subject_noise
    from locaudit.data.facts import Fact

    facts = [Fact(id=r["id"], subject=r["subject"], prompt=r["prompt"], target=r["target"], relation_id="R1")
             for r in recs]
    std = forcing_noise_std(lm, spec, facts)
    f = facts[0]
    z = subject_noise(lm, spec, f.prompt, f.subject, f.id, 3, std, "prompt")
    assert len(z) == 3 and not torch.equal(z[0].values, z[1].values)
    tgt = list(lm.tokenizer(" " + f.target, add_special_tokens=False)["input_ids"])
    ids = list(lm.tokenizer(f.prompt)["input_ids"])
    row = edits[(edits["fact"].astype(str) == "0") & (edits["method"] == "ft")].iloc[0]
    hand = _logp_by_hand(lm, ids, tgt, z[0].values, z[0].start)
    assert row["p_true_pre"] == pytest.approx(math.exp(hand), rel=1e-3)
