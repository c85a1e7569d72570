"""Head activations on tiny random models: exact o_proj inputs, padding-correct batching, streaming, cache."""

from __future__ import annotations

import json

import pytest
import torch

from locaudit.data.prompts import PromptFormat
from locaudit.errors import DataError
from locaudit.localize.activations import (
    ACTIVATIONS_FILE,
    EXAMPLES_FILE,
    META_FILE,
    ActivationSet,
    collect_activations,
    collect_probe_activations,
)
from locaudit.models.hooks import o_proj_hooks
from locaudit.models.precision import resolve_precision as _P  # resolved once, as entry points do

TEXTS = [
    "Q: What is the capital of France?\nA: Paris",
    "hi",
    "Q: Can pigs fly?\nA: No, pigs cannot fly.\nQ: Why is the sky blue?",
    "a b c",
    "The quick brown fox jumps over the lazy dog.",
    "x",
    "Q: 2+2?\nA: 4",
]


def _capture(lm, text: str) -> tuple[dict, dict]:
    """Full o_proj input and output of every layer for one text (reference, no locaudit collection code)."""
    ins, outs = {}, {}

    def post(l):
        def fn(o, out):
            ins[l], outs[l] = o.detach().clone(), out.detach().clone()
        return fn

    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad(), o_proj_hooks(lm.sites, post={l: post(l) for l in range(lm.sites.n_layers)}):
        lm.model(input_ids=ids, use_cache=False)
    return ins, outs


def test_heads_reassemble_o_proj_input_and_output(tiny):
    L, H, D = lm_shape = tiny.sites.shape
    text = TEXTS[2]
    ins, outs = _capture(tiny, text)
    T = ins[0].shape[1]
    heads = collect_activations(tiny, [text] * T, batch_size=4, positions=list(range(T)), progress=False, precision=_P('fp32'))
    assert heads.shape == (T, *lm_shape)
    for l in range(L):
        # per-head slices, concatenated, are exactly the o_proj input at each position
        assert (heads[:, l].reshape(T, H * D) - ins[l][0]).abs().max() < 1e-6
        W, b = tiny.sites.weight(l), tiny.sites.bias(l)
        per_head = sum(heads[:, l, h] @ W[:, tiny.sites.head_slice(h)].T for h in range(H))
        assert b is not None
        assert (per_head + b - outs[l][0]).abs().max() < 1e-5


def test_batched_with_padding_equals_one_at_a_time(tiny):
    batched = collect_activations(tiny, TEXTS, batch_size=3, progress=False, precision=_P('fp32'))
    single = torch.cat([collect_activations(tiny, [t], batch_size=1, progress=False, precision=_P('fp32')) for t in TEXTS])
    assert batched.shape == (len(TEXTS), *tiny.sites.shape)
    assert (batched - single).abs().max().item() < 1e-5
    # rows come back in the input order, not the length-sorted order
    assert (batched[1] - single[1]).abs().max() < 1e-5 and not torch.allclose(batched[0], batched[1])


def test_stopping_early_gives_the_same_values(tiny):
    a = collect_activations(tiny, TEXTS, batch_size=4, progress=False, stop_early=True, precision=_P('fp32'))
    b = collect_activations(tiny, TEXTS, batch_size=4, progress=False, stop_early=False, precision=_P('fp32'))
    assert torch.equal(a, b)


def test_streamed_file_equals_in_memory(tiny, tmp_path):
    from safetensors.torch import load_file

    mem = collect_activations(tiny, TEXTS, batch_size=2, progress=False, precision=_P('fp32'))
    path = tmp_path / "acts.safetensors"
    disk = collect_activations(tiny, TEXTS, batch_size=2, progress=False, out_path=path, precision=_P('fp32'))
    assert torch.equal(mem, disk)
    loaded = load_file(str(path))  # the streamed file is a standard safetensors file
    assert list(loaded) == ["heads"] and loaded["heads"].dtype == torch.float32
    assert torch.equal(loaded["heads"], mem)


