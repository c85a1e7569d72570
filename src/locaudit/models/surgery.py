"""Model surgery for partial forwards: read the states entering a layer, run only the layers above it,
checkpoint the layers that run, or stand in for the lowest layers with their cached outputs.

`run_from_layer` temporarily cuts the model's layer list to layers[l:] and feeds cached states into the
first kept layer (the model still computes embeddings, masks and rotary embeddings, which are cheap);
per-layer config (gemma2/gemma3/qwen `layer_types`) is sliced the same way. It is used where a family's
registry card says `prefix=True` (models/sites.py), i.e. where the tests found it equal to the full
forward. `skipped_layers` replaces layers 0..l-1 by their known outputs (e.g. a base run's, stacked for
several copies of its batch: activation patching, localize/patching.py). Everything is restored on
exit, also on error; hooks go through models/interventions.py.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

from locaudit.errors import ConfigError
from locaudit.models.interventions import Capture, StopForward, capture, site_hooks
from locaudit.models.sites import SITES, module_at


def prefix_families() -> tuple[str, ...]:
    """Registered families whose card enables the frozen-prefix path."""
    return tuple(name for name, spec in SITES.items() if spec.prefix)


PREFIX_FAMILIES = prefix_families()


def prefix_supported(lm) -> bool:
    """Whether `lm`'s family may run from a cached layer input (its SiteSpec has prefix=True)."""
    return bool(getattr(lm.sites.spec, "prefix", False))


@contextmanager
def capture_input(lm, layer: int, stop: bool = True) -> Iterator[Capture]:
    """Record the hidden states entering `layer` (cap.values[layer]: Float[Tensor, "batch pos d_model"]);
    with `stop`, end the pass there (run it through cap.forward, which catches StopForward)."""
    with capture(lm.sites, "resid_pre", [layer], "all", stop=stop) as cap:
        yield cap


def _layer_parent(lm) -> tuple[nn.Module, str]:
    parent_path, _, attr = lm.sites.spec.layers.rpartition(".")
    return (module_at(lm.model, parent_path) if parent_path else lm.model), attr


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

    def feed_states(cur: torch.Tensor) -> torch.Tensor:
        if "h" not in feed:
            raise RuntimeError("run_from_layer: no cached hidden states were fed for this forward pass")
        h = feed["h"]  # kept: gradient checkpointing re-runs this layer in the backward pass
        if h.shape != cur.shape:
            raise RuntimeError(f"run_from_layer: fed states {tuple(h.shape)} do not match the batch {tuple(cur.shape)}")
        return h.to(cur.dtype)

    layer_types = getattr(config, "layer_types", None)
    with site_hooks(sites, {("resid_pre", layer): feed_states}):
        try:
            setattr(parent, attr, nn.ModuleList(list(full)[layer:]))
            if layer_types is not None:
                config.layer_types = list(layer_types)[layer:]
            yield feed
        finally:
            setattr(parent, attr, full)
            if layer_types is not None:
                config.layer_types = layer_types


def _repeat(x, k: int):
    """A layer output (tensor, or tuple/list of tensors and None) stacked k times along the batch axis."""
    if isinstance(x, torch.Tensor):
        return x.repeat(k, *([1] * (x.dim() - 1))) if k > 1 else x
    if isinstance(x, (tuple, list)):
        return type(x)(_repeat(v, k) for v in x)
    return x


def _skippable(x) -> bool:
    if isinstance(x, torch.Tensor) or x is None:
        return True
    return isinstance(x, (tuple, list)) and all(isinstance(v, torch.Tensor) or v is None for v in x)


class _CachedLayer(nn.Module):
    """Stands in for a decoder layer whose output is known: returns it without computing anything."""

    def __init__(self, orig: nn.Module, out) -> None:
        super().__init__()
        object.__setattr__(self, "_orig", orig)  # not a submodule: its weights are not duplicated
        object.__setattr__(self, "_out", out)

    def forward(self, *args, **kwargs):
        return self._out

    def __getattr__(self, name):  # attributes a model reads from its layers (e.g. attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_orig"), name)


@contextmanager
def skipped_layers(lm, start: int, outputs: Sequence | None, copies: int) -> Iterator[bool]:
    """Replace layers 0..start-1 by their cached base-run `outputs` (stacked `copies` times); restore on exit.
    outputs[j]: layer j's output as the layer returns it (e.g. recorded by interventions.module_hooks on
    ("layer", j)). Yields whether layers were skipped (not when an output has a form this cannot stack)."""
    if not start or outputs is None or not all(_skippable(outputs[j]) for j in range(start)):
        yield False
        return
    layers = lm.sites.layer_list
    saved = [layers[j] for j in range(start)]
    try:
        for j in range(start):
            layers[j] = _CachedLayer(saved[j], _repeat(outputs[j], copies))
        yield True
    finally:
        for j in range(start):
            layers[j] = saved[j]


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
           "run_from_layer", "checkpointed_layers", "skipped_layers"]
