"""Activation patching per head (localize/patching.py, corruptions.py), HeadEffects and agreement.

The reference is a hand-written computation, one head and one sequence at a time: plain forward
(pre-)hooks on the model's modules, the tokenizer called directly, log-probs from the full logits.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from locaudit.data.types import PreferencePair
from locaudit.errors import ConfigError, DataError
from locaudit.localize.agreement import agreement, jaccard, jaccard_null, random_pair_null
from locaudit.localize.corruptions import (PatchingConfig, contrast_questions, prompt_noise, select_pairs,
                                           swap_options)
from locaudit.localize.effects import HeadEffects
from locaudit.localize.causal import localize_heads
from locaudit.localize.patching import activation_patching
from locaudit.models.tiny import tiny_model
from locaudit.models.precision import resolve_precision as _P  # resolved once, as entry points do

PAIRS = [PreferencePair(f"q{i}", f"What is {i} plus {i}?", f"It is {2 * i}.", f"Maybe {i + 7} or so")
         for i in range(4)]


pytestmark = pytest.mark.usefixtures("one_thread")


def PC(**kw) -> PatchingConfig:
    """The configs these references are written for: noise or the given corruption, patched at every position
    (the defaults are contrast at the completion positions); position 0 is never noised (as the default)."""
    return PatchingConfig(**{"corruption": "noise", "positions": "all", **kw})


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm(request):
    return tiny_model(request.param, with_bias=True)


# ------------------------------------------------------------------ the hand-written reference
def _tokens(tok, question: str, answer: str) -> tuple[list[int], list[int]]:
    p = tok(f"Q: {question}\nA:")["input_ids"]
    c = tok(f" {answer}", add_special_tokens=False)["input_ids"]
    return list(p), list(c)


def _avg_logp(model, p, c, pre=None, emb=None) -> float:
    """Mean log p(completion | prompt) of one sequence, with optional hooks (module -> fn)."""
    handles = []
    for mod, fn in (pre or {}).items():
        handles.append(mod.register_forward_pre_hook(lambda m, a, fn=fn: (fn(a[0]),) + tuple(a[1:])))
    if emb is not None:
        handles.append(emb[0].register_forward_hook(lambda m, a, out: out + emb[1]))
    try:
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double()
    finally:
        for h in handles:
            h.remove()
    lp = F.log_softmax(logits, -1)
    P = len(p)
    return float(sum(lp[P - 1 + j, c[j]] for j in range(len(c))) / len(c))


def _capture(model, mod, p, c, emb=None) -> torch.Tensor:
    store = {}

    def fn(o):
        store["o"] = o.detach().clone()
        return o
    _avg_logp(model, p, c, {mod: fn}, emb)
    return store["o"]


def _reference_effects(lm, pairs, corruption: str, scale: float = 3.0, seed: int = 0, contrast=None) -> torch.Tensor:
    """Float64[n, L, H] effects, one head and one sequence at a time (positions 'all')."""
    model, tok, sites = lm.model, lm.tokenizer, lm.sites
    L, H, D = sites.shape
    emb_mod = model.get_input_embeddings()
    seqs = [(_tokens(tok, p.question, p.chosen), _tokens(tok, p.question, p.rejected)) for p in pairs]
    if corruption == "noise":
        ids = sorted({t for (pc, _), _ in seqs for t in pc})
        with torch.no_grad():
            sigma = float(emb_mod(torch.tensor(ids)).std())
    if corruption == "mean":  # mean over every token of every sequence
        means = []
        for l in range(L):
            outs = [_capture(model, sites.o_proj(l), p, c)[0] for pair in seqs for (p, c) in pair]
            means.append(torch.cat(outs).mean(0))
    out = torch.zeros(len(pairs), L, H, dtype=torch.float64)
    for i, pair in enumerate(seqs):
        m_base, noise = 0.0, None
        for s, (p, c) in enumerate(pair):
            sgn = 1 if s == 0 else -1
            if corruption == "noise":
                noise = torch.zeros(1, len(p) + len(c), sites.d_model)
                noise[0, 1: len(p)] = prompt_noise(i, len(p), sites.d_model, seed)[1:] * scale * sigma  # pos 0 clean
                base_emb = (emb_mod, noise)  # denoise: the base run is the noised run
                m_base += sgn * _avg_logp(model, p, c, emb=base_emb)
            else:
                m_base += sgn * _avg_logp(model, p, c)
        for l in range(L):
            for h in range(H):
                m_p = 0.0
                for s, (p, c) in enumerate(pair):
                    sgn = 1 if s == 0 else -1
                    sl = slice(h * D, (h + 1) * D)
                    if corruption == "noise":
                        noise = torch.zeros(1, len(p) + len(c), sites.d_model)
                        noise[0, 1: len(p)] = prompt_noise(i, len(p), sites.d_model, seed)[1:] * scale * sigma
                        clean = _capture(model, sites.o_proj(l), p, c)

                        def fn(o, clean=clean, sl=sl):
                            o = o.clone()
                            o[..., sl] = clean[..., sl]
                            return o
                        m_p += sgn * _avg_logp(model, p, c, {sites.o_proj(l): fn}, (emb_mod, noise))
                    elif corruption == "mean":
                        def fn(o, sl=sl, l=l):
                            o = o.clone()
                            o[..., sl] = means[l][sl]
                            return o
                        m_p += sgn * _avg_logp(model, p, c, {sites.o_proj(l): fn})
                    else:  # contrast, noising: the contrast prompt's head value, aligned from the prompt end
                        pq, _ = _tokens(tok, contrast[i], "x")
                        src = _capture(model, sites.o_proj(l), pq, c)
                        P, Pq = len(p), len(pq)

                        def fn(o, src=src, sl=sl, P=P, Pq=Pq):
                            o = o.clone()
                            for t in range(max(0, P - Pq), o.shape[1]):
                                o[0, t, sl] = src[0, t - P + Pq, sl]
                            return o
                        m_p += sgn * _avg_logp(model, p, c, {sites.o_proj(l): fn})
                out[i, l, h] = (m_p - m_base) if corruption == "noise" else (m_base - m_p)
    return out


@pytest.mark.parametrize("corruption", ["noise", "mean", "contrast"])
def test_patching_matches_hand_written_hooks(lm, corruption):
    cfg = PC(corruption=corruption, batch_pairs=3, tokens_per_forward=300)  # several copies per forward
    got = activation_patching(lm, PAIRS, cfg, progress=False, precision=_P('fp32'))
    contrast = contrast_questions(PAIRS, "other_question", 0) if corruption == "contrast" else None
    ref = _reference_effects(lm, PAIRS, corruption, contrast=contrast)
    assert got.per_example.shape == ref.shape
    assert torch.allclose(got.per_example.double(), ref, atol=1e-5, rtol=0), \
        float((got.per_example.double() - ref).abs().max())
    assert got.effect.abs().max() > 1e-3  # the comparison is not trivially 0 = 0
    assert torch.allclose(got.effect.double(), ref.mean(0), atol=1e-5)
    assert torch.allclose(got.se.double(), ref.std(0) / math.sqrt(len(PAIRS)), atol=1e-5)


def test_clean_into_clean_and_zero_noise_give_zero(lm):
    for direction in ("denoise", "noise"):
        eff = activation_patching(lm, PAIRS, PC(noise_scale=0.0, direction=direction), progress=False, precision=_P('fp32'))
        assert eff.per_example.abs().max() == 0.0
        assert eff.meta["m_clean_mean"] == pytest.approx(eff.meta["m_corrupt_mean"])
    # a contrast prompt equal to the clean prompt (options swapped twice) patches clean values into the clean run
    same = [PreferencePair("a", "Pick one.\n(A) yes\n(B) no", "(A)", "(B)"),
            PreferencePair("b", "Pick.\n(A) red\n(B) blue", "(B)", "(A)")]
    eff = activation_patching(lm, same, PC(corruption="contrast", contrast="swap_options"), progress=False, precision=_P('fp32'))
    assert eff.effect.abs().max() > 0  # a real contrast moves the metric


def test_batching_does_not_change_numbers(lm):
    one = activation_patching(lm, PAIRS, PC(batch_pairs=1, tokens_per_forward=64), progress=False, precision=_P('fp32'))
    many = activation_patching(lm, PAIRS, PC(batch_pairs=4, tokens_per_forward=1 << 20), progress=False, precision=_P('fp32'))
    assert torch.allclose(one.per_example, many.per_example, atol=2e-6)


def test_layers_below_the_patched_head_are_not_recomputed(lm):
    calls = {"n": 0}
    handle = lm.sites.layer(0).register_forward_hook(lambda m, a, out: calls.__setitem__("n", calls["n"] + 1))
    try:
        top = lm.sites.n_layers - 1
        skip = activation_patching(lm, PAIRS, PC(heads=f"L{top}", batch_pairs=4), progress=False, precision=_P('fp32'))
        n_skip = calls["n"]
        calls["n"] = 0
        full = activation_patching(lm, PAIRS, PC(heads=f"L{top}", batch_pairs=4, skip_layers=False,
                                                             tokens_per_forward=64), progress=False, precision=_P('fp32'))
    finally:
        handle.remove()
    assert n_skip == 2  # the clean capture and the base run; no patched forward runs layer 0
    assert calls["n"] > 2
    assert torch.allclose(skip.effect[top], full.effect[top], atol=2e-6)


def test_restricted_heads_and_positions(lm):
    H = lm.sites.n_heads
    full = activation_patching(lm, PAIRS, PC(), progress=False, precision=_P('fp32'))
    part = activation_patching(lm, PAIRS, PC(heads="L1,L0H2"), progress=False, precision=_P('fp32'))
    done = torch.isfinite(part.effect)
    assert int(done.sum()) == H + 1 and bool(done[1].all()) and bool(done[0, 2])
    assert torch.allclose(part.effect[done], full.effect[done], atol=2e-6)
    assert part.ranking()[-1] not in {(1, h) for h in range(H)}  # NaN heads rank last
    last = activation_patching(lm, PAIRS, PC(positions="last"), progress=False, precision=_P('fp32'))
    assert not torch.allclose(last.effect, full.effect)
    # noise only touches the prompt, so patching at the prompt's positions only still has effects
    prompt = activation_patching(lm, PAIRS, PC(positions="prompt"), progress=False, precision=_P('fp32'))
    assert prompt.effect.abs().max() > 0


def test_config_errors():
    with pytest.raises((ConfigError, ValueError)):
        PC(corruption="mean", direction="denoise")
    with pytest.raises(ValueError):
        PC(noise_scale=-1)
    with pytest.raises(ValueError):
        PC(bogus=1)
    with pytest.raises(DataError, match="options"):
        swap_options("no options here")
    with pytest.raises(DataError, match="two different"):
        contrast_questions(PAIRS[:1] * 3, "other_question")


def test_contrast_constructions():
    s = swap_options("Q?\n\nChoices:\n (A) Yes, always\n (B) No\n\nAnswer:")
    assert s == "Q?\n\nChoices:\n (A) No\n (B) Yes, always\n\nAnswer:"
    assert swap_options(s) == "Q?\n\nChoices:\n (A) Yes, always\n (B) No\n\nAnswer:"
    pairs = PAIRS + [PreferencePair("q0", PAIRS[0].question, "x", "y")]
    cq = contrast_questions(pairs, "other_question", seed=3)
    assert all(c != p.question for c, p in zip(cq, pairs))
    assert cq == contrast_questions(pairs, "other_question", seed=3)


def test_select_pairs_covers_questions_first():
    pairs = [PreferencePair(f"q{i % 3}", f"Q{i % 3}", f"c{i}", f"r{i}") for i in range(9)]
    sel = select_pairs(pairs, 3, seed=1)
    assert sorted(p.qid for p in sel) == ["q0", "q1", "q2"]
    assert select_pairs(pairs, 3, seed=1) == sel
    assert select_pairs(pairs, None) == pairs
    with pytest.raises(DataError):
        select_pairs([], 3)


# ------------------------------------------------------------------ HeadEffects
def test_head_effects_roundtrip_and_ranking(tmp_path):
    per = torch.tensor([[[0.5, -2.0], [0.1, float("nan")]], [[0.7, -1.0], [0.3, float("nan")]]])
    eff = HeadEffects.from_per_example(per, "patching", {"model": "m", "top_k": 2})
    assert eff.ranking() == [(0, 1), (0, 0), (1, 0), (1, 1)]
    assert eff.ranking("signed") == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert eff.top(2).heads == ((0, 0), (0, 1))
    assert float(eff.se[0, 0]) == pytest.approx(np.std([0.5, 0.7], ddof=1) / math.sqrt(2))
    eff.save(tmp_path)
    for name in ("effects.csv", "ranking.json", "effects_heatmap.png", "effects.safetensors", "meta.json"):
        assert (tmp_path / name).stat().st_size > 0
    ranking = json.loads((tmp_path / "ranking.json").read_text())
    assert [r["name"] for r in ranking] == ["L0H1", "L0H0", "L1H0", "L1H1"] and ranking[-1]["effect"] is None
    back = HeadEffects.load(tmp_path)
    assert torch.equal(back.effect.isnan(), eff.effect.isnan())
    assert torch.allclose(back.effect.nan_to_num(), eff.effect.nan_to_num())
    assert back.ranking() == eff.ranking() and back.n == 2 and back.method == "patching"
    (tmp_path / "effects.safetensors").unlink()  # the CSV alone is enough
    assert HeadEffects.load(tmp_path).ranking() == eff.ranking()
    (tmp_path / "meta.json").write_text("{")
    with pytest.raises(DataError, match="meta.json"):
        HeadEffects.load(tmp_path)


# ------------------------------------------------------------------ agreement
def test_agreement_matches_scipy_and_exact_null():
    from scipy.stats import kendalltau, spearmanr

    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.normal(size=(6, 5)))
    b = a + torch.from_numpy(rng.normal(size=(6, 5)))
    r = agreement(a, b, k=5)
    assert r["spearman"] == pytest.approx(spearmanr(a.reshape(-1), b.reshape(-1))[0])
    assert r["kendall"] == pytest.approx(kendalltau(a.reshape(-1), b.reshape(-1))[0])
    ta = set(np.argsort(-a.reshape(-1).numpy())[:5])
    tb = set(np.argsort(-b.reshape(-1).numpy())[:5])
    assert r["jaccard"] == pytest.approx(len(ta & tb) / len(ta | tb))
    # the exact hypergeometric null of the Jaccard index against a Monte-Carlo of random 5-sets of 30 heads
    null = jaccard_null(30, 5)
    sims = [jaccard(set(rng.choice(30, 5, replace=False)), set(rng.choice(30, 5, replace=False))) for _ in range(5000)]
    assert null["mean"] == pytest.approx(np.mean(sims), abs=0.01)
    assert sum(null["pmf"]) == pytest.approx(1.0)
    mc = random_pair_null(30, 5, 1000, seed=1)
    assert mc["mc_jaccard_mean"] == pytest.approx(null["mean"], abs=0.015)
    assert abs(mc["mc_spearman_mean"]) < 0.03
    assert agreement(a, a, k=5)["jaccard"] == 1.0 and agreement(a, a, k=5)["p_jaccard"] < 1e-4
    # rankings (best first) give the same statistics as the scores they come from
    rank_a = sorted(((l, h) for l in range(6) for h in range(5)), key=lambda lh: -float(a[lh]))
    rank_b = sorted(((l, h) for l in range(6) for h in range(5)), key=lambda lh: -float(b[lh]))
    rr = agreement(rank_a, rank_b, k=5, shape=(6, 5))
    assert rr["jaccard"] == r["jaccard"] and rr["spearman"] == pytest.approx(r["spearman"])
    with pytest.raises(DataError):
        agreement(rank_a[:-1], rank_b, k=5, shape=(6, 5))


# ------------------------------------------------------------------ the cached entry point
class _Data:
    name, fingerprint = "toy", "fp-toy"

    def pairs(self, split):
        return list(PAIRS)


def test_localize_heads_caches_by_content(tmp_path, monkeypatch):
    lm = tiny_model("llama")
    cfg = {"max_pairs": 3, "corruption": "mean"}
    first = localize_heads(lm, _Data(), "patching", cfg, out_dir=tmp_path / "out", progress=False, precision=_P('fp32'))
    assert (tmp_path / "out" / "effects_heatmap.png").exists() and first.n == 3
    import locaudit.localize.patching as patching

    def boom(*a, **k):
        raise AssertionError("recomputed despite the cache")
    monkeypatch.setattr(patching, "activation_patching", boom)  # the registry imports it by name at each call
    again = localize_heads(lm, _Data(), "patching", cfg, progress=False, precision=_P('fp32'))
    assert torch.allclose(again.effect, first.effect) and again.meta["key"] == first.meta["key"]
    with pytest.raises(AssertionError, match="recomputed"):  # another config is another key
        localize_heads(lm, _Data(), "patching", {**cfg, "positions": "last"}, progress=False, precision=_P('fp32'))
    with pytest.raises(ConfigError):
        localize_heads(lm, _Data(), "probing", cfg, precision=_P('fp32'))


# ------------------------------------------------------------------ the command
def test_localize_cli_end_to_end(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from locaudit.cli.main import app

    monkeypatch.setenv("LOCAUDIT_CACHE", str(tmp_path / "cache"))
    from localize_fixtures import saved_model_and_pairs

    model, data = saved_model_and_pairs(tmp_path, 20)
    out = tmp_path / "loc"
    args = ["localize", "--model", str(model), "--data", f"pairs:{data}", "--method", "attribution",
            "--max-pairs", "4", "--top-k", "3", "--precision", "fp32", "--graddrop", "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "attribution (contrast, noise, positions completion) on 4 train pairs" in res.output
    ranking = json.loads((out / "ranking.json").read_text())
    assert len(ranking) == 12 and "graddrop" in ranking[0] and (out / "effects_heatmap.png").exists()
    assert f"L{ranking[0]['layer']}H{ranking[0]['head']}" in res.output
    bad = CliRunner().invoke(app, args[:-2] + ["--corruption", "mean", "--direction", "denoise", "--out", str(out)])
    assert bad.exit_code != 0 and "direction" in (bad.output + str(bad.exception))
    bad = CliRunner().invoke(app, ["localize", "--data", f"pairs:{data}", "--method", "probing", "--out", str(out)])
    assert bad.exit_code != 0 and "probing" in (bad.output + str(bad.exception))
