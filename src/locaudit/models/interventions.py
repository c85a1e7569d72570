"""Read, add to, patch and differentiate at named sites of a model: the one intervention layer.

Sites (per layer l; `SITE_NAMES`):

| site         | value                                                  | shape                          |
|--------------|--------------------------------------------------------|--------------------------------|
| `heads`      | head outputs: the INPUT of the attention output proj.  | [batch, pos, head*head_dim]    |
| `attn_out`   | attention output: o_proj's OUTPUT                      | [batch, pos, d_model]          |
| `mlp_in`     | the MLP down-projection's input (MLP hidden)           | [batch, pos, d_mlp]            |
| `mlp_out`    | the MLP block's output                                 | [batch, pos, d_model]          |
| `resid_pre`  | the residual stream entering layer l                   | [batch, pos, d_model]          |
| `resid_post` | the residual stream leaving layer l                    | [batch, pos, d_model]          |

Whole-model sites (`MODEL_SITE_NAMES`; layer 0 only):

| site         | value                                                  | shape                          |
|--------------|--------------------------------------------------------|--------------------------------|
| `embed`      | the token embedding module's OUTPUT (Gemma's scaled    | [batch, pos, d_model]          |
|              | embedding module includes its sqrt(d_model) factor)    |                                |
| `final`      | the LM head's INPUT: the final normed hidden state     | [batch, pos, d_model]          |

Positions (`Positions`): ``"all"``; ``"last"`` (each row's last real token, from the attention mask);
or one token index per row (Long[batch]).

Primitives, each a context manager that removes its hooks on exit, also on error:
- `site_hooks(sites, {(site, l): fn})`: the general hook; fn(value) returns a replacement or None
  (`site_module(sites, site, l)` is the module it is registered on).
- `capture(sites, site, layers, positions, stop=...)`: record values; with `stop`, the forward ends
  (`StopForward`, caught by `Capture.forward`) after the deepest site needed has been read.
- `add(sites, site, {l: delta})`: add a tensor (broadcast to the value, e.g. a [head*head_dim] vector)
  at all positions or at one index per row.
- `replace(sites, site, {l: source}, heads=..., positions=...)`: patch the value from cached values
  (another run's), per head slice and position; or `replace(..., mask={l: Bool}, copies=k)`: patch
  exactly where the mask is True, in k stacked copies of the source's batch (e.g. a different head
  per copy; `head_mask(sites, heads_per_row)` gives per-row column masks).
- `grad_capture(sites, site, layers)`: value and d(loss)/d(value) from one forward + backward.
- `grad_hooks(sites, {(site, l): fn})`: fn(grad) -> replacement gradient or None, registered on the
  value in each forward (e.g. zero the gradient through one layer's attention and MLP outputs).
- `module_hooks(sites, {(module, l): fn})` on the modules `MODULE_NAMES` (o_proj, mlp_down, mlp, layer,
  attention, q_proj, k_proj): fn(input, output) -> replacement output or None, with the module's first
  input and its output as the module returns it (a tensor or a tuple), for code that needs both (a LoRA
  delta, a per-row weight update) or a layer's whole output (models/surgery.py `skipped_layers`).
  q_proj / k_proj may be one fused module (`ModelSites.qk_columns` gives a head's columns).
- `module_calls(sites, module, layers)`: record each call's (args, kwargs) of a module (e.g. the
  attention module, to call it again on the same inputs with a node patched).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Callable, Iterator, Literal, Mapping, Sequence, Union

import torch
from jaxtyping import Bool, Float, Int, Shaped
from torch import Tensor, nn

from locaudit.errors import ConfigError
from locaudit.models.sites import ModelSites

SiteName = Literal["heads", "attn_out", "mlp_in", "mlp_out", "resid_pre", "resid_post", "embed", "final"]
SITE_NAMES: tuple[str, ...] = ("heads", "attn_out", "mlp_in", "mlp_out", "resid_pre", "resid_post")
MODEL_SITE_NAMES: tuple[str, ...] = ("embed", "final")  # one per model: layer 0 only
# where each site's value is read: the module's input (a forward pre-hook) or its output (a forward hook)
_READS_INPUT = {"heads": True, "attn_out": False, "mlp_in": True, "mlp_out": False, "resid_pre": True,
                "resid_post": False, "embed": False, "final": True}
MODULE_NAMES: tuple[str, ...] = ("o_proj", "mlp_down", "mlp", "layer", "attention", "q_proj", "k_proj")
Positions = Union[str, Tensor, Sequence[int]]
# fn(value: Float[Tensor, "batch pos ..."]) -> replacement (same shape) or None (read only)
SiteFn = Callable[[Tensor], Union[Tensor, None]]


class StopForward(Exception):
    """Raised by a hook to end a forward pass early: everything needed has been read."""


def site_module(sites: ModelSites, site: str, layer: int) -> nn.Module:
    """The module whose input (heads, mlp_in, resid_pre, final) or output (the others) is `site` at `layer`."""
    if site not in _READS_INPUT:
        raise ConfigError(f"unknown site {site!r}; sites: {', '.join(SITE_NAMES + MODEL_SITE_NAMES)}")
    if site in MODEL_SITE_NAMES:
        if int(layer) != 0:
            raise ConfigError(f"site {site}@{layer}: {site} is one site of the whole model, at layer 0 only")
        return sites.embed() if site == "embed" else sites.lm_head()
    if not 0 <= int(layer) < sites.n_layers:
        raise ConfigError(f"site {site}@{layer}: layer outside the model's {sites.n_layers} layers")
    if site in ("heads", "attn_out"):
        return sites.o_proj(layer)
    if site == "mlp_in":
        return sites.mlp_down(layer)
    if site == "mlp_out":
        return sites.mlp(layer)
    return sites.layer(layer)


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def _with_first(x, new: Tensor):
    return (new, *x[1:]) if isinstance(x, tuple) else new


@contextmanager
def site_hooks(sites: ModelSites, fns: Mapping[tuple[str, int], SiteFn]) -> Iterator[None]:
    """Register fn on each (site, layer); fn(value) -> replacement or None. Removed on exit, also on error.

    Several entries may share a module; they run in the order given.
    """
    handles = []
    try:
        for (site, layer), fn in fns.items():
            module = site_module(sites, site, layer)
            if _READS_INPUT[site]:
                def pre(module, args, kwargs, fn=fn):
                    if args:
                        new = fn(args[0])
                        return None if new is None else ((new, *args[1:]), kwargs)
                    new = fn(kwargs["hidden_states"])
                    return None if new is None else (args, {**kwargs, "hidden_states": new})
                handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            else:
                def post(module, args, output, fn=fn):
                    new = fn(_first(output))
                    return None if new is None else _with_first(output, new)
                handles.append(module.register_forward_hook(post))
        yield
    finally:
        for h in handles:
            h.remove()


def hook_module(sites: ModelSites, module: str, layer: int) -> nn.Module:
    """Layer `layer`'s module named `module` (one of MODULE_NAMES)."""
    if module not in MODULE_NAMES:
        raise ConfigError(f"unknown module {module!r}; modules: {', '.join(MODULE_NAMES)}")
    if not 0 <= int(layer) < sites.n_layers:
        raise ConfigError(f"module {module}@{layer}: layer outside the model's {sites.n_layers} layers")
    get = {"o_proj": sites.o_proj, "mlp_down": sites.mlp_down, "mlp": sites.mlp, "layer": sites.layer,
           "attention": sites.attention, "q_proj": sites.q_proj, "k_proj": sites.k_proj}[module]
    return get(int(layer))


