"""ITI steering (Li et al. 2023): add alpha * sigma * u to chosen heads' outputs at every position.

Per chosen head (l, h): u = mean(o | label 1) - mean(o | label 0) over TRAIN examples (mass-mean shift),
or the probe weight; unit-normalised. sigma = std (ddof 0, as ITI's np.std) of the train activations
projected on u. theta_h = sigma * u, and theta^l = concat_h theta_h is zero outside the chosen heads.

The edit adds alpha * theta^l to layer l's o_proj INPUT at every position of every sequence (scoring
and generation alike; ITI's original code edited only the last position). Equivalently it adds
alpha * W^l theta^l to o_proj's bias (`baked`), which the tests use as an independent check.

Files: ``iti.safetensors`` (tensor ``theta``, float32, [L, H*D]) and ``meta.json``.
"""

from __future__ import annotations

import json
import math
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Literal, Mapping, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor, nn

from locaudit.edit.base import (MAX_EDIT_VALUE, ExportMixin, check_outside, check_tensor, register_edit,
                                require_files, save_edit_folder)
from locaudit.errors import ConfigError, DataError
from locaudit.heads import HeadSet
from locaudit.models.interventions import add
from locaudit.models.loading import LoadedModel

log = logging.getLogger(__name__)

Direction = Literal["mass_mean", "probe"]
DIRECTIONS = ("mass_mean", "probe")
THETA_FILE = "iti.safetensors"
META_FILE = "meta.json"


@runtime_checkable
class HeadActivations(Protocol):
    """What ITI is fitted from: an `ActivationSet` (localize/activations.py) or the same three fields.

    heads: Float[Tensor, "N layer head head_dim"]; examples: one mapping per row with `label` (0/1)
    and `split`; meta: the collection's meta (model name and fingerprint).
    """

    heads: Tensor
    examples: Sequence[Mapping[str, object]]
    meta: Mapping[str, object]


@runtime_checkable
class ProbeWeights(Protocol):
    """A trained probe (`ProbeResult`, localize/probe.py): weight Float[Tensor, "layer head head_dim"]."""

    weight: Tensor


def _field(example: Mapping[str, object], name: str) -> object:
    """An example record's field (examples.jsonl records are mappings)."""
    if not isinstance(example, Mapping):
        raise DataError(f"activation example {example!r} is a {type(example).__name__}, expected a mapping "
                        "with fields label and split")
    if name not in example:
        raise DataError(f"activation example {example!r} has no field {name!r}")
    return example[name]


def _model_of(acts: HeadActivations) -> dict:
    meta = acts.meta or {}
    model = meta.get("model", {}) if isinstance(meta, dict) else {}
    if isinstance(model, str):
        model = {"name": model}
    out = {"name": model.get("name", meta.get("model_name", "")),
           "fingerprint": model.get("fingerprint", meta.get("model_fingerprint", ""))}
    return {k: v for k, v in out.items() if v}


def _short(heads: HeadSet) -> str:
    text = heads.to_string()
    return f"{heads.name!r} ({len(heads)} heads)" if len(text) > 60 and heads.name else text


def mass_mean_directions(X: Tensor, y: Tensor) -> Tensor:
    """Float[Tensor, "n k d"], labels Long[Tensor, "n"] -> Float[Tensor, "k d"]: mean(true) - mean(false)."""
    pos, neg = y == 1, y == 0
    if not pos.any() or not neg.any():
        raise DataError(f"ITI needs train examples of both labels; got {int(pos.sum())} true and {int(neg.sum())} false")
    return X[pos].mean(0) - X[neg].mean(0)


