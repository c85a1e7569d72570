"""The optimal localized edit: a head-masked, reparameterised low-rank edit of the attention output.

Reparameterised form (the paper's): r^{l+1} = r_orig^{l+1} + sum_k <a_k, o> W b_k, with o the o_proj
input [.., H*D], W = o_proj's weight [d, H*D], and b_k zero outside the head set (a fixed mask), so
W b_k = sum_{h in set} W_h b_{k,h}. Plain LoRA form (for comparison): sum_k <a_k, o> b'_k with b'_k in
d_model; it is localized by reading only the set's heads (a masked) on the set's layers.

The edit is a forward hook on o_proj adding the delta to its output: the base weight is never touched,
and leaving the `with` block removes the hook, restoring the model bit for bit. `LoRAStack` holds E
independent edits that run in one forward pass on an E-times replicated batch (multi-edit training).
"""

from __future__ import annotations

import json
import logging
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from locaudit.edit.base import ExportMixin, check_outside, check_tensor, register_edit, require_files, save_edit_folder
from locaudit.errors import ConfigError, DataError
from locaudit.heads import HeadSet
from locaudit.models.hooks import o_proj_hooks
from locaudit.models.loading import LoadedModel
from locaudit.models.sites import ModelSites

log = logging.getLogger(__name__)

WEIGHTS_FILE = "edit.safetensors"
META_FILE = "meta.json"


