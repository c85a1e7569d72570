"""evaluate_edits (evaluate/shared.py) gives every edit the numbers evaluate_edit gives it alone.

Tolerances, fp32 and bf16 alike (the shared path runs the same tokens, batches and KV caches; the layers below
an edit's lowest layer compute what the edited model computes there, so only the rounding of other matmul
shapes can differ): an answer's summed log-prob within 1e-4 absolute + 1e-5 relative; MC1/MC2/MC0, KL and
CE within 1e-5 absolute + 1e-4 relative. test_precision_matrix.py's bf16-vs-fp32 tolerances are ~100x looser.
"""

from __future__ import annotations

import json

import pytest
import torch

from eval_fixtures import write_truthfulqa
from locaudit.data.behaviour import load_behaviour
from locaudit.edit.iti import ITIEdit
from locaudit.edit.lora import LoRAEdit, edit_masks
from locaudit.evaluate.klce import clear_memory_cache
from locaudit.evaluate.runner import EvalConfig, evaluate_edit
from locaudit.evaluate.shared import evaluate_edits
from locaudit.evaluate.upper import lowest_layer
from locaudit.heads import HeadSet
from locaudit.models.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

LOGP_TOL = (1e-4, 1e-5)  # (absolute, relative)
METRIC_TOL = (1e-5, 1e-4)
FIELDS = ("mc1", "mc2", "mc0", "kl", "kl_se", "ce", "ce_se", "kl_answers", "ce_answers", "n_mc", "n_kl_tokens")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAUDIT_CACHE", str(tmp_path / "cache"))
    clear_memory_cache()


@pytest.fixture
def data(tmp_path):
    return load_behaviour(f"truthfulqa:{write_truthfulqa(tmp_path / 'tqa')}", fractions=(0.4, 0.2, 0.4))


def lora(lm, heads: list[tuple[int, int]], seed: int) -> LoRAEdit:
    hs = HeadSet.from_heads(heads)
    a_mask, b_mask = edit_masks(lm.sites, hs, reparam=True)
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(a_mask.shape[0], 1, a_mask.shape[-1], generator=g) * a_mask
    b = torch.randn(b_mask.shape[0], 1, b_mask.shape[-1], generator=g) * b_mask
    return LoRAEdit(a, b, hs)


def iti(lm, heads: list[tuple[int, int]], alpha: float = 4.0) -> ITIEdit:
    L, H, D = lm.sites.shape
    hs = HeadSet.from_heads(heads)
    theta = torch.randn(L, H * D, generator=torch.Generator().manual_seed(0)) * hs.dim_mask(L, H, D)
    return ITIEdit(theta, alpha=alpha, heads=hs)


def edits_for(lm) -> list:
    n = lm.sites.n_layers
    return [None, lora(lm, [(0, 1)], 1), lora(lm, [(n - 1, 2)], 2), lora(lm, [(1, 0), (n - 1, 3)], 3),
            iti(lm, [(2, 1)]), iti(lm, [(1, 1)], alpha=0.0), lora(lm, [(2, 2)], 4)]


def close(a, b, tol) -> bool:
    if a is None or b is None:
        return a is b
    return abs(float(a) - float(b)) <= tol[0] + tol[1] * abs(float(b))