def fit_iti(
    acts: HeadActivations,
    heads: HeadSet,
    direction: Direction = "mass_mean",
    probe: ProbeWeights | Tensor | None = None,
    split: str | Sequence[str] = "train",
    alpha: float = 1.0,
) -> "ITIEdit":
    """Fit ITI's theta on `heads` from an ActivationSet (`heads` Float[N, L, H, D], `examples` with label, split).

    `direction="probe"` uses `probe.weight` (a ProbeResult, Float[L, H, D]) instead of the mass-mean shift.
    Only examples whose split is in `split` are used for the direction and for sigma.
    """
    if direction not in DIRECTIONS:
        raise ConfigError(f"ITI direction {direction!r} is not one of {DIRECTIONS}")
    if not isinstance(acts, HeadActivations):
        raise ConfigError(f"fit_iti needs an ActivationSet (heads, examples, meta), got {type(acts).__name__}")
    if isinstance(heads, str):
        raise ConfigError(f"fit_iti: heads {heads!r} is a string; parse it first (HeadSet.parse or locaudit.api.fit_iti)")
    X_all: Tensor = acts.heads
    if X_all.dim() != 4:
        raise DataError(f"activations must be [N, L, H, D]; got shape {tuple(X_all.shape)}")
    N, L, H, D = X_all.shape
    if len(acts.examples) != N:
        raise DataError(f"activation set has {N} rows but {len(acts.examples)} examples")
    heads.check(L, H)
    if len(heads) == 0:
        raise ConfigError("ITI needs at least one head")
    splits = {split} if isinstance(split, str) else set(split)
    idx = [i for i, ex in enumerate(acts.examples) if _field(ex, "split") in splits]
    if not idx:
        raise DataError(f"no activation examples in split(s) {sorted(splits)}")
    labels = torch.tensor([int(_field(acts.examples[i], "label")) for i in idx])
    ls = torch.tensor([l for l, _ in heads.heads])
    hs = torch.tensor([h for _, h in heads.heads])
    X = X_all[:, ls, hs, :][torch.tensor(idx)].double()  # [n, K, D]: chosen heads first (memory-mapped input)
    if not torch.isfinite(X).all():
        row = idx[int(torch.nonzero(~torch.isfinite(X).flatten(1).all(1))[0])]
        where = f"{acts.path}" if getattr(acts, "path", None) is not None else "the activation set"
        raise DataError(f"{where}: non-finite activations (NaN/inf) at example {row} on the edited heads; "
                        "collect them again (fp32)")

    if direction == "mass_mean":
        u = mass_mean_directions(X, labels)
    else:
        if probe is None:
            raise ConfigError("direction='probe' needs a probe (a ProbeResult with weight [L, H, D])")
        W = torch.as_tensor(probe.weight if isinstance(probe, ProbeWeights) else probe)
        if tuple(W.shape) != (L, H, D):
            raise DataError(f"probe weight has shape {tuple(W.shape)}, activations need {(L, H, D)}")
        u = W[ls, hs, :].double()
    norms = u.norm(dim=-1, keepdim=True)
    if (norms == 0).any():
        bad = [heads.heads[i] for i in torch.nonzero(norms.squeeze(-1) == 0).flatten().tolist()]
        raise DataError(f"ITI direction is zero at heads {bad}: no signal to steer along")
    u = u / norms
    proj = torch.einsum("nkd,kd->nk", X, u)
    sigma = proj.std(0, unbiased=False)  # [K]
    theta = torch.zeros(L, H, D, dtype=torch.float64)
    theta[ls, hs, :] = sigma[:, None] * u
    return ITIEdit(theta.reshape(L, H * D).float(), alpha=alpha, heads=heads, direction=direction,
                   model=_model_of(acts), n_heads=H)


