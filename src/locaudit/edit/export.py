"""Export any edit: a merged HuggingFace model folder, or a standard PEFT adapter on o_proj.

Each edit kind owns its export, as PEFT's tuners do: `edit.merged_state(lm)` (the model's state dict with the
edit folded in), `edit.peft_config(lm)` (a `PeftAdapter`: target layers, rank, lora_bias and tensors; None: the
kind has no adapter form) and `edit.adds_o_bias()` (whether the merged model needs an o_proj bias). This module
does the rest for every kind: the fingerprint check, a config that declares what the state holds, the rebuilt
model, the atomic folder and `locaudit_edit.json`. The built-in kinds:
- ``lora`` (the optimal edit, edit/lora.py) adds sum_k <a_k, o> W b_k to o_proj's output: o_proj's weight becomes
  W + sum_k (W b_k) a_k^T (reparameterised) or W + sum_k b'_k a_k^T (plain). As PEFT LoRA on o_proj:
  lora_A = a [r, H*D], lora_B = [W b_1 .. W b_r] [d, r], lora_alpha = r (PEFT's scaling alpha / r = 1).
- ``iti`` (edit/iti.py) adds alpha * theta^l to o_proj's input, i.e. the constant alpha * W^l theta^l to its output: an
  o_proj bias. Merged, the bias must be DECLARED by the saved config, or transformers drops it on reload
  (the edit would be silently lost). `bias_config` finds the config that declares it: the family's own
  (gpt2, gpt_neox, opt have o_proj biases), its `attention_bias` option (llama, qwen3, gemma 1-3, ...:
  q/k/v get zero biases), or, for mistral and qwen2 which have no such option, the same network as a
  llama config with `attention_bias` (qwen2's q/k/v biases carry over). Families with none of these
  (mixtral, phi3, gptj: GPT-J's out_proj has no bias and GPTJConfig no switch for one) are refused with a
  pointer to the PEFT export. As PEFT: a rank-1 LoRA with zero A and B and B's bias =
  alpha W theta (`lora_bias=True`), which PEFT adds to o_proj's output.
- ``none`` (edit/base.py): merged = a copy of the model; no adapter.

Both exports check the model fingerprint recorded in the edit against `lm` (`check="error"|"warn"|"off"`)
and write `locaudit_edit.json` (what was exported, from which model).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from locaudit.errors import ConfigError
from locaudit.io import TEMP_RE, atomic_dir, clean_stale_temps, replace_path, temp_sibling, write_json_atomic
from locaudit.models.loading import LoadedModel, model_fingerprint

log = logging.getLogger(__name__)

CHECKS = ("error", "warn", "off")
EXPORT_META = "locaudit_edit.json"
# families with no attention-bias option whose network is llama's (same module names) plus biases
_AS_LLAMA = ("mistral", "qwen2")


# ---------------------------------------------------------------------------------------------- helpers
@dataclass(frozen=True)
class PeftAdapter:
    """An edit as a PEFT LoRA adapter on o_proj (what `edit.peft_config(lm)` returns): the layers it targets, its
    rank, whether lora_B carries a bias (PEFT's `lora_bias`), and {layer: {"lora_A.weight": A [rank, H*D],
    "lora_B.weight": B [d, rank], "lora_B.bias": [d] (with lora_bias)}}; lora_alpha = rank (scaling 1)."""

    layers: list[int]
    rank: int
    lora_bias: bool
    tensors: dict[int, dict[str, torch.Tensor]]


def o_proj_names(lm: LoadedModel) -> dict[int, str]:
    """{layer: the module name of its o_proj} (the state-dict prefix an edit's merged weights go under)."""
    ids = {id(m): name for name, m in lm.model.named_modules()}
    return {l: ids[id(lm.sites.o_proj(l))] for l in range(lm.sites.n_layers)}



def verify_edit(edit, lm: LoadedModel) -> None:
    """The registry's check (edit/base.py `verify`): an edit exports only if it is what it declares."""
    from locaudit.edit.base import verify_edit as _verify

    _verify(edit, lm)


def _kind(edit) -> str:
    """The edit's kind, once it is known to own its export (merged_state, peft_config, adds_o_bias)."""
    kind = getattr(edit, "kind", None)
    missing = [m for m in ("merged_state", "peft_config", "adds_o_bias") if not callable(getattr(edit, m, None))]
    if missing:
        raise ConfigError(f"edit kind {kind!r} ({type(edit).__name__}) has no export: it lacks {missing} "
                          "(edit/base.ExportMixin gives the unedited model's; CONTRIBUTING.md, 'Add an edit kind')")
    return str(kind)


def edit_fingerprint(edit) -> str | None:
    """The model fingerprint an edit records (ITI: edit.model; LoRA: edit.meta['model']), or None."""
    model = getattr(edit, "model", None)
    if not isinstance(model, dict):
        model = (getattr(edit, "meta", None) or {}).get("model")
    fp = model.get("fingerprint") if isinstance(model, dict) else None
    return str(fp) if fp else None


def check_fingerprint(edit, lm: LoadedModel, check: str = "error") -> str | None:
    """Compare the edit's recorded model fingerprint with `lm`'s: raise (error), log (warn) or skip (off).
    Returns the mismatch message, or None when they match or the edit records none."""
    if check not in CHECKS:
        raise ConfigError(f"check={check!r} is not one of {CHECKS}")
    fp = edit_fingerprint(edit)
    if check == "off" or fp is None or fp == lm.fingerprint:
        return None
    msg = (f"the edit was made on a model with fingerprint {fp}, but {lm.name!r} has fingerprint {lm.fingerprint}: "
           "a different model (or weights), or an edit saved before locaudit's content fingerprint (v2). "
           "Export with the edit's own model, or force it (--allow-model-mismatch / check='warn').")
    if check == "error":
        raise ConfigError(msg)
    log.warning(msg)
    return msg


def check_target(out: Path, overwrite: bool) -> Path:
    """Refuse a non-empty `out` unless `overwrite`, before any work; nothing is deleted here: the new export
    is written beside `out` and swapped in only once complete (`io.atomic_dir`). Leftovers of a killed
    export beside `out` are cleaned first, so they never block a rerun."""
    out = Path(out)
    clean_stale_temps(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise ConfigError(f"export folder {out} exists and is not empty; pass overwrite=True (--overwrite) to "
                              "replace it (it is replaced only once the new export is complete)")
    return out


def _verify_export(files: tuple[str, ...]):
    """A check of a finished export folder before it is swapped in: every file in `files` is there, JSON files
    parse and safetensors files open with their tensors listed."""
    def check(folder: Path) -> None:
        from safetensors import safe_open

        for name in files:
            f = folder / name
            if not f.is_file():
                raise ConfigError(f"export: {name} was not written; the previous output (if any) is kept")
        for f in folder.iterdir():
            try:
                if f.suffix == ".json":
                    json.loads(f.read_text(encoding="utf-8"))
                elif f.suffix == ".safetensors":
                    with safe_open(str(f), "pt") as st:
                        list(st.keys())
            except Exception as e:  # noqa: BLE001 - any unreadable file means an incomplete export
                raise ConfigError(f"export: {f.name} is unreadable after writing ({type(e).__name__}: {e}); "
                                  "the previous output (if any) is kept") from None
    return check


# ---------------------------------------------------------------------------------------------- bias configs
def _fresh_keys(config) -> dict[str, tuple]:
    """State-dict keys -> shapes of a model built from `config`, on the meta device (no memory, no init)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(config)
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def bias_config(lm: LoadedModel, need_o_bias: bool) -> tuple[Any, dict[str, tuple], str]:
    """(config, state-dict keys -> shapes, how) of a config that rebuilds `lm`'s network with every parameter
    it has (an o_proj bias included where `need_o_bias`): the model's own config, its `attention_bias`
    option, or (mistral, qwen2) llama with `attention_bias`. Extra keys of the new config are zero biases.
    Raises ConfigError when no such config exists."""
    live = {k: tuple(v.shape) for k, v in lm.model.state_dict().items()}
    base = lm.model.config
    names = o_proj_names(lm)
    o_keys = {f"{names[l]}.bias" for l in range(lm.sites.n_layers)}
    candidates: list[tuple[Any, str]] = [(copy.deepcopy(base), "config")]
    if hasattr(base, "attention_bias"):
        c = copy.deepcopy(base)
        c.attention_bias = True
        candidates.append((c, "attention_bias"))
    if base.model_type in _AS_LLAMA:
        from transformers import LlamaConfig

        d = base.to_dict()
        for k in ("model_type", "architectures", "transformers_version", "auto_map"):
            d.pop(k, None)
        d["attention_bias"] = True
        d["architectures"] = ["LlamaForCausalLM"]
        d.setdefault("head_dim", getattr(base, "head_dim", None) or base.hidden_size // base.num_attention_heads)
        candidates.append((LlamaConfig(**d), f"llama (from {base.model_type}) with attention_bias"))
    tried = []
    for cfg, how in candidates:
        try:
            fresh = _fresh_keys(cfg)
        except Exception as e:  # a config the family cannot build
            tried.append(f"{how}: {type(e).__name__}")
            continue
        missing = [k for k in live if k not in fresh or fresh[k] != live[k]]
        extra = [k for k in fresh if k not in live]
        ok = (not missing and all(k.endswith(".bias") for k in extra)
              and (not need_o_bias or o_keys <= set(fresh)))
        if ok:
            if how.startswith("llama"):
                sw = getattr(base, "sliding_window", None)
                if sw and (base.model_type == "mistral" or getattr(base, "use_sliding_window", False)):
                    log.warning("%s has a sliding window of %d tokens; its llama form attends to every token, so the "
                                "export equals the edited model on sequences up to %d tokens", base.model_type, sw, sw)
            return cfg, fresh, how
        tried.append(f"{how}: " + (f"lacks {missing[:2]}" if missing else "no o_proj bias" if need_o_bias
                                   else f"adds non-bias {[k for k in extra if not k.endswith('.bias')][:2]}"))
    raise ConfigError(f"model family {base.model_type!r}: no HF config declares an o_proj bias ({'; '.join(tried)}), "
                      "so a merged ITI edit would reload unedited; export a PEFT adapter instead (locaudit export "
                      "--format peft), which adds the bias as lora_bias")


def merged_state(edit, lm: LoadedModel) -> dict[str, torch.Tensor]:
    """The model's state dict (CPU copies where changed) with the edit folded in, as its kind says
    (`edit.merged_state(lm)`: LoRA into o_proj's weight, ITI into o_proj's bias)."""
    _kind(edit)
    return edit.merged_state(lm)


def _rebuild(cfg, sd: dict[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
    """The model of `cfg` holding `sd`'s tensors: built on the meta device and given the tensors (no random
    init, no second copy of the weights), else, if anything is left unset, built and loaded normally."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.load_state_dict(sd, strict=False, assign=True)
    model.tie_weights()
    if any(p.is_meta for p in model.parameters()) or any(b.is_meta for _, b in model.named_buffers()
                                                         if _ in dict(model.state_dict())):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        result = model.load_state_dict(sd, strict=False)
        tied = getattr(cfg, "tie_word_embeddings", False)
        if result.missing_keys and not tied:
            raise ConfigError(f"export: the rebuilt model lacks values for {result.missing_keys[:3]}")
    return model.eval()


def _needs_o_bias(edit, lm: LoadedModel) -> bool:
    has = any(lm.sites.bias(l) is not None for l in range(lm.sites.n_layers))
    return has or bool(edit.adds_o_bias())


# ---------------------------------------------------------------------------------------------- exports
def export_merged(edit, lm: LoadedModel, out: str | os.PathLike, overwrite: bool = False, *,
                  check: str = "error") -> Path:
    """Save the model with the edit folded in (safetensors, config, tokenizer) into `out`: it reloads
    edited with plain `AutoModelForCausalLM.from_pretrained(out)`. `lm` is not changed.

    LoRA edits change o_proj's weights; ITI edits become an o_proj bias declared by the saved config
    (see the module docstring); `none` saves the model as it is.
    """
    _kind(edit)  # refuses an unknown edit kind, naming it
    verify_edit(edit, lm)  # acts only where it declares, finite and bounded, of the model's shapes
    check_fingerprint(edit, lm, check)
    out = check_target(Path(out), overwrite)
    cfg, fresh, how = bias_config(lm, _needs_o_bias(edit, lm))
    sd = merged_state(edit, lm)
    for k, shape in fresh.items():  # zero biases the new config declares (q/k/v, unedited layers' o_proj)
        if k not in sd:
            sd[k] = torch.zeros(shape, dtype=lm.dtype)
    sd = {k: v.detach().cpu() for k, v in sd.items() if k in fresh}
    model = _rebuild(cfg, sd, lm.dtype)
    with atomic_dir(out, verify=_verify_export(("config.json", EXPORT_META))) as tmp:
        model.save_pretrained(str(tmp))
        lm.tokenizer.save_pretrained(str(tmp))
        write_json_atomic(tmp / EXPORT_META, {
            "format": "merged", "edit": edit.describe(), "base_model": lm.name, "base_fingerprint": lm.fingerprint,
            "edit_fingerprint": edit_fingerprint(edit), "exported_fingerprint": model_fingerprint(model),
            "config": how})
    return out


def export_peft(edit, lm: LoadedModel, out: str | os.PathLike, overwrite: bool = False,
                base_model_name_or_path: str | None = None, *, check: str = "error") -> Path:
    """Save a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) on the edited layers'
    o_proj; `PeftModel.from_pretrained(base_model, out)` reproduces the edit. ITI edits become rank-1
    adapters whose only non-zero part is lora_B's bias (alpha W theta)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    kind = _kind(edit)
    verify_edit(edit, lm)
    check_fingerprint(edit, lm, check)
    adapter = edit.peft_config(lm)
    if adapter is None:
        raise ConfigError(f"a {kind!r} edit has no adapter form to export; use the merged format")
    names = o_proj_names(lm)
    layers, rank, lora_bias = adapter.layers, adapter.rank, adapter.lora_bias
    tensors = {f"base_model.model.{names[l]}.{name}": t for l in layers for name, t in adapter.tensors[l].items()}
    if not layers:
        raise ConfigError(f"edit {describe_short(edit)} is zero everywhere: nothing to export as an adapter")
    out = check_target(Path(out), overwrite)
    config = LoraConfig(
        r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", lora_bias=lora_bias,
        target_modules=[names[l] for l in layers], fan_in_fan_out=bool(lm.sites.spec.conv1d),
        base_model_name_or_path=base_model_name_or_path or base_model_source(lm),
    )
    files = ("adapter_config.json", "adapter_model.safetensors", EXPORT_META)
    with atomic_dir(out, verify=_verify_export(files)) as tmp:
        config.save_pretrained(str(tmp))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "adapter_model.safetensors"))
        write_json_atomic(tmp / EXPORT_META, {"format": "peft", "adapter_of": edit.describe(), "base_model": lm.name,
                                              "base_fingerprint": lm.fingerprint,
                                              "edit_fingerprint": edit_fingerprint(edit),
                                              "merge": peft_merge_route(_route_kind(adapter, kind), lm)})
    if lora_bias and not _has_o_bias(lm):
        log.warning("%s adapter (a lora_B bias) for %s: %s", kind, lm.name, peft_merge_route("iti", lm))
    return out


def _route_kind(adapter: PeftAdapter, kind: str) -> str:
    """peft_merge_route's question: an adapter whose lora_B carries a bias merges as ITI's does."""
    return "iti" if adapter.lora_bias else kind


BOTH = ("merged", "peft")


def export_both(edit, lm: LoadedModel, out: str | os.PathLike, overwrite: bool = False,
                base_model_name_or_path: str | None = None, *, check: str = "error") -> dict[str, Path]:
    """`export_merged` into OUT/merged and `export_peft` into OUT/peft as one unit: both are written into a
    temporary sibling of OUT, each checked, and that folder is swapped in place of OUT at once (`io.replace_path`),
    so OUT holds both new exports or, after any failure or kill, exactly what it held before. Other entries of
    OUT are carried over into the new folder (hard links, else copies) before the swap. Returns {format: folder}."""
    out = Path(out)
    kind = _kind(edit)
    verify_edit(edit, lm)
    if edit.peft_config(lm) is None:  # refused before any work, as export_peft would refuse it
        raise ConfigError(f"a {kind!r} edit has no adapter form to export; use the merged format")
    clean_stale_temps(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"export folder {out} is a file; give a folder (OUT/merged and OUT/peft go in it)")
    for f in BOTH:  # refuse before any work, as a single-format export does
        check_target(out / f, overwrite)
    tmp = temp_sibling(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        export_merged(edit, lm, tmp / "merged", check=check)
        export_peft(edit, lm, tmp / "peft", base_model_name_or_path=base_model_name_or_path, check=check)
        if out.is_dir():
            for entry in sorted(out.iterdir()):
                if entry.name not in BOTH and not TEMP_RE.match(entry.name):
                    _carry(entry, tmp / entry.name)
        replace_path(tmp, out)
    finally:
        if os.path.lexists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return {f: out / f for f in BOTH}


def _carry(src: Path, dst: Path) -> None:
    """`src` (a file, folder or link the user keeps in an export folder) at `dst`: hard links, else copies."""
    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True, copy_function=link)
    else:
        link(str(src), str(dst))


def _has_o_bias(lm: LoadedModel) -> bool:
    return all(lm.sites.bias(l) is not None for l in range(lm.sites.n_layers))


def peft_merge_route(kind: str, lm: LoadedModel) -> str:
    """How the PEFT adapter of a `kind` edit merges into `lm`'s family (written to locaudit_edit.json).

    A LoRA edit merges with merge_and_unload() everywhere. An ITI adapter is a lora_B bias: PEFT merges it
    only into an o_proj that has a bias, so on families without one (llama, qwen3, gemma, ...) load the base
    with its attention_bias option (zero biases) before merging; mistral and qwen2 have no such option, but
    locaudit's merged export holds the bias (as llama); mixtral, phi3 and gptj have no merged form at all."""
    if kind != "iti" or _has_o_bias(lm):
        return "PeftModel.from_pretrained(base, ADAPTER).merge_and_unload()"
    src = base_model_source(lm)
    level = log.level
    log.setLevel(logging.ERROR)  # bias_config's note on a sliding window is for merged exports, not this question
    try:
        how = bias_config(lm, True)[2]
    except ConfigError:
        how = None
    finally:
        log.setLevel(level)
    if how == "attention_bias":
        return (f"PEFT merges a lora_B bias only into an o_proj with a bias: load the base with zero attention biases, "
                f"AutoModelForCausalLM.from_pretrained({src!r}, attention_bias=True), then "
                "PeftModel.from_pretrained(base, ADAPTER).merge_and_unload(); or use `locaudit export --format merged`")
    family = lm.model.config.model_type
    if how is not None:
        return (f"PEFT cannot merge this ITI adapter ({family}'s o_proj has no bias and its config no attention_bias "
                "option): it applies unmerged; for a merged model use `locaudit export --format merged` (a "
                f"{how.split(' ')[0]} folder whose config declares the o_proj bias)")
    return (f"PEFT cannot merge this ITI adapter and no HF config of {family} declares an o_proj bias: apply it "
            "unmerged (PeftModel.from_pretrained(base, ADAPTER)); there is no merged form")


def base_model_source(lm: LoadedModel) -> str:
    """The base model as the user named it (a hub id, a folder or .gguf as an absolute path, a locaudit name),
    for PEFT's base_model_name_or_path: never the cache folder a named model was dequantized into."""
    return str(lm.info.get("source") or lm.name)


def describe_short(edit) -> str:
    heads = getattr(edit, "heads", None)
    return f"{getattr(edit, 'kind', '?')} at {getattr(heads, 'name', heads)!r}"


# ---------------------------------------------------------------------------------------------- baked ITI
def declare_biases(lm: LoadedModel) -> tuple[list[tuple[nn.Module, str, bool]], dict[str, Any] | None]:
    """Make `lm`'s config declare an o_proj bias, in place, for ITIEdit.baked: set the family's bias option
    and register zero biases on every module the declared network has them (q/k/v, every o_proj).
    Returns what to undo (`undeclare_biases`); ([], None) when the config cannot declare it in place
    (mistral, qwen2, unknown families: then saving the baked model is refused instead)."""
    cfg = lm.model.config
    try:
        _, fresh, how = bias_config(lm, True)
    except ConfigError:
        return [], None
    if how.startswith("llama"):
        return [], None  # the family itself cannot declare it: only export_merged can (as llama)
    live = set(lm.model.state_dict())
    added = []
    for key, shape in fresh.items():
        if key in live:
            continue
        mod_name, _, pname = key.rpartition(".")
        mod = lm.model.get_submodule(mod_name)
        existed = pname in mod._parameters
        mod.register_parameter(pname, nn.Parameter(torch.zeros(shape, dtype=lm.dtype, device=lm.device),
                                                   requires_grad=False))
        added.append((mod, pname, existed))
    old = {"attention_bias": cfg.attention_bias} if how == "attention_bias" else {}
    if how == "attention_bias":
        cfg.attention_bias = True
    return added, old


def undeclare_biases(lm: LoadedModel, added: list[tuple[nn.Module, str, bool]], old: dict[str, Any] | None) -> None:
    """Undo `declare_biases` exactly (parameters and config)."""
    for mod, pname, existed in reversed(added):
        if existed:
            mod._parameters[pname] = None
        else:
            mod._parameters.pop(pname, None)
    for k, v in (old or {}).items():
        setattr(lm.model.config, k, v)


def refuse_save(*args, **kwargs):
    raise ConfigError("this model has a baked ITI bias that its config cannot declare: save_pretrained would write "
                      "a model that reloads unedited. Use locaudit.edit.export.export_merged (or `locaudit export`)")


__all__ = ["export_merged", "export_peft", "check_fingerprint", "edit_fingerprint", "bias_config", "merged_state",
           "PeftAdapter", "o_proj_names", "declare_biases", "undeclare_biases", "CHECKS", "EXPORT_META", "check_target"]


def read_export_meta(folder: str | os.PathLike) -> dict:
    """The `locaudit_edit.json` of an exported folder ({} when absent)."""
    p = Path(folder) / EXPORT_META
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}