def test_positions_and_bad_positions(tiny):
    last = collect_activations(tiny, TEXTS[:3], positions="last", progress=False, precision=_P('fp32'))
    neg = collect_activations(tiny, TEXTS[:3], positions=[-1, -1, -1], progress=False, precision=_P('fp32'))
    assert torch.equal(last, neg)
    first = collect_activations(tiny, TEXTS[:3], positions=[0, 0, 0], progress=False, precision=_P('fp32'))
    assert not torch.allclose(first[0], last[0])
    with pytest.raises(DataError, match=r"positions\[1\] = 50"):
        collect_activations(tiny, TEXTS[:3], positions=[0, 50, 0], progress=False, precision=_P('fp32'))
    with pytest.raises(DataError, match="one index per text"):
        collect_activations(tiny, TEXTS[:3], positions=[0, 0], progress=False, precision=_P('fp32'))
    with pytest.raises(DataError, match="'first'"):
        collect_activations(tiny, TEXTS[:3], positions="first", progress=False, precision=_P('fp32'))
    with pytest.raises(DataError, match=r"texts\[0\]"):
        collect_activations(tiny, [None], progress=False, precision=_P('fp32'))  # type: ignore[list-item]


def test_bf16_autocast_close_to_fp32():
    from locaudit.models.tiny import tiny_model

    lm = tiny_model("llama", with_bias=True)
    fp32 = collect_activations(lm, TEXTS, progress=False, precision=_P('fp32'))
    bf16 = collect_activations(lm, TEXTS, progress=False, precision=_P('bf16'))
    assert bf16.dtype == torch.float32
    rel = (bf16 - fp32).norm() / fp32.norm()
    assert 0 < rel.item() < 0.05


def test_empty_text_list(tiny):
    out = collect_activations(tiny, [], progress=False, precision=_P('fp32'))
    assert out.shape == (0, *tiny.sites.shape)


# ---------------------------------------------------------------- ActivationSet files


def _small_set(n=6, shape=(2, 3, 4)) -> ActivationSet:
    g = torch.Generator().manual_seed(0)
    examples = [{"qid": f"q{i // 2}", "text": f"t{i}", "label": i % 2, "split": "train" if i < 4 else "val"}
                for i in range(n)]
    return ActivationSet(torch.randn(n, *shape, generator=g), examples, {"model": "m"})


def test_activation_set_roundtrip(tmp_path):
    acts = _small_set()
    acts.save(tmp_path / "a")
    for name in (ACTIVATIONS_FILE, EXAMPLES_FILE, META_FILE):
        assert (tmp_path / "a" / name).exists()
    back = ActivationSet.load(tmp_path / "a")
    assert torch.equal(back.heads, acts.heads)
    assert back.examples == acts.examples
    assert back.meta["shape"] == [6, 2, 3, 4] and back.meta["dtype"] == "float32" and back.meta["model"] == "m"
    assert back.labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert back.indices("val").tolist() == [4, 5]
    back.save(tmp_path / "b")  # re-saving a loaded (memory-mapped) set elsewhere copies it
    assert torch.equal(ActivationSet.load(tmp_path / "b").heads, acts.heads)


def test_activation_set_errors(tmp_path):
    acts = _small_set()
    with pytest.raises(DataError, match="5 examples but 6"):
        ActivationSet(acts.heads, acts.examples[:5])
    with pytest.raises(DataError, match=r"\[N, L, H, D\]"):
        ActivationSet(acts.heads[:, 0], acts.examples)
    d = tmp_path / "a"
    acts.save(d)
    (d / EXAMPLES_FILE).unlink()
    with pytest.raises(DataError, match="missing examples.jsonl"):
        ActivationSet.load(d)
    acts.save(d)
    (d / EXAMPLES_FILE).write_text('{"qid": "q0", "label": 1, "split": "train"}\n{"qid": "q0", "label": 3, "split": "train"}\n')
    with pytest.raises(DataError, match=r"examples.jsonl:2: field 'label' = 3"):
        ActivationSet.load(d)
    (d / EXAMPLES_FILE).write_text('{"qid": "q0", "label": 1}\n')
    with pytest.raises(DataError, match=r"examples.jsonl:1: missing field 'split'"):
        ActivationSet.load(d)
    acts.save(d)
    (d / EXAMPLES_FILE).write_text("".join(json.dumps(e) + "\n" for e in acts.examples[:4]))
    with pytest.raises(DataError, match="4 records but activations.safetensors has 6 rows"):
        ActivationSet.load(d)
    with pytest.raises(DataError, match="does not exist"):
        ActivationSet.load(tmp_path / "nowhere")
    acts.save(d)
    with open(d / ACTIVATIONS_FILE, "r+b") as f:
        f.truncate(200)
    with pytest.raises(DataError, match="truncated or corrupt"):
        ActivationSet.load(d)