@register_edit("iti")
class ITIEdit(ExportMixin):
    """theta Float[Tensor, "layer head*head_dim"] added (times alpha) to o_proj's input at every position."""

    kind = "iti"

    def __init__(
        self,
        theta: Tensor,
        alpha: float = 1.0,
        heads: HeadSet | None = None,
        direction: str = "mass_mean",
        model: dict | str | None = None,
        n_heads: int | None = None,
    ) -> None:
        if theta.dim() != 2:
            raise ConfigError(f"ITI theta must be [L, H*D]; got shape {tuple(theta.shape)}")
        self.theta = theta.detach().float().cpu().contiguous()
        self.alpha = float(alpha)
        if not math.isfinite(self.alpha):
            raise ConfigError(f"ITI alpha must be a finite number, got {alpha!r}")
        self.direction = direction
        self.model = {"name": model} if isinstance(model, str) else dict(model or {})
        self.n_heads = n_heads  # needed only to recover the head set from theta
        if heads is None:
            heads = self._heads_from_theta()
        self.heads = heads

    def _heads_from_theta(self) -> HeadSet:
        if self.n_heads is None:
            layers = torch.nonzero(self.theta.abs().sum(1) > 0).flatten().tolist()
            return HeadSet((), name=f"layers{layers}") if layers else HeadSet((), name="none")
        L, HD = self.theta.shape
        nz = self.theta.reshape(L, self.n_heads, HD // self.n_heads).abs().sum(-1) > 0
        return HeadSet.from_heads(torch.nonzero(nz).tolist())

    # ------------------------------------------------------------------ variants
    def with_alpha(self, alpha: float) -> "ITIEdit":
        """The same directions at another strength (theta is shared, not copied)."""
        new = ITIEdit.__new__(ITIEdit)
        new.__dict__.update(self.__dict__)
        new.alpha = float(alpha)
        return new

    def describe(self) -> dict:
        return {"kind": self.kind, "heads": self.heads.name, "n_edit_heads": len(self.heads),
                "alpha": self.alpha, "direction": self.direction, "model": self.model.get("name", "")}

    def __repr__(self) -> str:
        return f"ITIEdit(heads={self.heads.name!r}, alpha={self.alpha}, direction={self.direction!r})"

    # ------------------------------------------------------------------ verification
    def verify(self, lm: LoadedModel | None = None) -> None:
        """Raise unless theta is a finite float [L, H*D] matrix with |alpha * theta| <= MAX_EDIT_VALUE that is
        zero outside the declared heads (every layer outside them; with `lm` or a recorded `n_heads`, every
        head outside them too), and, with `lm`, of the model's shape."""
        if not math.isfinite(self.alpha):
            raise ConfigError(f"ITI alpha must be a finite number, got {self.alpha!r}")
        check_tensor("ITI theta", self.theta, (None, None))
        if self.alpha:
            check_tensor(f"ITI alpha * theta (alpha={self.alpha:g})", self.theta, scale=self.alpha)
        L, HD = self.theta.shape
        H = lm.sites.n_heads if lm is not None else self.n_heads
        if lm is not None:
            self._check(lm)
        if not isinstance(self.heads, HeadSet):
            raise ConfigError(f"ITI heads must be a HeadSet, got {type(self.heads).__name__}")
        if not self.heads.heads:  # a set recovered from theta without n_heads: it names layers only
            return
        if H is not None:
            if int(H) < 1 or HD % int(H):
                raise DataError(f"ITI theta has {HD} columns, not a multiple of n_heads={H}")
            H = int(H)
            self.heads.check(L, H)
            check_outside("ITI theta", self.theta, self.heads.dim_mask(L, H, HD // H),
                          f"declared heads {_short(self.heads)}")
        else:
            layers = torch.zeros(L, 1, dtype=torch.bool)
            for l in self.heads.layers:
                if not 0 <= l < L:
                    raise DataError(f"ITI heads {_short(self.heads)} name layer {l}; theta has {L} layers")
                layers[l] = True
            check_outside("ITI theta", self.theta, layers, f"declared layers {sorted(self.heads.layers)}")

    # ------------------------------------------------------------------ application
    def _check(self, lm: LoadedModel) -> None:
        L, H, D = lm.sites.shape
        if tuple(self.theta.shape) != (L, H * D):
            raise ConfigError(
                f"ITI edit theta has shape {tuple(self.theta.shape)} but model {lm.name!r} needs {(L, H * D)}"
            )
        fp = self.model.get("fingerprint")
        if fp and fp != lm.fingerprint:
            log.warning("ITI edit was fitted on model fingerprint %s, applying to %s (%s)", fp, lm.fingerprint, lm.name)

    def _active_layers(self) -> list[int]:
        if self.alpha == 0.0:
            return []
        return torch.nonzero(self.theta.abs().sum(1) > 0).flatten().tolist()

    def shift(self, layer: int, device=None, dtype=None) -> Tensor:
        """Float[Tensor, "head*head_dim"]: alpha * theta^l, the vector added to o_proj's input."""
        return (self.alpha * self.theta[layer]).to(device=device, dtype=dtype)

    # ------------------------------------------------------------------ export (edit/export.py)
    def o_bias(self, lm: LoadedModel, layer: int) -> Tensor:
        """Float[Tensor, "d_model"]: alpha * W^l theta^l, what the edit adds to o_proj's output at `layer` (float64)."""
        W = lm.sites.weight(layer).detach().double().cpu()
        return W @ self.shift(layer, "cpu", torch.float64)

    def adds_o_bias(self) -> bool:
        return bool(self._active_layers())

    def merged_state(self, lm: LoadedModel) -> dict[str, Tensor]:
        """`lm`'s state dict with the edit as o_proj biases (keys '<o_proj>.bias' added where the model has none;
        the saved config must declare them: edit/export.bias_config)."""
        from locaudit.edit.export import o_proj_names

        self._check(lm)
        names = o_proj_names(lm)
        sd = dict(lm.model.state_dict())
        for l in self._active_layers():
            key = f"{names[l]}.bias"
            old = sd.get(key)
            base = old.detach().double().cpu() if old is not None else torch.zeros(lm.sites.d_model, dtype=torch.float64)
            sd[key] = (base + self.o_bias(lm, l)).to(lm.dtype)
        return sd

    def peft_config(self, lm: LoadedModel):
        """A rank-1 PEFT adapter per edited layer whose only non-zero part is lora_B's bias (alpha W theta)."""
        from locaudit.edit.export import PeftAdapter

        self._check(lm)
        HD, d = lm.sites.n_heads * lm.sites.head_dim, lm.sites.d_model
        layers = self._active_layers()
        tensors = {l: {"lora_A.weight": torch.zeros(1, HD), "lora_B.weight": torch.zeros(d, 1),
                       "lora_B.bias": self.o_bias(lm, l).float()} for l in layers}
        return PeftAdapter(layers, 1, True, tensors)

    @contextmanager
    def applied(self, lm: LoadedModel) -> Iterator[None]:
        """Add alpha * theta^l to layer l's o_proj input (the heads site) at every position; hooks removed on exit."""
        self._check(lm)
        deltas = {}
        for l in self._active_layers():
            w = lm.sites.o_proj(l).weight
            deltas[l] = self.shift(l, w.device, w.dtype)  # Float[Tensor, "head*head_dim"]
        with add(lm.sites, "heads", deltas):
            yield

    @contextmanager
    def baked(self, lm: LoadedModel) -> Iterator[None]:
        """Add alpha * W^l theta^l to o_proj's bias (a bias is created where absent); restored exactly on exit.

        While baked, the model's config declares the bias (the family's `attention_bias` option, with zero
        q/k/v biases where it adds them), so `save_pretrained` inside the block writes a model that reloads
        edited. Families whose config cannot declare it (mistral, qwen2, unknown ones) refuse
        `save_pretrained` inside the block instead; `locaudit.edit.export.export_merged` exports them.
        """
        from locaudit.edit.export import declare_biases, refuse_save, undeclare_biases

        self._check(lm)
        active = self._active_layers()
        added, old = declare_biases(lm) if active else ([], {})
        refused = bool(active) and old is None
        saved: list[tuple[nn.Module, Tensor | None, bool]] = []
        try:
            if refused:
                lm.model.save_pretrained = refuse_save  # instance attribute, removed on exit
            for l in active:
                op = lm.sites.o_proj(l)
                W = lm.sites.weight(l)  # [d, HD]
                delta = W.double() @ self.shift(l, W.device, torch.float64)
                bias = getattr(op, "bias", None)
                registered = "bias" in op._parameters
                saved.append((op, None if bias is None else bias.detach().clone(), registered))
                if bias is None:
                    new = nn.Parameter(delta.to(W.dtype), requires_grad=False)
                    if registered:
                        op.bias = new
                    else:
                        op.register_parameter("bias", new)
                else:
                    with torch.no_grad():
                        bias.copy_((bias.double() + delta).to(bias.dtype))
            yield
        finally:
            for op, orig, registered in reversed(saved):
                if orig is None:
                    if registered:
                        op.register_parameter("bias", None)
                    else:
                        del op._parameters["bias"]
                else:
                    with torch.no_grad():
                        op.bias.copy_(orig)
            undeclare_biases(lm, added, old)
            if refused:
                lm.model.__dict__.pop("save_pretrained", None)

    # ------------------------------------------------------------------ files
    def save(self, out_dir: str | Path) -> Path:
        """Write ``iti.safetensors`` (tensor ``theta`` [L, H*D]) and ``meta.json`` into `out_dir`."""
        meta = {"kind": self.kind, "model": self.model, "heads": self.heads.to_dict(), "alpha": self.alpha,
                "direction": self.direction, "shape": list(self.theta.shape), "n_heads": self.n_heads}
        return save_edit_folder(out_dir, THETA_FILE, {"theta": self.theta}, meta)

    @classmethod
    def load(cls, path: str | Path, alpha: float | None = None) -> "ITIEdit":
        """Read a folder written by `save`; `alpha` overrides the saved strength."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = require_files(path, (META_FILE, THETA_FILE), "an ITI edit")
        meta_path, theta_path = path / META_FILE, path / THETA_FILE
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{meta_path}: not valid JSON ({e})") from e
        if not isinstance(meta, dict):
            raise ConfigError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
        if meta.get("kind") != "iti":
            raise ConfigError(f"{meta_path}: field 'kind' is {meta.get('kind')!r}, expected 'iti'")
        try:
            theta = load_file(str(theta_path))["theta"]
        except (KeyError, SafetensorError, OSError, ValueError) as e:
            raise ConfigError(f"{theta_path}: expected a safetensors file with tensor 'theta' ({e})") from e
        if theta.dim() != 2 or not torch.isfinite(theta).all():
            raise ConfigError(f"{theta_path}: tensor 'theta' must be a finite [layers, heads*head_dim] matrix "
                              f"(shape {list(theta.shape)})")
        heads = HeadSet.from_dict(meta["heads"]) if "heads" in meta else None
        return cls(theta, alpha=meta.get("alpha", 1.0) if alpha is None else alpha, heads=heads,
                   direction=meta.get("direction", "mass_mean"), model=meta.get("model"),
                   n_heads=meta.get("n_heads"))
