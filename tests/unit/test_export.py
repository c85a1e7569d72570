"""Merged-weights and PEFT-adapter exports give the same logits as the live edit."""

from __future__ import annotations

import copy

import pytest
import torch

from locaudit.edit.export import export_merged, export_peft
from locaudit.edit.lora import LoRAEdit, edit_masks
from locaudit.errors import ConfigError
from locaudit.heads import HeadSet
from locaudit.models.tiny import tiny_model


def _edit(lm, spec, rank, reparam, seed=0):
    g = torch.Generator().manual_seed(seed)
    heads = HeadSet.parse(spec)
    a_mask, b_mask = edit_masks(lm.sites, heads, reparam)
    L = lm.sites.n_layers
    a = torch.randn(L, rank, a_mask.shape[-1], generator=g) * 0.5 * a_mask
    b = torch.randn(L, rank, b_mask.shape[-1], generator=g) * 0.5 * b_mask
    return LoRAEdit(a, b, heads, reparam)


CASES = [("llama", 1, True), ("llama", 2, False), ("gpt2", 2, True), ("qwen2", 1, True)]


def _live(lm, edit, ids):
    with torch.no_grad():
        base = lm.model(input_ids=ids).logits
        with edit.applied(lm):
            live = lm.model(input_ids=ids).logits
    assert (live - base).abs().max() > 1e-3
    return live


@pytest.mark.parametrize("family,rank,reparam", CASES)
def test_merged_export_matches_live_edit(tmp_path, family, rank, reparam):
    from transformers import AutoModelForCausalLM

    lm = tiny_model(family, with_bias=family == "gpt2")  # a saved folder only holds biases its config knows
    edit = _edit(lm, "L0H1,L2H0,L2H3", rank, reparam)
    ids = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(1))
    live = _live(lm, edit, ids)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    out = export_merged(edit, lm, tmp_path / "merged")
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())  # lm untouched
    merged = AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager")
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, live, rtol=1e-4, atol=1e-4)
    assert (out / "locaudit_edit.json").exists() and (out / "tokenizer.json").exists()


@pytest.mark.parametrize("family,rank,reparam", CASES)
def test_peft_export_matches_live_edit(tmp_path, family, rank, reparam):
    from peft import PeftModel

    lm = tiny_model(family, with_bias=True)
    edit = _edit(lm, "L1H2,L2H0", rank, reparam)
    ids = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(2))
    live = _live(lm, edit, ids)
    out = export_peft(edit, lm, tmp_path / "adapter")
    pm = PeftModel.from_pretrained(copy.deepcopy(lm.model), str(out))
    with torch.no_grad():
        got = pm(input_ids=ids).logits
    torch.testing.assert_close(got, live, rtol=1e-4, atol=1e-4)
    cfg = pm.peft_config["default"]
    assert cfg.r == rank and cfg.lora_alpha == rank
    assert sorted(cfg.target_modules) == sorted(n for n, _ in pm.base_model.model.named_modules()
                                                if n.endswith(("o_proj", "c_proj")) and (".1." in n or ".2." in n)
                                                and "mlp" not in n)


def test_export_refuses_non_empty_folder(tmp_path):
    lm = tiny_model("llama")
    edit = _edit(lm, "L1H1", 1, True)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("keep")
    with pytest.raises(ConfigError, match="not empty"):
        export_peft(edit, lm, tmp_path / "x")
    export_peft(edit, lm, tmp_path / "x", overwrite=True)
    assert (tmp_path / "x" / "adapter_config.json").exists()
