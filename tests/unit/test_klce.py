"""KL/CE: zero for the unedited model, grows with alpha, equals a direct computation, cached once."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from locaudit.data.prompts import PromptFormat
from locaudit.data.types import Question
from locaudit.edit.iti import ITIEdit
from locaudit.errors import DataError
from locaudit.evaluate import klce
from locaudit.evaluate.klce import clear_memory_cache, heldout_texts, kl_ce, text_file_chunks, tokenize
from locaudit.heads import HeadSet
from locaudit.models.tiny import tiny_model
from locaudit.models.precision import resolve_precision as _P  # resolved once, as entry points do

TEXTS = ["Q: Where is Paris?\nA: In France.", "Q: Why is the sky blue?\nA: Rayleigh scattering of light.",
         "Q: Hi?\nA: Hello."]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAUDIT_CACHE", str(tmp_path / "cache"))
    clear_memory_cache()
    yield
    clear_memory_cache()


def iti(lm, alpha):
    L, H, D = lm.sites.shape
    heads = HeadSet.from_heads([(0, 1), (1, 3), (2, 2)])
    theta = torch.randn(L, H * D, generator=torch.Generator().manual_seed(0)) * heads.dim_mask(L, H, D)
    return ITIEdit(theta, alpha=alpha, heads=heads)


def direct(lm, edit, texts):
    """Independent reference: model logits per text, KL and CE pooled over positions."""
    kls, ces = [], []
    for t in texts:
        ids = torch.tensor([lm.tokenizer(t)["input_ids"]])
        with torch.no_grad():
            p = F.log_softmax(lm.model(input_ids=ids).logits[0, :-1].double(), -1)
            with edit.applied(lm):
                q = F.log_softmax(lm.model(input_ids=ids).logits[0, :-1].double(), -1)
        kls.append((p.exp() * (p - q)).sum(-1))
        ces.append(-q.gather(1, ids[0, 1:, None]).squeeze(1))
    return float(torch.cat(kls).mean()), float(torch.cat(ces).mean())


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "gemma2"])
def test_zero_for_unedited_and_equal_to_direct(family):
    lm = tiny_model(family)
    base = kl_ce(lm, None, TEXTS, batch_size=2, precision=_P('fp32'))
    assert base.kl == 0.0
    assert base.n_tokens == sum(len(lm.tokenizer(t)["input_ids"]) - 1 for t in TEXTS) and base.n_texts == 3
    with torch.no_grad():
        ce_ref = []
        for t in TEXTS:
            ids = torch.tensor([lm.tokenizer(t)["input_ids"]])
            lp = F.log_softmax(lm.model(input_ids=ids).logits[0, :-1].double(), -1)
            ce_ref.append(-lp.gather(1, ids[0, 1:, None]).squeeze(1))
    assert base.ce == pytest.approx(float(torch.cat(ce_ref).mean()), abs=1e-4)
    res = kl_ce(lm, iti(lm, 3.0), TEXTS, batch_size=2, precision=_P('fp32'))
    kl_ref, ce_ref2 = direct(lm, iti(lm, 3.0), TEXTS)
    assert res.kl == pytest.approx(kl_ref, rel=1e-3, abs=1e-6)
    assert res.ce == pytest.approx(ce_ref2, rel=1e-4, abs=1e-5)
    assert res.kl > 0


def test_kl_grows_with_alpha_and_model_restored():
    lm = tiny_model("llama")
    kls = [kl_ce(lm, iti(lm, a), TEXTS, precision=_P('fp32')).kl for a in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert kls[0] == 0.0
    assert all(b > a for a, b in zip(kls, kls[1:])), kls
    assert sum(len(m._forward_pre_hooks) for m in lm.model.modules()) == 0
    assert kl_ce(lm, None, TEXTS, precision=_P('fp32')).kl == 0.0


def test_original_computed_once_then_memory_then_disk(monkeypatch):
    lm = tiny_model("llama")
    calls = []
    real = klce.final_hidden

    def counting(lm_, ids, batch_size=16, progress=False, check=False):
        calls.append(check)
        return real(lm_, ids, batch_size, progress, check)

    monkeypatch.setattr(klce, "final_hidden", counting)
    kl_ce(lm, iti(lm, 1.0), TEXTS, precision=_P('fp32'))
    kl_ce(lm, iti(lm, 2.0), TEXTS, precision=_P('fp32'))
    assert calls == [True, False, False]  # the original pass (check=True) ran once
    clear_memory_cache()
    again = kl_ce(lm, iti(lm, 2.0), TEXTS, precision=_P('fp32'))
    assert calls == [True, False, False, False]  # read back from disk
    assert again.kl > 0
    kl_ce(lm, iti(lm, 2.0), TEXTS[:2], precision=_P('fp32'))  # other texts: a new original pass
    assert calls[-2:] == [True, False]


def test_standard_errors_and_bf16():
    lm = tiny_model("llama")
    res = kl_ce(lm, iti(lm, 2.0), TEXTS, precision=_P('fp32'))
    assert res.kl_se is not None and res.kl_se > 0 and res.ce_se > 0
    one = kl_ce(lm, iti(lm, 2.0), TEXTS[:1], precision=_P('fp32'))
    assert one.kl_se is None
    b = kl_ce(lm, iti(lm, 2.0), TEXTS, precision=_P("bf16"))
    assert kl_ce(lm, None, TEXTS, precision=_P("bf16")).kl == 0.0
    assert b.kl == pytest.approx(res.kl, rel=0.2)


def test_text_sources(tmp_path):
    lm = tiny_model("llama")
    qs = [Question("a", "Where is Paris?", "In France", ("In France",), ("In Spain",))]
    assert heldout_texts(qs, PromptFormat("plain"), lm.tokenizer) == ["Q: Where is Paris?\nA: In France"]
    f = tmp_path / "t.txt"
    f.write_text("x" * 50)
    chunks = text_file_chunks(f, lm.tokenizer, max_length=16)
    assert [len(c) for c in chunks] == [16, 16, 16, 2]  # a final 2-token piece predicts one token
    f.write_text("x" * 49)
    assert [len(c) for c in text_file_chunks(f, lm.tokenizer, max_length=16)] == [16, 16, 16]  # 1 token: dropped
    res = kl_ce(lm, iti(lm, 1.0), ids=chunks, precision=_P('fp32'))
    assert res.n_tokens == 46
    with pytest.raises(DataError, match="does not exist"):
        text_file_chunks(tmp_path / "nope.txt", lm.tokenizer)
    (tmp_path / "e.txt").write_text("  ")
    with pytest.raises(DataError, match="empty"):
        text_file_chunks(tmp_path / "e.txt", lm.tokenizer)
    with pytest.raises(DataError, match="fewer than 2"):
        tokenize(lm.tokenizer, ["x", "hello"])


def test_unedited_kl_is_exactly_zero_against_a_cache_from_another_thread_count(monkeypatch):
    """The unedited model is its own reference: KL exactly 0 and CE from the cached states, even when the
    cached states differ from a fresh pass by rounding (written under another thread count or batching)."""
    lm = tiny_model("llama")
    clear_memory_cache()
    ref = kl_ce(lm, None, TEXTS, precision=_P("fp32"))
    key = next(iter(klce._MEMORY))
    klce._MEMORY[key].hidden.add_(1e-5 * torch.randn_like(klce._MEMORY[key].hidden))  # rounding-level drift
    calls = []
    monkeypatch.setattr(klce, "final_hidden", lambda *a, **k: calls.append(1))
    again = kl_ce(lm, None, TEXTS, precision=_P("fp32"))
    assert again.kl == 0.0 and calls == []  # no second pass for the unedited model
    assert again.ce == pytest.approx(ref.ce, abs=1e-3) and again.n_tokens == ref.n_tokens
