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


# ------------------------------------------------------------------------------------------ every kind, every family
from locaudit.edit.base import NoEdit  # noqa: E402
from locaudit.edit.iti import ITIEdit  # noqa: E402
from locaudit.models.tiny import FAMILIES  # noqa: E402


def _iti(lm, spec="L0H1,L2H0,L2H3", alpha=3.0, seed=0):
    L, H, D = lm.sites.shape
    heads = HeadSet.parse(spec)
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(L, H * D, generator=g) * heads.dim_mask(L, H, D).float()
    return ITIEdit(theta, alpha=alpha, heads=heads, model={"name": lm.name, "fingerprint": lm.fingerprint}, n_heads=H)


def _ids(seed=1):
    return torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(seed))


def _reload_logits(folder, ids):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager")
    with torch.no_grad():
        return m(input_ids=ids).logits


def _max_diff(a, b):
    return float((a - b).abs().max())


NO_BIAS_OPTION = ("mixtral", "phi3", "gptj")  # no config declares an o_proj bias: merged ITI is refused, PEFT works


@pytest.mark.parametrize("family", FAMILIES)
def test_iti_merged_export_reloads_edited_every_family(tmp_path, family):
    """The merged ITI folder reloads with plain transformers and reproduces the edited logits (<= 1e-4)."""
    lm = tiny_model(family)
    edit = _iti(lm)
    ids = _ids()
    live = _live(lm, edit, ids)
    if family in NO_BIAS_OPTION:
        with pytest.raises(ConfigError, match="PEFT adapter"):
            export_merged(edit, lm, tmp_path / "m")
        assert not (tmp_path / "m").exists()
        return
    out = export_merged(edit, lm, tmp_path / "m")
    got = _reload_logits(out, ids)
    assert _max_diff(got, live) <= 1e-4
    with torch.no_grad():
        base = lm.model(input_ids=ids).logits
    assert _max_diff(got, base) > 1e-3  # really edited, not silently the base model


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_merged_export_every_family(tmp_path, family):
    lm = tiny_model(family)
    edit = _edit(lm, "L0H1,L2H0", 2, True)
    ids = _ids(3)
    live = _live(lm, edit, ids)
    out = export_merged(edit, lm, tmp_path / "m")
    assert _max_diff(_reload_logits(out, ids), live) <= 1e-4


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2", "gemma3_text", "gpt_neox", "opt", *NO_BIAS_OPTION])
def test_iti_peft_export_matches_live_edit(tmp_path, family):
    from peft import PeftModel

    lm = tiny_model(family)
    edit = _iti(lm, "L1H2,L2H0", alpha=-2.0)
    ids = _ids(4)
    live = _live(lm, edit, ids)
    out = export_peft(edit, lm, tmp_path / "adapter")
    pm = PeftModel.from_pretrained(copy.deepcopy(lm.model), str(out))
    with torch.no_grad():
        got = pm(input_ids=ids).logits
    assert _max_diff(got, live) <= 1e-4
    cfg = pm.peft_config["default"]
    assert cfg.lora_bias and cfg.r == 1 and len(cfg.target_modules) == 2


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt_neox"])
def test_baked_iti_saved_inside_block_reloads_edited(tmp_path, family):
    """Regression (issue 14): save_pretrained inside ITIEdit.baked wrote an undeclared o_proj.bias, so the
    reloaded model was silently unedited. Now the config declares it; the model is restored on exit."""
    lm = tiny_model(family)
    edit = _iti(lm)
    ids = _ids(5)
    live = _live(lm, edit, ids)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    bias_flag = getattr(lm.model.config, "attention_bias", None)
    with edit.baked(lm):
        with torch.no_grad():
            inside = lm.model(input_ids=ids).logits
        lm.model.save_pretrained(str(tmp_path / "b"))
    assert _max_diff(inside, live) <= 1e-4
    assert _max_diff(_reload_logits(tmp_path / "b", ids), live) <= 1e-4
    after = lm.model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert getattr(lm.model.config, "attention_bias", None) == bias_flag


def test_baked_refuses_save_where_config_cannot_declare_bias(tmp_path):
    lm = tiny_model("mistral")
    edit = _iti(lm)
    with edit.baked(lm):
        with pytest.raises(ConfigError, match="export_merged"):
            lm.model.save_pretrained(str(tmp_path / "b"))
    lm.model.save_pretrained(str(tmp_path / "ok"))  # outside the block: the ordinary method again
    assert (tmp_path / "ok" / "config.json").exists()


def test_merged_export_of_biased_model_keeps_its_bias(tmp_path):
    """A model whose o_proj already has a bias (here added to a llama) keeps it, declared, in the export."""
    lm = tiny_model("llama", with_bias=True)
    edit = _edit(lm, "L1H1", 1, True)
    ids = _ids(6)
    live = _live(lm, edit, ids)
    out = export_merged(edit, lm, tmp_path / "m")
    assert _max_diff(_reload_logits(out, ids), live) <= 1e-4


def test_none_edit_exports_the_model_and_refuses_an_adapter(tmp_path):
    lm = tiny_model("llama")
    ids = _ids(7)
    with torch.no_grad():
        base = lm.model(input_ids=ids).logits
    out = export_merged(NoEdit(), lm, tmp_path / "m")
    assert _max_diff(_reload_logits(out, ids), base) <= 1e-5
    with pytest.raises(ConfigError, match="no adapter"):
        export_peft(NoEdit(), lm, tmp_path / "p")


def test_export_checks_the_model_fingerprint(tmp_path, caplog):
    lm = tiny_model("llama")
    other = tiny_model("llama", seed=5)
    edit = _iti(other)  # recorded with the other model's fingerprint
    with pytest.raises(ConfigError, match="fingerprint"):
        export_merged(edit, lm, tmp_path / "m")
    with pytest.raises(ConfigError, match="fingerprint"):
        export_peft(edit, lm, tmp_path / "p")
    assert not (tmp_path / "m").exists()
    export_merged(edit, lm, tmp_path / "m", check="warn")
    assert "fingerprint" in caplog.text


def test_export_refuses_unknown_edit_kinds(tmp_path):
    class Other:
        kind = "mystery"

    with pytest.raises(ConfigError, match="mystery"):
        export_merged(Other(), tiny_model("llama"), tmp_path / "m")
