"""Export round-trips on the real SmolLM2: ITI and LoRA edits, merged HF folder and PEFT adapter, reloaded
with plain transformers / peft, reproduce the edited logits (max abs diff <= 1e-4, fp32)."""

from __future__ import annotations

import pytest
import torch

from locaudit.edit.export import export_merged, export_peft
from locaudit.edit.iti import ITIEdit
from locaudit.edit.lora import LoRAEdit, edit_masks
from locaudit.heads import HeadSet

pytestmark = pytest.mark.slow

TEXTS = ["Q: What happens if you crack your knuckles a lot?\nA: Nothing in particular happens.",
         "Q: Which is the capital of France?\nA: Paris"]


def _head_sigma(lm, u):
    """ITI's sigma per edited head: the std of the heads' outputs (o_proj inputs) along u, on TEXTS."""
    from locaudit.models.hooks import o_proj_hooks

    seen = {}
    enc = lm.tokenizer(TEXTS, return_tensors="pt", padding=True)
    mask = enc["attention_mask"].bool()

    def grab(l):
        def fn(o):
            seen[l] = o.detach()[mask]  # [tokens, H*D]
            return o
        return fn

    with torch.no_grad(), o_proj_hooks(lm.sites, pre={l: grab(l) for l in range(lm.sites.n_layers)}):
        lm.model(**enc)
    L, H, D = lm.sites.shape
    sigma = torch.zeros(L, H)
    for l in range(L):
        o = seen[l].reshape(-1, H, D)
        sigma[l] = torch.einsum("thd,hd->th", o, u[l]).std(0)
    return sigma


def _edits(lm):
    """An ITI edit shaped as fit_iti makes them (theta_h = sigma_h * u_h, alpha 15 as in the quickstart) and
    a rank-2 optimal edit, at the same three heads."""
    L, H, D = lm.sites.shape
    heads = HeadSet.parse("L3H1,L14H5,L27H0")
    g = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(L, H, D, generator=g), dim=-1)
    theta = (_head_sigma(lm, u)[..., None] * u).reshape(L, H * D) * heads.dim_mask(L, H, D).float()
    iti = ITIEdit(theta, alpha=15.0, heads=heads, model={"name": lm.name, "fingerprint": lm.fingerprint}, n_heads=H)
    a_mask, b_mask = edit_masks(lm.sites, heads, True)
    a = torch.randn(L, 2, a_mask.shape[-1], generator=g) * 0.2 * a_mask
    b = torch.randn(L, 2, b_mask.shape[-1], generator=g) * 0.2 * b_mask
    lora = LoRAEdit(a, b, heads, True, {"model": {"name": lm.name, "fingerprint": lm.fingerprint}})
    return {"iti": iti, "lora": lora}


@pytest.mark.parametrize("kind", ["iti", "lora"])
def test_smollm2_export_round_trip(tmp_path, smollm2, kind):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lm = smollm2
    edit = _edits(lm)[kind]
    enc = lm.tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        base = lm.model(**enc).logits
        with edit.applied(lm):
            live = lm.model(**enc).logits
    mask = enc["attention_mask"].bool()
    assert (live - base)[mask].abs().max() > 1e-2  # a real edit
    merged_dir = export_merged(edit, lm, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32)
    with torch.no_grad():
        got = merged(**enc).logits
    del merged
    diff = float((got - live)[mask].abs().max())
    print(f"smollm2 {kind}: edit moves logits by {float((live - base)[mask].abs().max()):.3f}; merged diff {diff:.2e}")
    assert diff <= 1e-4, f"merged {kind}: max abs logit diff {diff}"
    adapter = export_peft(edit, lm, tmp_path / "peft")
    base_model = AutoModelForCausalLM.from_pretrained(lm.info["path"], dtype=torch.float32)
    pm = PeftModel.from_pretrained(base_model, str(adapter))
    with torch.no_grad():
        got = pm(**enc).logits
    diff = float((got - live)[mask].abs().max())
    print(f"smollm2 {kind}: peft diff {diff:.2e}")
    assert diff <= 1e-4, f"peft {kind}: max abs logit diff {diff}"