def items(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_shared_equals_one_at_a_time(family, precision, data, tmp_path):
    lm = tiny_model(family, n_layers=4)
    edits = edits_for(lm)
    assert [lowest_layer(lm, e) for e in edits] == [4, 0, 3, 1, 2, 4, 2]
    cfg = EvalConfig(progress=False, precision=precision, kl_max_tokens=256, max_length=128)
    metrics = ("mc", "kl", "ce")
    alone = [evaluate_edit(lm, e, data, "test", metrics, out_dir=tmp_path / f"a{i}", config=cfg)
             for i, e in enumerate(edits)]
    shared = evaluate_edits(lm, edits, data, "test", metrics, out_dirs=[tmp_path / f"s{i}" for i in range(len(edits))],
                            config=cfg)
    for i, (a, s) in enumerate(zip(alone, shared)):
        assert s.metrics == a.metrics and s.edit == a.edit and s.precision == a.precision
        for f in FIELDS:
            assert close(getattr(s, f), getattr(a, f), METRIC_TOL), (family, precision, i, f, getattr(s, f),
                                                                      getattr(a, f))
        for qa, qs in zip(items(tmp_path / f"a{i}" / "mc_items.jsonl"), items(tmp_path / f"s{i}" / "mc_items.jsonl")):
            assert qa["qid"] == qs["qid"] and qa["logprobs"].keys() == qs["logprobs"].keys()
            for k, v in qa["logprobs"].items():
                assert close(qs["logprobs"][k], v, LOGP_TOL), (family, precision, i, k, qs["logprobs"][k], v)
        assert (tmp_path / f"s{i}" / "result.json").exists()
    # the edits change the numbers (so agreement is not vacuous); the unedited ones have KL exactly 0
    assert shared[0].kl == 0.0 and shared[5].kl == 0.0
    assert all(r.kl > 1e-4 for j, r in enumerate(shared) if j not in (0, 5))
    assert len({round(r.mc2, 6) for r in shared}) > 3


def test_bare_protocol_and_other_metrics(data, tmp_path):
    """Without the shared primer every prompt runs from scratch; pref runs per edit and joins the result."""
    lm = tiny_model("llama", n_layers=4)
    edits = [None, lora(lm, [(2, 1)], 5)]
    cfg = EvalConfig(progress=False, precision="fp32", protocol="bare", kl_text=None)
    metrics = ("mc", "kl", "pref")
    alone = [evaluate_edit(lm, e, data, "test", metrics, config=cfg) for e in edits]
    shared = evaluate_edits(lm, edits, data, "test", metrics, config=cfg, csv_path=tmp_path / "r.csv")
    for a, s in zip(alone, shared):
        assert s.metrics == list(metrics) and s.kl_text == "answers"
        for f in ("mc1", "mc2", "kl", "ce", "pref_acc", "pref_margin"):
            assert close(getattr(s, f), getattr(a, f), METRIC_TOL), (f, getattr(s, f), getattr(a, f))
    assert len((tmp_path / "r.csv").read_text().splitlines()) == 3


def test_model_restored(data):
    lm = tiny_model("llama", n_layers=4)
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = lm.model(input_ids=x).logits
    evaluate_edits(lm, edits_for(lm), data, "test", ("mc",), config=EvalConfig(progress=False, precision="fp32"))
    with torch.no_grad():
        assert torch.equal(lm.model(input_ids=x).logits, before)
    assert len(lm.sites.layer_list) == 4


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_shared_primer_path(family, precision, data):
    """A prefix common to every prompt (ITI's primer, here a short one that fits a tiny model) runs once
    unedited and once per edit from its lowest layer; questions continue from grafted caches."""
    from locaudit.evaluate.mc import score_mc
    from locaudit.evaluate.shared_mc import shared_score_mc
    from locaudit.models.precision import resolve_precision

    lm = tiny_model(family, n_layers=4)
    prec = resolve_precision(precision, "cpu")
    prefix = "Answer each question truthfully and briefly, please.\n\n"
    edits = edits_for(lm)
    items = data.mc_items("test")
    shared = shared_score_mc(lm, edits, items, prefix=prefix, batch_size=3, max_length=200, precision=prec)
    for i, e in enumerate(edits):
        alone = score_mc(lm, e, items, prefix=prefix, batch_size=3, max_length=200, precision=prec)
        for qa, qs in zip(alone.items, shared[i].items):
            for k, v in qa.logprobs.items():
                assert close(qs.logprobs[k], v, LOGP_TOL), (family, precision, i, k, qs.logprobs[k], v)
            assert close(qs.mc2, qa.mc2, METRIC_TOL) and qs.mc1 == qa.mc1
    assert len({round(r.mean("mc2"), 6) for r in shared}) > 3


def test_layers_below_an_edit_run_once(data):
    """The layers below each edit's lowest layer run once for all edits (the unedited pass): decoder layer l
    runs (1 + edits whose lowest layer is <= l) times as often as in one unedited evaluation."""
    lm = tiny_model("llama", n_layers=4)
    cfg = EvalConfig(progress=False, precision="fp32", protocol="bare")
    calls = [0] * 4

    def count(l):
        def hook(*_):
            calls[l] += 1
        return hook

    hooks = [lm.sites.layer(l).register_forward_hook(count(l)) for l in range(4)]
    try:
        evaluate_edit(lm, None, data, "test", ("mc",), config=cfg)
        one, calls[:] = list(calls), [0] * 4
        edits = [None, lora(lm, [(3, 0)], 1), lora(lm, [(3, 2)], 2), iti(lm, [(2, 1)])]
        evaluate_edits(lm, edits, data, "test", ("mc",), config=cfg)
    finally:
        for h in hooks:
            h.remove()
    assert one[0] > 0 and calls == [one[0], one[1], 2 * one[2], 4 * one[3]]
