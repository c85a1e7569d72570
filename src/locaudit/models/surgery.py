"""Model surgery for partial forwards: read the states entering a layer, run only the layers above it,
and checkpoint the layers that run.

`run_from_layer` temporarily cuts the model's layer list to layers[l:] and feeds cached states into the
first kept layer (the model still computes embeddings, masks and rotary embeddings, which are cheap);
per-layer config (gemma2/gemma3/qwen `layer_types`) is sliced the same way. It is used where a family's
registry card says `prefix=True` (models/sites.py), i.e. where the tests found it equal to the full
forward. Everything is restored on exit, also on error.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from locaudit.errors import ConfigError
from locaudit.models.interventions import Capture, StopForward, capture
from locaudit.models.sites import SITES, _get


def prefix_families() -> tuple[str, ...]:
    """Registered families whose card enables the frozen-prefix path."""
    return tuple(name for name, spec in SITES.items() if spec.prefix)


PREFIX_FAMILIES = prefix_families()


def prefix_supported(lm) -> bool:
    """Whether `lm`'s family may run from a cached layer input (its SiteSpec has prefix=True)."""
    return bool(getattr(lm.sites.spec, "prefix", False))


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def capture_input(lm, layer: int, stop: bool = True) -> Iterator[Capture]:
    """Record the hidden states entering `layer` (cap.values[layer]: Float[Tensor, "batch pos d_model"]);
    with `stop`, end the pass there (run it through cap.forward, which catches StopForward)."""
    with capture(lm.sites, "resid_pre", [layer], "all", stop=stop) as cap:
        yield cap


def _layer_parent(lm) -> tuple[nn.Module, str]:
    parent_path, _, attr = lm.sites.spec.layers.rpartition(".")
    return (_get(lm.model, parent_path) if parent_path else lm.model), attr


@contextmanager
def run_from_layer(lm, layer: int) -> Iterator[dict]:
    """Within the block the model runs layers[layer:] only, on the states put in feed["h"] before each call.

    feed["h"]: Float[Tensor, "batch pos d_model"], set before each forward to that forward's batch.
    """
    if layer == 0:
        raise ConfigError("run_from_layer(0) is the full forward: call the model directly")
    sites = lm.sites
    parent, attr = _layer_parent(lm)
    full = getattr(parent, attr)
    if full is not sites.layer_list:
        raise ConfigError(f"{sites.spec.layers} is already truncated (nested run_from_layer?)")
    config = getattr(lm.model, "config", None)
    feed: dict = {}

    def pre(module, args, kwargs):
        if "h" not in feed:
            raise RuntimeError("run_from_layer: no cached hidden states were fed for this forward pass")
        h = feed["h"]  # kept: gradient checkpointing re-runs this layer in the backward pass
        cur = _hidden_arg(args, kwargs)
        if h.shape != cur.shape:
            raise RuntimeError(f"run_from_layer: fed states {tuple(h.shape)} do not match the batch {tuple(cur.shape)}")
        h = h.to(cur.dtype)
        if args:
            return (h, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}

    handle = full[layer].register_forward_pre_hook(pre, with_kwargs=True)
    layer_types = getattr(config, "layer_types", None)
    try:
        setattr(parent, attr, nn.ModuleList(list(full)[layer:]))
        if layer_types is not None:
            config.layer_types = list(layer_types)[layer:]
        yield feed
    finally:
        setattr(parent, attr, full)
        if layer_types is not None:
            config.layer_types = layer_types
        handle.remove()


class _Checkpointed(nn.Module):
    """A layer run under non-reentrant activation checkpointing; attributes pass through to the layer."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, *args, **kwargs):
        from torch.utils.checkpoint import checkpoint

        if not torch.is_grad_enabled():
            return self.layer(*args, **kwargs)
        return checkpoint(self.layer, *args, use_reentrant=False, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.layer, name)


@contextmanager
def checkpointed_layers(lm, enabled: bool = True) -> Iterator[None]:
    """Within the block, every (kept) layer recomputes its activations in the backward pass instead of
    storing them (less memory, one more forward). Enter it inside `run_from_layer`, not around it."""
    if not enabled:
        yield
        return
    parent, attr = _layer_parent(lm)
    current = getattr(parent, attr)
    try:
        setattr(parent, attr, nn.ModuleList([_Checkpointed(layer) for layer in current]))
        yield
    finally:
        setattr(parent, attr, current)


__all__ = ["StopForward", "PREFIX_FAMILIES", "prefix_families", "prefix_supported", "capture_input",
           "run_from_layer", "checkpointed_layers"]
