"""Export a LoRAEdit: a merged HuggingFace model folder, or a standard PEFT LoRA adapter on o_proj.

The edit adds sum_k <a_k, o> W b_k to o_proj's output, i.e. o_proj's weight becomes
W (I + sum_k b_k a_k^T) = W + sum_k (W b_k) a_k^T (reparameterised), or W + sum_k b'_k a_k^T (plain).
As PEFT LoRA on o_proj: lora_A = a (rows a_k) [r, H*D], lora_B = [W b_1 .. W b_r] [d, r] and
lora_alpha = r so that PEFT's scaling alpha / r is 1.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from locaudit.edit.lora import LoRAEdit
from locaudit.errors import ConfigError
from locaudit.io import write_json_atomic
from locaudit.models.loading import LoadedModel


def lora_factors(edit: LoRAEdit, lm: LoadedModel, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A Float[Tensor, "rank head*head_dim"], B Float[Tensor, "d_model rank"]) with delta W = B A at `layer`."""
    return edit.a[layer].clone(), edit.write_vectors(lm.sites, layer).t().contiguous()


def edited_layers(edit: LoRAEdit) -> list[int]:
    """Layers where the edit is non-zero (a stored edit has zero rows elsewhere)."""
    return [l for l in range(edit.n_layers) if edit.b[l].abs().sum() > 0 and edit.a[l].abs().sum() > 0]


def _module_names(lm: LoadedModel) -> dict[int, str]:
    ids = {id(m): name for name, m in lm.model.named_modules()}
    return {l: ids[id(lm.sites.o_proj(l))] for l in range(lm.sites.n_layers)}


def _prepare_dir(out: Path, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"export folder {out} exists and is not empty; pass overwrite=True to replace it")
        shutil.rmtree(out)
    return out


def export_merged(edit: LoRAEdit, lm: LoadedModel, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Save the model with the edit folded into o_proj's weights (save_pretrained, safetensors) and its
    tokenizer into `out`. The loaded model `lm` is not changed."""
    edit.check(lm.sites)
    out = _prepare_dir(Path(out), overwrite)
    names = _module_names(lm)
    sd = dict(lm.model.state_dict())
    for l in edited_layers(edit):
        A, B = lora_factors(edit, lm, l)
        key = f"{names[l]}.weight"
        w = sd[key]
        delta = (B @ A).to(w.device)  # [d, HD]
        if lm.sites.spec.conv1d:  # GPT-2 Conv1D stores [in, out]
            delta = delta.t()
        sd[key] = (w.float() + delta).to(w.dtype)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    lm.model.save_pretrained(str(tmp), state_dict=sd)
    lm.tokenizer.save_pretrained(str(tmp))
    write_json_atomic(tmp / "locaudit_edit.json", {"merged_from": edit.describe(), "base_model": lm.name,
                                                     "base_fingerprint": lm.fingerprint})
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out


def export_peft(edit: LoRAEdit, lm: LoadedModel, out: str | os.PathLike, overwrite: bool = False,
                base_model_name_or_path: str | None = None) -> Path:
    """Save a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) on the edited layers'
    o_proj; `PeftModel.from_pretrained(base_model, out)` reproduces the edit."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    edit.check(lm.sites)
    out = _prepare_dir(Path(out), overwrite)
    layers = edited_layers(edit)
    if not layers:
        raise ConfigError(f"edit {edit.heads.name!r} is zero everywhere: nothing to export as an adapter")
    names = _module_names(lm)
    config = LoraConfig(
        r=edit.rank, lora_alpha=edit.rank, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
        target_modules=[names[l] for l in layers], fan_in_fan_out=bool(lm.sites.spec.conv1d),
        base_model_name_or_path=base_model_name_or_path or str(lm.info.get("path", lm.name)),
    )
    tensors = {}
    for l in layers:
        A, B = lora_factors(edit, lm, l)
        prefix = f"base_model.model.{names[l]}"
        tensors[f"{prefix}.lora_A.weight"] = A.contiguous()
        tensors[f"{prefix}.lora_B.weight"] = B.contiguous()
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    config.save_pretrained(str(tmp))
    save_file(tensors, str(tmp / "adapter_model.safetensors"))
    (tmp / "locaudit_edit.json").write_text(json.dumps({"adapter_of": edit.describe()}, indent=2, default=str))
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out