# ---------------------------------------------------------------- probe activations of a behaviour, cached


def _behaviour(n_questions=6, tag=""):
    from locaudit.data.behaviour import BehaviourData
    from locaudit.data.pairs import preference_pairs
    from locaudit.data.types import Question

    qs = [Question(qid=f"q{i}", question=f"Question {i}{tag}?", best_answer=f"yes {i}",
                   correct=(f"yes {i}", f"sure {i}"), incorrect=(f"no {i}",)) for i in range(n_questions)]
    split_of = {q.qid: ("train" if i < 4 else "val") for i, q in enumerate(qs)}
    return BehaviourData(name="toy", split_of=split_of, all_questions=tuple(qs),
                         all_pairs=tuple(preference_pairs(qs)))


def test_probe_activations_cached(tmp_path, monkeypatch):
    import locaudit.localize.activations as A
    from locaudit.data.probing import probe_text
    from locaudit.models.tiny import tiny_model

    monkeypatch.setenv("LOCAUDIT_CACHE", str(tmp_path / "cache"))
    lm = tiny_model("llama")
    data = _behaviour()
    acts = collect_probe_activations(lm, data, "plain", out_dir=tmp_path / "out", progress=False, precision=_P('fp32'))
    exs = data.probe_examples()
    assert len(acts) == len(exs) == 18
    assert [e["qid"] for e in acts.examples] == [e.qid for e in exs]
    assert [e["label"] for e in acts.examples] == [e.label for e in exs]
    assert {e["split"] for e in acts.examples} == {"train", "val"}
    assert acts.examples[0]["text"] == probe_text(exs[0], "plain", lm.tokenizer)
    direct = collect_activations(lm, [e["text"] for e in acts.examples], progress=False, precision=_P('fp32'))
    assert (acts.heads - direct).abs().max() < 1e-5
    assert (tmp_path / "out" / ACTIVATIONS_FILE).exists()
    assert acts.meta["model_fingerprint"] == lm.fingerprint and acts.meta["data_fingerprint"] == data.fingerprint

    def boom(*a, **k):
        raise AssertionError("cache miss: collection ran again")

    monkeypatch.setattr(A, "collect_activations", boom)
    again = collect_probe_activations(lm, data, "plain", progress=False, precision=_P('fp32'))
    assert torch.equal(again.heads, acts.heads)
    # a different model, data or format gives another key (so a collection would run)
    plain = PromptFormat("plain")
    key = A.activation_key(lm, data.fingerprint, plain, precision=_P('fp32'))
    assert key == acts.meta["key"]
    assert A.activation_key(tiny_model("llama", seed=1), data.fingerprint, plain, precision=_P('fp32')) != key
    assert A.activation_key(lm, _behaviour(tag="!").fingerprint, plain, precision=_P('fp32')) != key
    assert A.activation_key(lm, data.fingerprint, PromptFormat("chat"), precision=_P('fp32')) != key
    with pytest.raises(AssertionError, match="cache miss"):
        collect_probe_activations(lm, _behaviour(tag="!"), "plain", progress=False, precision=_P('fp32'))


def test_probe_activations_without_cache_needs_out_dir(tmp_path):
    from locaudit.models.tiny import tiny_model

    with pytest.raises(DataError, match="needs an out_dir"):
        collect_probe_activations(tiny_model("gpt2"), _behaviour(), "plain", cache=False, precision=_P('fp32'))
    acts = collect_probe_activations(tiny_model("gpt2"), _behaviour(), "chat", out_dir=tmp_path / "o", cache=False,
                                     progress=False, precision=_P('fp32'))
    assert ActivationSet.load(tmp_path / "o").meta["format"] == "chat" and len(acts) == 18
