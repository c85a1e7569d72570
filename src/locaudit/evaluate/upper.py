"""Run an edited model only above the layers its edit leaves unchanged (shared evaluation, evaluate/shared.py).

An edit whose lowest edited layer is L leaves the hidden states entering L, and the KV caches of layers
0..L-1, exactly as the unedited model computes them. So an unedited ("base") pass computes them once for
every edit, and each edit runs layers L.. only (models/surgery.run_from_layer), fed the base states.

KV caches: the upper run of an edit needs a cache whose layers below L hold the same length as the layers
it runs (the model reads positions and mask sizes from the cache), so `graft` builds one from the base
cache's layers below L and the edit's own layers from L up. Layer objects are copied (shallow: their
tensors are replaced, never written in place, by DynamicCache's update and batch_repeat_interleave), so
one base cache serves every edit.
"""

from __future__ import annotations

import copy
from typing import Mapping

import torch

from locaudit.edit.base import Edit, NoEdit
from locaudit.models.loading import LoadedModel
from locaudit.models.prefix_cache import cache_kwarg
from locaudit.models.surgery import prefix_supported, run_from_layer


def lowest_layer(lm: LoadedModel, edit: Edit | None) -> int:
    """The lowest layer whose computation `edit` changes: n_layers for no edit (nothing changes), 0 (the full
    forward) for a kind not known here or a family whose card lacks the frozen-prefix path."""
    from locaudit.edit.iti import ITIEdit
    from locaudit.edit.lora import LoRAEdit

    n = lm.sites.n_layers
    if edit is None or isinstance(edit, NoEdit):
        return n
    if not prefix_supported(lm):
        return 0
    if isinstance(edit, ITIEdit):  # adds alpha * theta^l at the layers where theta is non-zero (edit/iti.py)
        if edit.alpha == 0.0:
            return n
        rows = torch.nonzero(edit.theta.abs().sum(1) > 0).flatten().tolist()
        return min(rows) if rows else n
    if isinstance(edit, LoRAEdit):  # hooks on o_proj of every layer of its head set (edit/lora.py build_stack)
        return min(edit.heads.layers) if len(edit.heads) else n
    return 0


def empty_cache(model):
    """A KV cache with one empty layer per model layer, of the layer types of the FULL model's config
    (created before any run_from_layer slices config.layer_types); None where the cache class differs."""
    try:
        from transformers import DynamicCache

        return DynamicCache(config=model.config)
    except (ImportError, TypeError, KeyError, ValueError):
        return None


def copy_cache(cache):
    """A copy that the next forward can extend without touching `cache` (layer objects copied, tensors shared)."""
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    return new


def graft(upper, base, layer: int):
    """A cache with `base`'s layers below `layer` (the edit leaves them unchanged) and `upper`'s from `layer` up."""
    new = copy.copy(upper)
    new.layers = [copy.copy(base.layers[j] if j < layer else upper.layers[j]) for j in range(len(upper.layers))]
    return new


def grafts_supported(lm: LoadedModel) -> bool:
    """Whether the model's KV cache has one layer object per model layer (what `graft` assumes)."""
    c = empty_cache(lm.model)
    return c is not None and len(getattr(c, "layers", ())) == lm.sites.n_layers


def forward_from(lm: LoadedModel, layer: int, states: Mapping[int, torch.Tensor], input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, cache=None, **kwargs):
    """The model's output on a batch whose states entering `layer` are states[layer] (Float[B, T, d]): layers
    layer.. only (0: the full forward). Call inside the edit's and the precision's contexts."""
    if cache is not None:
        kwargs[cache_kwarg(lm.model)] = cache
    run = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=cache is not None, **kwargs)
    if layer == 0:
        return lm.model(**run)
    with run_from_layer(lm, layer) as feed:
        feed["h"] = states[layer]
        return lm.model(**run)


__all__ = ["lowest_layer", "empty_cache", "copy_cache", "graft", "grafts_supported", "forward_from"]
