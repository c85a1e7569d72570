"""Frozen-prefix cache: run only the layers an edit can change.

An edit whose lowest layer is l leaves the hidden states entering layer l unchanged, so they are
computed once (no grad) and reused across epochs and trials; training then runs layers l..L-1 only.
The trick is generic: the model's layer list is temporarily cut to layers[l:] and a forward pre-hook on
the first kept layer swaps in the cached states (the model still computes embeddings, masks and rotary
embeddings, which are cheap). Per-layer config (gemma2/qwen `layer_types`) is sliced the same way.
It is enabled for the families tested against the full forward (`PREFIX_FAMILIES`); others fall back
to the full forward.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from locaudit.errors import ConfigError
from locaudit.models.loading import LoadedModel
from locaudit.models.precision import PrecisionLike, as_precision
from locaudit.models.sites import _get

log = logging.getLogger(__name__)

PREFIX_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gpt2", "gpt_neox", "opt")


def prefix_supported(lm: LoadedModel) -> bool:
    return lm.sites.model_type in PREFIX_FAMILIES


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass early."""


@contextmanager
def capture_input(lm: LoadedModel, layer: int, stop: bool = True) -> Iterator[dict]:
    """Record the hidden states entering `layer` in box["h"]; with `stop`, end the pass there (raises _Stop)."""
    box: dict = {}

    def pre(module, args, kwargs):
        box["h"] = _hidden_arg(args, kwargs).detach()
        if stop:
            raise _Stop

    handle = lm.sites.layer(layer).register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield box
    finally:
        handle.remove()


@contextmanager
def run_from_layer(lm: LoadedModel, layer: int) -> Iterator[dict]:
    """Within the block the model runs layers[layer:] only, on the states put in feed["h"] before each call.

    feed["h"]: Float[Tensor, "batch pos d_model"], set before each forward to that forward's batch.
    """
    if layer == 0:
        raise ConfigError("run_from_layer(0) is the full forward: call the model directly")
    sites = lm.sites
    parent_path, _, attr = sites.spec.layers.rpartition(".")
    parent = _get(lm.model, parent_path) if parent_path else lm.model
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
def checkpointed_layers(lm: LoadedModel, enabled: bool = True) -> Iterator[None]:
    """Within the block, every (kept) layer recomputes its activations in the backward pass instead of
    storing them (less memory, one more forward). Enter it inside `run_from_layer`, not around it."""
    if not enabled:
        yield
        return
    parent_path, _, attr = lm.sites.spec.layers.rpartition(".")
    parent = _get(lm.model, parent_path) if parent_path else lm.model
    current = getattr(parent, attr)
    try:
        setattr(parent, attr, nn.ModuleList([_Checkpointed(layer) for layer in current]))
        yield
    finally:
        setattr(parent, attr, current)


@dataclass
class PrefixStates:
    """Hidden states entering `layer` for every sequence (2N: chosen 0..N-1, then rejected), unpadded.

    states[i]: Float[Tensor, "len_i d_model"] in `dtype`, on the CPU.
    """

    layer: int
    states: list[torch.Tensor]
    dtype: torch.dtype

    def batch(self, idx: Sequence[int], n_pairs: int, T: int) -> torch.Tensor:
        """Float[Tensor, "2B T d_model"] right-padded with zeros: chosen of `idx`, then rejected of `idx`."""
        seqs = [self.states[i] for i in idx] + [self.states[n_pairs + i] for i in idx]
        out = torch.zeros(len(seqs), T, seqs[0].shape[-1], dtype=self.dtype)
        for j, s in enumerate(seqs):
            out[j, : s.shape[0]] = s
        return out

    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.states)


def collect_states(lm: LoadedModel, enc, layer: int, precision: PrecisionLike, batch_size: int = 16,
                   start: PrefixStates | None = None, progress: bool = False) -> PrefixStates:
    """No-grad pass storing the states entering `layer` for every sequence of `enc` (an EncodedPairs).

    The states are stored exactly as the layers above receive them (their dtype: the residual stream of an
    fp32 model stays fp32 under bf16 autocast), so training from them equals the full forward.
    From `start` (states at a lower layer) only layers start.layer..layer-1 run.
    """
    from locaudit.models.scoring import collate_completions

    seqs = enc.sequences()
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]) + len(seqs[i][1]))
    out: list[torch.Tensor | None] = [None] * len(seqs)
    dev = lm.device
    it = range(0, len(order), batch_size)
    dtype = None
    precision = as_precision(precision, lm.device)
    with torch.no_grad(), precision.autocast(lm.dtype), capture_input(lm, layer) as box:
        ctx = run_from_layer(lm, start.layer) if start is not None and start.layer > 0 else nullcontext()
        with ctx as feed:
            for s in tqdm(it, desc=f"prefix states @ layer {layer}", disable=not progress, leave=False):
                idx = order[s: s + batch_size]
                b = collate_completions([seqs[i] for i in idx], enc.pad_id)
                if feed is not None:
                    h = torch.zeros(len(idx), b.input_ids.shape[1], start.states[0].shape[-1], dtype=start.dtype)
                    for j, i in enumerate(idx):
                        h[j, : start.states[i].shape[0]] = start.states[i]
                    feed["h"] = h.to(dev)
                b = b.to(dev)
                try:
                    lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
                except _Stop:
                    pass
                h = box.pop("h")
                dtype = h.dtype
                lengths = b.attention_mask.sum(1).tolist()
                for j, i in enumerate(idx):
                    out[i] = h[j, : lengths[j]].to("cpu").clone()
    return PrefixStates(layer, out, dtype or lm.dtype)  # type: ignore[arg-type]


class PrefixCache:
    """In-memory LRU of PrefixStates keyed by (model fingerprint, data key, precision, layer).

    A request for layer l' is served from a cached lower layer l of the same data by running layers
    l..l'-1 only.
    """

    def __init__(self, max_entries: int = 2) -> None:
        self.max_entries = max_entries
        self._store: OrderedDict[tuple, PrefixStates] = OrderedDict()

    def get(self, lm: LoadedModel, enc, layer: int, precision: PrecisionLike,
            batch_size: int = 16, progress: bool = False) -> PrefixStates:
        precision = as_precision(precision, lm.device)
        key = (lm.fingerprint, enc.key, precision.key, int(layer))
        if key in self._store:
            self._store.move_to_end(key)
            return self._store[key]
        below = [k for k in self._store if k[:3] == key[:3] and k[3] < layer]
        start = self._store[max(below, key=lambda k: k[3])] if below else None
        states = collect_states(lm, enc, layer, precision, batch_size, start, progress)
        self._store[key] = states
        while len(self._store) > self.max_entries:
            self._store.popitem(last=False)
        return states

    def clear(self) -> None:
        self._store.clear()


PREFIX_CACHE = PrefixCache()