def edit_masks(sites: ModelSites, heads: HeadSet, reparam: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed masks of one edit: (Bool[Tensor, "layer 1 head*head_dim"] for a, Bool[Tensor, "layer 1 out"] for b).

    Reparameterised: a is free on the set's layers, b lives on the set's head coordinates.
    Plain: a reads the set's head coordinates, b' (in d_model) is free on the set's layers.
    """
    L, H, D = sites.shape
    dims = heads.dim_mask(L, H, D)  # [L, HD]
    on_layer = dims.any(dim=1, keepdim=True)  # [L, 1]
    if reparam:
        a_mask, b_mask = on_layer.expand(L, H * D), dims
    else:
        a_mask, b_mask = dims, on_layer.expand(L, sites.d_model)
    return a_mask.unsqueeze(1).clone(), b_mask.unsqueeze(1).clone()


def init_params(sites: ModelSites, heads: HeadSet, rank: int = 1, reparam: bool = True, seed: int = 0,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial (a [L, r, HD], b [L, r, HD or d]): a ~ U(+-1/sqrt(HD)) (PEFT's LoRA A init), b = 0.

    The edit is exactly zero at step 0 while the gradient w.r.t. b is not (standard LoRA init). a is drawn
    for every layer from `seed` and then masked, so an edit's init does not depend on the other layers.
    """
    if rank < 1:
        raise ConfigError(f"rank must be >= 1, got {rank}")
    L, H, D = sites.shape
    g = torch.Generator().manual_seed(int(seed))
    bound = 1.0 / math.sqrt(H * D)
    a = (torch.rand(L, rank, H * D, generator=g, dtype=torch.float64) * 2 - 1).float() * bound
    a_mask, b_mask = edit_masks(sites, heads, reparam)
    b = torch.zeros(L, rank, b_mask.shape[-1])
    return a * a_mask, b


class LoRAStack(nn.Module):
    """E independent edits on a common list of layers, with fixed masks.

    Parameters a: Float[Tensor, "edit layer rank head*head_dim"], b: Float[Tensor, "edit layer rank out"]
    (out = head*head_dim reparameterised, d_model plain), for `layers` (model layer indices). The forward
    hook on layer l's o_proj sees o: [E*B, T, HD] and adds, for copy e of the batch, <a_e, o> W b_e.
    """

    def __init__(self, sites: ModelSites, layers: Sequence[int], a: torch.Tensor, b: torch.Tensor,
                 a_mask: torch.Tensor, b_mask: torch.Tensor, reparam: bool = True, trainable: bool = True) -> None:
        super().__init__()
        self.sites = sites
        self.layers = [int(l) for l in layers]
        self.reparam = bool(reparam)
        E, Le = a.shape[:2]
        if Le != len(self.layers) or b.shape[:2] != (E, Le):
            raise ConfigError(f"LoRAStack: a {tuple(a.shape)} and b {tuple(b.shape)} do not match {Le} layers")
        self.register_buffer("a_mask", a_mask.to(torch.bool), persistent=False)
        self.register_buffer("b_mask", b_mask.to(torch.bool), persistent=False)
        a = (a * a_mask).float()
        b = (b * b_mask).float()
        # one parameter pair per edit, so each edit can have its own optimizer group (lr, clipping)
        self.a_params = nn.ParameterList([nn.Parameter(a[e].clone(), requires_grad=trainable) for e in range(E)])
        self.b_params = nn.ParameterList([nn.Parameter(b[e].clone(), requires_grad=trainable) for e in range(E)])
        # the edits whose copies a batch carries, in order (None: all): training drops the edits early stopping
        # has stopped, so their copies cost nothing for the rest of the pass
        self.active: list[int] | None = None

    @property
    def n_edits(self) -> int:
        return len(self.a_params)

    @property
    def n_active(self) -> int:
        """How many copies of a batch the attached stack expects: one per active edit."""
        return self.n_edits if self.active is None else len(self.active)

    def set_active(self, edits: Sequence[int] | None) -> None:
        """Route batch copies to these edits only (ascending, non-empty), or to all of them (None)."""
        if edits is not None:
            edits = [int(e) for e in edits]
            if not edits or edits != sorted(set(edits)) or edits[0] < 0 or edits[-1] >= self.n_edits:
                raise ConfigError(f"LoRAStack.set_active: {edits} is not an ascending, non-empty subset of "
                                  f"0..{self.n_edits - 1}")
            if len(edits) == self.n_edits:
                edits = None
        self.active = edits

    def edit_parameters(self, e: int) -> list[nn.Parameter]:
        return [self.a_params[e], self.b_params[e]]

    def _slot(self, params: nn.ParameterList, mask: torch.Tensor, i: int) -> torch.Tensor:
        """Float[Tensor, "edit rank dim"]: the masked parameters of every active edit at layer slot i."""
        if self.active is not None:
            return torch.stack([params[e][i] for e in self.active]) * mask[self.active, i]
        if len(params) == 1:
            return params[0][i].unsqueeze(0) * mask[:, i]
        return torch.stack([p[i] for p in params]) * mask[:, i]

    def effective(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(a * a_mask, b * b_mask) [E, Le, r, .]: masked entries are exactly zero and get zero gradient."""
        return torch.stack(list(self.a_params)) * self.a_mask, torch.stack(list(self.b_params)) * self.b_mask

    def write_vectors(self, i: int) -> torch.Tensor:
        """Float[Tensor, "edit rank d_model"]: what each rank component writes to the residual at layer slot i."""
        b_eff = self._slot(self.b_params, self.b_mask, i)
        if not self.reparam:
            return b_eff
        W = self.sites.weight(self.layers[i])  # [d, HD], frozen
        return torch.matmul(b_eff.to(W.dtype), W.t())

    def delta(self, i: int, o: torch.Tensor) -> torch.Tensor:
        """Float[Tensor, "E*B pos d_model"]: the edits' change of o_proj's output at layer slot i, for
        o: Float[Tensor, "E*B pos head*head_dim"] (copy e of the batch goes to active edit e)."""
        E = self.n_active
        if o.shape[0] % E:
            raise ConfigError(f"a stack of {E} active edits needs a batch replicated {E} times, got batch size "
                              f"{o.shape[0]}")
        x = o.reshape(E, -1, o.shape[-1])  # [E, B*T, HD]
        a_eff = self._slot(self.a_params, self.a_mask, i)  # [E, r, HD]
        z = torch.matmul(x, a_eff.to(x.dtype).transpose(1, 2))  # [E, B*T, r]
        wb = self.write_vectors(i).to(z.dtype)  # [E, r, d]
        return torch.matmul(z, wb).reshape(*o.shape[:-1], wb.shape[-1])

    @contextmanager
    def attached(self) -> Iterator["LoRAStack"]:
        """Add the edits' delta to each layer's o_proj output (models/hooks.py); removed on exit, also on error."""
        def make(i: int):
            def fn(o: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
                return out + self.delta(i, o).to(out.dtype)
            return fn

        with o_proj_hooks(self.sites, post={l: make(i) for i, l in enumerate(self.layers)}):
            yield self

    def edit_tensors(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Edit e as full-model tensors (a [L, r, HD], b [L, r, out]) with zero rows for untouched layers."""
        a_eff, b_eff = self.effective()
        L = self.sites.n_layers
        a = torch.zeros(L, *a_eff.shape[2:])
        b = torch.zeros(L, *b_eff.shape[2:])
        for i, l in enumerate(self.layers):
            a[l] = a_eff[e, i].detach().float().cpu()
            b[l] = b_eff[e, i].detach().float().cpu()
        return a, b


def build_stack(sites: ModelSites, heads_list: Sequence[HeadSet], rank: int = 1, reparam: bool = True,
                seeds: Sequence[int] | None = None, params: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
                trainable: bool = True) -> LoRAStack:
    """A stack of len(heads_list) edits on the union of their layers, initialised by `init_params`
    (seed per edit) or from given full-model tensors `params` [(a [L, r, HD], b [L, r, out]), ...]."""
    L, H, _ = sites.shape
    for hs in heads_list:
        hs.check(L, H)
        if len(hs) == 0:
            raise ConfigError(f"head set {hs.name!r} is empty: an edit needs at least one head")
    layers = sorted({l for hs in heads_list for l in hs.layers})
    seeds = list(seeds) if seeds is not None else [0] * len(heads_list)
    a_s, b_s, am_s, bm_s = [], [], [], []
    for e, hs in enumerate(heads_list):
        a_mask, b_mask = edit_masks(sites, hs, reparam)
        if params is not None:
            a, b = params[e]
        else:
            a, b = init_params(sites, hs, rank, reparam, seeds[e])
        a_s.append(a[layers])
        b_s.append(b[layers])
        am_s.append(a_mask[layers])
        bm_s.append(b_mask[layers])
    return LoRAStack(sites, layers, torch.stack(a_s), torch.stack(b_s), torch.stack(am_s), torch.stack(bm_s),
                     reparam, trainable)


@register_edit("lora")
class LoRAEdit(ExportMixin):
    """A trained optimal localized edit (Edit protocol, kind ``lora``).

    a: Float[Tensor, "layer rank head*head_dim"], b: Float[Tensor, "layer rank head*head_dim"] (reparameterised)
    or Float[Tensor, "layer rank d_model"] (plain); zero rows for layers outside the head set.
    """

    kind = "lora"

    def __init__(self, a: torch.Tensor, b: torch.Tensor, heads: HeadSet, reparam: bool = True,
                 meta: dict | None = None) -> None:
        if a.dim() != 3 or b.dim() != 3 or a.shape[:2] != b.shape[:2]:
            raise ConfigError(f"LoRAEdit: a {tuple(a.shape)} and b {tuple(b.shape)} must be [layer, rank, dim]")
        self.a = a.detach().float().cpu()
        self.b = b.detach().float().cpu()
        self.heads = heads
        self.reparam = bool(reparam)
        self.meta = dict(meta or {})

    @property
    def n_layers(self) -> int:
        return int(self.a.shape[0])

    @property
    def rank(self) -> int:
        return int(self.a.shape[1])

    def check(self, sites: ModelSites) -> None:
        """Raise unless the edit fits the model's shapes and is zero outside its head set."""
        L, H, D = sites.shape
        out = H * D if self.reparam else sites.d_model
        if tuple(self.a.shape) != (L, self.rank, H * D) or tuple(self.b.shape) != (L, self.rank, out):
            raise ConfigError(
                f"edit {self.heads.name!r} has a {tuple(self.a.shape)}, b {tuple(self.b.shape)}; the model needs "
                f"a [{L}, r, {H * D}], b [{L}, r, {out}] ({L} layers, {H} heads x {D})"
            )
        a_mask, b_mask = edit_masks(sites, self.heads, self.reparam)
        where = f"head set {self.heads.name!r} ({len(self.heads)} heads)"
        check_outside(f"LoRA a of edit {self.heads.name!r}", self.a, a_mask, where)
        check_outside(f"LoRA b of edit {self.heads.name!r}", self.b, b_mask, where)

    def verify(self, lm: LoadedModel | None = None) -> None:
        """Raise unless a and b are finite float [L, r, .] tensors bounded by MAX_EDIT_VALUE, zero on every layer
        outside the declared head set, and (with `lm`) of the model's shapes and zero outside the set's heads."""
        if not isinstance(self.heads, HeadSet):
            raise ConfigError(f"LoRA heads must be a HeadSet, got {type(self.heads).__name__}")
        if len(self.heads) == 0:
            raise DataError("LoRA edit declares no heads (an empty head set)")
        check_tensor("LoRA a", self.a, (None, None, None))
        check_tensor("LoRA b", self.b, (None, self.a.shape[1], None))
        if self.reparam and self.a.shape[2] != self.b.shape[2]:
            raise DataError(f"reparameterised LoRA: a {list(self.a.shape)} and b {list(self.b.shape)} must share "
                            "their last (heads*head_dim) size")
        if lm is not None:
            self.check(lm.sites)
            return
        L = self.n_layers
        on = torch.zeros(L, 1, 1, dtype=torch.bool)
        for l in self.heads.layers:
            if not 0 <= l < L:
                raise DataError(f"LoRA heads {self.heads.name!r} name layer {l}; the edit has {L} layers")
            on[l] = True
        where = f"declared layers {list(self.heads.layers)}"
        check_outside("LoRA a", self.a, on, where)
        check_outside("LoRA b", self.b, on, where)

    def stack(self, sites: ModelSites) -> LoRAStack:
        """A frozen one-edit stack of this edit, on the model's device."""
        self.check(sites)
        st = build_stack(sites, [self.heads], self.rank, self.reparam, params=[(self.a, self.b)], trainable=False)
        dev = sites.weight(0).device
        return st.to(dev)

    @contextmanager
    def applied(self, lm: LoadedModel) -> Iterator[None]:
        fp = self.meta.get("model", {}).get("fingerprint")
        if fp and fp != lm.fingerprint:
            log.warning("edit %s was trained on model fingerprint %s, applying it to %s (%s)",
                        self.heads.name, fp, lm.name, lm.fingerprint)
        st = self.stack(lm.sites)
        with st.attached():
            yield

    def write_vectors(self, sites: ModelSites, layer: int) -> torch.Tensor:
        """Float[Tensor, "rank d_model"]: W b_k (reparameterised) or b'_k (plain) at `layer`."""
        b = self.b[layer]
        if not self.reparam:
            return b
        W = sites.weight(layer).detach().float().cpu()
        return b @ W.t()

    # ------------------------------------------------------------------ export (edit/export.py)
    def edited_layers(self) -> list[int]:
        """Layers where the edit is non-zero (a stored edit has zero rows elsewhere)."""
        return [l for l in range(self.n_layers) if self.b[l].abs().sum() > 0 and self.a[l].abs().sum() > 0]

    def factors(self, lm: LoadedModel, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A Float[Tensor, "rank head*head_dim"], B Float[Tensor, "d_model rank"]) with delta W = B A at `layer`."""
        return self.a[layer].clone(), self.write_vectors(lm.sites, layer).t().contiguous()

    def merged_state(self, lm: LoadedModel) -> dict[str, torch.Tensor]:
        """`lm`'s state dict with the edit folded into o_proj's weight: W + sum_k (W b_k) a_k^T (reparameterised)
        or W + sum_k b'_k a_k^T (plain), in float64 then the weight's dtype (CPU copies where changed)."""
        from locaudit.edit.export import o_proj_names

        self.check(lm.sites)
        names = o_proj_names(lm)
        sd = dict(lm.model.state_dict())
        for l in self.edited_layers():
            A, B = self.factors(lm, l)
            key = f"{names[l]}.weight"
            w = sd[key]
            delta = B.double() @ A.double()  # [d, HD]
            if lm.sites.spec.conv1d:  # GPT-2 Conv1D stores [in, out]
                delta = delta.t()
            sd[key] = (w.detach().double().cpu() + delta).to(w.dtype)
        return sd

    def peft_config(self, lm: LoadedModel):
        """A PEFT LoRA adapter on the edited layers' o_proj: lora_A = a [r, H*D], lora_B = [W b_1 .. W b_r] [d, r]."""
        from locaudit.edit.export import PeftAdapter

        self.check(lm.sites)
        layers = self.edited_layers()
        tensors = {}
        for l in layers:
            A, B = self.factors(lm, l)
            tensors[l] = {"lora_A.weight": A.contiguous(), "lora_B.weight": B.contiguous()}
        return PeftAdapter(layers, self.rank, False, tensors)

    def adds_o_bias(self) -> bool:
        return False

    def describe(self) -> dict:
        keep = ("objective", "config", "model", "final")
        return {"kind": self.kind, "heads": self.heads.to_dict(), "rank": self.rank, "reparam": self.reparam,
                **{k: self.meta[k] for k in keep if k in self.meta}}

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> Path:
        """Write edit.safetensors (tensors a, b) and meta.json into folder `path` (atomically)."""
        meta = {**self.meta, "kind": self.kind, "heads": self.heads.to_dict(), "rank": self.rank,
                "reparam": self.reparam, "shape": {"a": list(self.a.shape), "b": list(self.b.shape)}}
        return save_edit_folder(path, WEIGHTS_FILE, {"a": self.a, "b": self.b}, meta)

    @classmethod
    def load(cls, path: str | Path, **overrides) -> "LoRAEdit":
        """Read a folder written by `save`. Overrides: none are meaningful; unknown names raise."""
        from safetensors.torch import load_file

        if overrides:
            raise ConfigError(f"LoRAEdit.load takes no overrides, got {sorted(overrides)}")
        path = require_files(path, (META_FILE, WEIGHTS_FILE), "a LoRA edit")
        meta_path, w_path = path / META_FILE, path / WEIGHTS_FILE
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            heads = HeadSet.from_dict(meta["heads"])
            reparam = bool(meta.get("reparam", True))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ConfigError) as e:
            raise DataError(f"{meta_path}: malformed meta.json ({type(e).__name__}: {str(e)[:200]}); "
                            "expected a JSON object with fields kind, heads, reparam") from None
        if meta.get("kind") != cls.kind:
            raise DataError(f"{meta_path}: kind is {meta.get('kind')!r}, expected 'lora'")
        from safetensors import SafetensorError

        try:
            tensors = load_file(str(w_path))
        except (SafetensorError, OSError, ValueError) as e:
            raise DataError(f"{w_path}: not a readable safetensors file ({str(e)[:200]})") from None
        if "a" not in tensors or "b" not in tensors:
            raise DataError(f"{w_path}: expected tensors 'a' and 'b', found {sorted(tensors)}")
        a, b = tensors["a"], tensors["b"]
        if a.dim() != 3 or b.dim() != 3 or a.shape[:2] != b.shape[:2]:
            raise DataError(f"{w_path}: tensors a {list(a.shape)} and b {list(b.shape)} must be [layers, rank, dim]")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise DataError(f"{w_path}: the edit has non-finite values (NaN/inf); it cannot be applied")
        return cls(a, b, heads, reparam, meta)