# fn(input: the module's first input, output: as the module returns it) -> replacement output or None
ModuleFn = Callable[[Tensor, object], object]


@contextmanager
def module_hooks(sites: ModelSites, fns: Mapping[tuple[str, int], ModuleFn]) -> Iterator[None]:
    """Register fn on each (module, layer) (modules: MODULE_NAMES); fn(input, output) -> replacement
    output or None. `input` is the module's first input (``hidden_states`` where a layer gets it by
    keyword); `output` is what the module returns (a tensor, or a layer's tuple). Removed on exit."""
    handles = []
    try:
        for (name, layer), fn in fns.items():
            module = hook_module(sites, name, layer)

            def post(module, args, kwargs, output, fn=fn):
                return fn(args[0] if args else kwargs.get("hidden_states"), output)
            handles.append(module.register_forward_hook(post, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def module_calls(sites: ModelSites, module: str, layers: Sequence[int]) -> Iterator[dict[int, tuple]]:
    """Record the (args, kwargs) of each call of `module` (MODULE_NAMES) at `layers` in the forwards run
    inside the block: calls[l], the last call's, as the module received them (not detached, not copied)."""
    calls: dict[int, tuple] = {}
    handles = []
    try:
        for l in layers:
            def pre(_mod, args, kwargs, l=int(l)):
                calls[l] = (args, kwargs)
            handles.append(hook_module(sites, module, int(l)).register_forward_pre_hook(pre, with_kwargs=True))
        yield calls
    finally:
        for h in handles:
            h.remove()


def position_index(positions: Positions, attention_mask: Shaped[Tensor, "batch pos"] | None, batch: int,
                   device) -> Int[Tensor, "batch"] | None:
    """Long[Tensor, "batch"] token index per row, or None for all positions.

    "last" needs the attention mask (right padding: the last 1 of each row).
    """
    if isinstance(positions, str):
        if positions == "all":
            return None
        if positions == "last":
            if attention_mask is None:
                return torch.full((batch,), -1, dtype=torch.long, device=device)
            return (attention_mask.long().sum(1) - 1).to(device)
        raise ConfigError(f"positions={positions!r}: expected 'all', 'last' or one token index per row")
    idx = torch.as_tensor(positions, dtype=torch.long, device=device)
    if idx.dim() != 1 or idx.shape[0] != batch:
        raise ConfigError(f"positions: expected one index per row ({batch}), got shape {tuple(idx.shape)}")
    return idx


def as_3d(x: Float[Tensor, "*rows dim"], batch: int) -> Float[Tensor, "batch pos dim"]:
    """Some attention implementations flatten (batch*pos, dim): view it as [batch, pos, dim]."""
    return x.view(batch, -1, x.shape[-1]) if x.dim() == 2 else x


class Capture:
    """Values of one site at chosen layers, from the forwards run through `forward` (or any forward).

    values[l]: Float[Tensor, "batch pos dim"] (positions "all") or Float[Tensor, "batch dim"] (one
    position per row); split into heads ([..., head, head_dim]) where `split` is set on the heads site.
    """

    def __init__(self, sites: ModelSites, site: str, layers: Sequence[int], positions: Positions = "all",
                 stop: bool = False, split: bool = False, detach: bool = True, dtype: torch.dtype | None = None):
        if not layers:
            raise ConfigError("capture: no layers given")
        if split and site != "heads":
            raise ConfigError(f"capture: split=True applies to the heads site, not {site!r}")
        self.sites, self.site = sites, site
        self.layers = sorted({int(l) for l in layers})
        self.positions, self.stop, self.split, self.detach, self.dtype = positions, stop, split, detach, dtype
        self.values: dict[int, Tensor] = {}
        self._batch: dict = {}

    def set_batch(self, attention_mask: Tensor | None = None, positions: Positions | None = None,
                  batch: int | None = None) -> None:
        """Declare the next forward's rows: its attention mask (for "last") and/or explicit positions."""
        pos = self.positions if positions is None else positions
        if attention_mask is not None:
            batch = attention_mask.shape[0]
        self._batch = {"mask": attention_mask, "positions": pos, "batch": batch}
        self.values.clear()

    def _read(self, layer: int, x: Tensor) -> None:
        batch = self._batch.get("batch") or x.shape[0]
        x = as_3d(x, batch)
        idx = position_index(self._batch.get("positions", self.positions), self._batch.get("mask"), x.shape[0],
                             x.device)
        v = x if idx is None else x[torch.arange(x.shape[0], device=x.device), idx]
        if self.detach:
            v = v.detach()
        if self.dtype is not None:
            v = v.to(self.dtype)
        if self.split:
            v = self.sites.split_heads(v)
        self.values[layer] = v
        if self.stop and layer == self.layers[-1]:
            raise StopForward

    def hooks(self) -> dict[tuple[str, int], SiteFn]:
        def make(l: int) -> SiteFn:
            def fn(x: Tensor) -> None:
                self._read(l, x)
                return None
            return fn
        return {(self.site, l): make(l) for l in self.layers}

    def forward(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None,
                positions: Positions | None = None, use_cache: bool = False, **kwargs):
        """Run `model` on the batch; returns its output, or None where the capture stopped it. A KV cache
        passed in kwargs is filled up to the layer where the capture stopped."""
        self.set_batch(attention_mask, positions, batch=input_ids.shape[0])
        try:
            return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache, **kwargs)
        except StopForward:
            return None


@contextmanager
def capture(sites: ModelSites, site: str, layers: Sequence[int], positions: Positions = "all", *,
            stop: bool = False, split: bool = False, detach: bool = True,
            dtype: torch.dtype | None = None) -> Iterator[Capture]:
    """Record `site` at `layers` (see `Capture`); with `stop`, end each forward after the deepest layer's
    value is read (run it through `Capture.forward`, which catches `StopForward`)."""
    cap = Capture(sites, site, layers, positions, stop, split, detach, dtype)
    with site_hooks(sites, cap.hooks()):
        yield cap


def _at_positions(x: Tensor, idx: Tensor | None, fn: Callable[[Tensor, Tensor | None], Tensor]) -> Tensor:
    """x with rows' positions `idx` (or every position) replaced by fn(selected, rows)."""
    if idx is None:
        return fn(x, None)
    rows = torch.arange(x.shape[0], device=x.device)
    out = x.clone()
    out[rows, idx] = fn(x[rows, idx], rows)
    return out


@contextmanager
def add(sites: ModelSites, site: str, deltas: Mapping[int, Tensor], positions: Positions = "all") -> Iterator[None]:
    """Add deltas[l] to `site` at layer l: at every position, or at one index per row (Long[batch]).

    A delta broadcasts against the value ([batch, pos, dim] at all positions, [batch, dim] at one per
    row): e.g. Float[Tensor, "head*head_dim"] on the heads site adds a vector to every token.
    """
    if isinstance(positions, str) and positions != "all":
        raise ConfigError("add: positions must be 'all' or one token index per row (Long[batch])")

    def make(delta: Tensor) -> SiteFn:
        def fn(x: Tensor) -> Tensor:
            idx = position_index(positions, None, x.shape[0], x.device)
            return _at_positions(x, idx, lambda v, rows: v + delta.to(device=v.device, dtype=v.dtype))
        return fn

    with site_hooks(sites, {(site, int(l)): make(d) for l, d in deltas.items()}):
        yield


def head_columns(sites: ModelSites, heads: Sequence[int] | None) -> Int[Tensor, "columns"] | None:
    """Long[Tensor, "columns"]: the heads-site coordinates of `heads`, head_dim per head (None: all of them)."""
    if heads is None:
        return None
    D = sites.head_dim
    return torch.cat([torch.arange(h * D, (h + 1) * D) for h in sorted(set(int(h) for h in heads))])


def head_mask(sites: ModelSites, heads_per_row: Sequence[Sequence[int]]) -> Bool[Tensor, "rows hd"]:
    """Bool[Tensor, "rows head*head_dim"]: row r selects the heads-site columns of heads_per_row[r]
    (a per-row column mask for `replace(mask=...)`; broadcast it over positions with [:, None, :])."""
    D = sites.head_dim
    out = torch.zeros(len(heads_per_row), sites.n_heads * D, dtype=torch.bool)
    for r, hs in enumerate(heads_per_row):
        for h in hs:
            out[r, int(h) * D: (int(h) + 1) * D] = True
    return out


@contextmanager
def replace(sites: ModelSites, site: str, sources: Mapping[int, Tensor], *,
            heads: Mapping[int, Sequence[int]] | None = None, positions: Positions = "all",
            mask: Mapping[int, Tensor] | None = None, copies: int = 1) -> Iterator[None]:
    """Patch `site` at layer l from sources[l] (e.g. another run's capture of the same site).

    sources[l]: Float[Tensor, "batch pos dim"] at all positions, Float[Tensor, "batch dim"] at one
    index per row. `heads` ({layer: [head, ...]}, heads site only) limits the patch to those heads'
    slices; other coordinates keep this run's values.

    `mask` ({layer: Bool[Tensor, "copies batch pos dim"]} or a mask that broadcasts to it; takes the
    place of `heads` and `positions`) patches exactly the coordinates where mask[l] is True. With
    `copies` = k the run's batch is k stacked copies of the sources' batch (rows c*batch..(c+1)*batch-1
    are copy c): one source serves every copy and the mask says what each copy patches, e.g. a
    different head per copy at the patched positions, ``head_mask(sites, [[h_0], [h_1], ...])[:, None,
    None, :] & at[None, :, :, None]`` (at: Bool[batch, pos]).
    """
    if heads is not None and site != "heads":
        raise ConfigError(f"replace: heads= applies to the heads site, not {site!r}")
    if isinstance(positions, str) and positions != "all":
        raise ConfigError("replace: positions must be 'all' or one token index per row (Long[batch])")
    if mask is not None:
        if heads is not None or not isinstance(positions, str):
            raise ConfigError("replace: mask= takes the place of heads= and positions=")
        if set(int(l) for l in mask) != set(int(l) for l in sources):
            raise ConfigError(f"replace: mask layers {sorted(mask)} != source layers {sorted(sources)}")
    elif copies != 1:
        raise ConfigError("replace: copies= applies with mask=")

    def make(l: int, src: Tensor) -> SiteFn:
        cols = head_columns(sites, None if heads is None else heads.get(l, ()))

        def patch(v: Tensor, rows: Tensor | None) -> Tensor:
            s = src.to(device=v.device, dtype=v.dtype)
            if s.shape != v.shape:
                raise ConfigError(f"replace {site}@{l}: source shape {tuple(s.shape)} != value {tuple(v.shape)}")
            if cols is None:
                return s
            out = v.clone()
            c = cols.to(v.device)
            out[..., c] = s[..., c]
            return out

        def fn(x: Tensor) -> Tensor:
            idx = position_index(positions, None, x.shape[0], x.device)
            return _at_positions(x, idx, patch)
        return fn

    def make_masked(l: int, src: Tensor, where: Tensor) -> SiteFn:
        def fn(x: Tensor) -> Tensor:
            v = as_3d(x, copies * src.shape[0]) if src.dim() == 3 else x
            if v.shape[0] != copies * src.shape[0] or v.shape[1:] != src.shape[1:]:
                raise ConfigError(f"replace {site}@{l}: value {tuple(v.shape)} is not {copies} stacked copies "
                                  f"of the source's shape {tuple(src.shape)}")
            v = v.view(copies, *src.shape)
            return torch.where(where.to(x.device), src.to(device=x.device, dtype=x.dtype), v).view(x.shape)
        return fn

    fns = {(site, int(l)): (make(int(l), s) if mask is None else make_masked(int(l), s, mask[l]))
           for l, s in sources.items()}
    with site_hooks(sites, fns):
        yield


class Gradients:
    """values[l] (Float[Tensor, "batch pos dim"], detached) and, after loss.backward(), grads[l]."""

    def __init__(self) -> None:
        self.values: dict[int, Tensor] = {}
        self._leaves: dict[int, Tensor] = {}

    @property
    def grads(self) -> dict[int, Tensor]:
        out = {}
        for l, z in self._leaves.items():
            if z.grad is None:
                raise RuntimeError(f"grad_capture: no gradient reached layer {l}; call loss.backward() inside the block")
            out[l] = z.grad
        return out


@contextmanager
def grad_capture(sites: ModelSites, site: str, layers: Sequence[int]) -> Iterator[Gradients]:
    """Record `site` at `layers` and its gradient: inside the block run a forward with grad enabled and
    call backward on a loss; `.grads[l]` is d(loss)/d(value). The model's weights need not require grad
    (a zero leaf is added to each value, so the graph below stays intact and other sites' grads too)."""
    g = Gradients()

    def make(l: int) -> SiteFn:
        def fn(x: Tensor) -> Tensor:
            z = torch.zeros_like(x, requires_grad=True)
            g._leaves[l] = z
            g.values[l] = x.detach()
            return x + z
        return fn

    with torch.enable_grad(), site_hooks(sites, {(site, int(l)): make(int(l)) for l in layers}):
        yield g


# fn(grad: d(loss)/d(value)) -> replacement gradient or None
GradFn = Callable[[Tensor], Union[Tensor, None]]


@contextmanager
def grad_hooks(sites: ModelSites, fns: Mapping[tuple[str, int], GradFn]) -> Iterator[None]:
    """In every forward inside the block, register fn on the value of each (site, layer) as a gradient
    hook: in the backward pass fn(grad) returns a replacement gradient or None. Values that do not
    require grad are left alone. The forward's values are unchanged."""
    def make(fn: GradFn) -> SiteFn:
        def read(x: Tensor) -> None:
            if x.requires_grad:
                x.register_hook(fn)
            return None
        return read

    with site_hooks(sites, {(site, int(l)): make(fn) for (site, l), fn in fns.items()}):
        yield


@contextmanager
def combined(*managers) -> Iterator[list]:
    """Enter several intervention context managers as one (left to right); exit in reverse."""
    with ExitStack() as stack:
        yield [stack.enter_context(m) for m in managers]
