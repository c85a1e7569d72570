"""The model fingerprint depends on the weights' content only: stable across save/reload and wrappers."""

from __future__ import annotations

import copy

import pytest
import torch

from locaudit.models.loading import load_model, model_fingerprint
from locaudit.models.tiny import tiny_model


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text"])
def test_same_weights_saved_and_reloaded_same_fingerprint(tmp_path, family):
    lm = tiny_model(family)
    lm.model.save_pretrained(str(tmp_path / "m"))
    lm.tokenizer.save_pretrained(str(tmp_path / "m"))
    again = load_model(str(tmp_path / "m"))
    assert again.fingerprint == lm.fingerprint
    # another folder name, another model name: still the same model
    lm.model.save_pretrained(str(tmp_path / "copy"))
    lm.tokenizer.save_pretrained(str(tmp_path / "copy"))
    assert load_model(str(tmp_path / "copy")).fingerprint == lm.fingerprint


def test_one_changed_weight_changes_the_fingerprint():
    lm = tiny_model("llama")
    fp = lm.fingerprint
    m = copy.deepcopy(lm.model)
    w = m.model.layers[1].mlp.up_proj.weight
    with torch.no_grad():
        w[3, 5] += 1e-3  # one value, not one of the sampled ones in general
    assert model_fingerprint(m) != fp
    with torch.no_grad():
        w[3, 5] -= 1e-3
    assert model_fingerprint(m) == model_fingerprint(lm.model)


def test_other_seed_dtype_or_shape_changes_the_fingerprint():
    a = tiny_model("llama")
    assert tiny_model("llama", seed=1).fingerprint != a.fingerprint
    assert model_fingerprint(copy.deepcopy(a.model).to(torch.float64)) != a.fingerprint
    assert tiny_model("llama", n_layers=4).fingerprint != a.fingerprint


def test_wrappers_keep_the_fingerprint():
    from peft import LoraConfig, get_peft_model

    lm = tiny_model("llama")
    fp = model_fingerprint(lm.model)

    class Wrapper(torch.nn.Module):  # DataParallel / DDP style: the model under .module
        def __init__(self, m):
            super().__init__()
            self.module = m

    assert model_fingerprint(Wrapper(copy.deepcopy(lm.model))) == fp
    peft_model = get_peft_model(copy.deepcopy(lm.model), LoraConfig(r=2, target_modules=["o_proj"]))
    assert model_fingerprint(peft_model) == fp
    assert model_fingerprint(lm.model, name="another name") == fp


def test_fingerprint_ignores_config_bookkeeping():
    lm = tiny_model("llama")
    fp = model_fingerprint(lm.model)
    lm.model.config._name_or_path = "/somewhere/else"
    lm.model.config.use_cache = not lm.model.config.use_cache
    assert model_fingerprint(lm.model) == fp
