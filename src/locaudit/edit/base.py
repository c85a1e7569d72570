"""What every edit is, and the registry of edit kinds.

An edit is applied to a loaded model inside a `with` block (the model is restored on exit, also on
error), describes itself, saves to and loads from a folder (``meta.json`` with its ``kind`` + tensors),
and exports itself as a merged HF model or a PEFT adapter (edit/export.py). Evaluation only uses this
protocol, so every metric scores every kind of edit the same way, at every position.

Kinds register themselves with `@register_edit` (``none`` here, ``iti`` in edit/iti.py, ``lora`` in
edit/lora.py); `load_edit(folder)` reads ``meta.json``'s kind and calls that class's `load`. A new
kind is one class with the methods of `Edit` and the decorator, in a module listed in `BUILTIN_MODULES`
(or imported before `load_edit` is called).
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, ClassVar, ContextManager, Iterator, Literal, Protocol, TypeVar, runtime_checkable

from locaudit.errors import ConfigError, DataError
from locaudit.io import write_json_atomic
from locaudit.models.loading import LoadedModel

ExportFormat = Literal["merged", "peft"]
EXPORT_FORMATS: tuple[str, ...] = ("merged", "peft")
META_FILE = "meta.json"


@runtime_checkable
class Edit(Protocol):
    kind: str

    def applied(self, lm: LoadedModel) -> ContextManager[None]:
        """Apply the edit to `lm` for the duration of the block; the model is restored on exit."""

    def describe(self) -> dict:
        """A JSON-able description (kind, head set, hyper-parameters) for results and ledgers."""

    def save(self, path: str | os.PathLike) -> Path:
        """Write the edit into folder `path` (meta.json with `kind`, plus its tensors), atomically."""

    def export(self, lm: LoadedModel, out: str | os.PathLike, format: ExportFormat = "merged",
               overwrite: bool = False) -> Path:
        """Write `lm` with the edit folded in (merged HF folder) or as a PEFT adapter (edit/export.py)."""

    def verify(self, lm: LoadedModel | None = None) -> None:
        """Raise (ConfigError / DataError naming the tensor and value) unless the edit is what it declares:
        its parameters act only at its declared heads or layers, and their shapes, dtypes and values are
        finite and bounded (|value| <= MAX_EDIT_VALUE). With `lm`, also that they fit the model's shapes.
        The registry calls it before `applied`, `export` and `save`, and after `load`."""


# the largest |parameter| (or |alpha * theta|) an edit may carry: float16's largest finite value. Beyond it
# the edit itself is inf in an fp16 run, so it is an overflow, not an edit, on any precision a study may resume
# on. It rejects no legitimate edit: ITI's theta is sigma * u (u a unit direction, sigma a head's activation
# std along it), so even the largest alpha a study or the CLI accepts (1000, cli/options.MAX_ALPHA) passes
# unless sigma * |u_i| > 65; trained parameters move about lr per Adam step and training already fails them as
# diverged at 1e4 (edit/train.py MAX_EDIT_ABS). (It was 1e4, which refused in-range alphas on heads with
# sigma > 10.)
MAX_EDIT_VALUE = 65504.0


def check_tensor(name: str, t, shape: tuple | None = None, bound: float = MAX_EDIT_VALUE, scale: float = 1.0) -> None:
    """Raise DataError unless tensor `t` (named `name`, e.g. 'ITI theta') is floating point, has `shape`
    (None entries: any size), is finite, and has |scale * value| <= bound."""
    import torch

    if not isinstance(t, torch.Tensor):
        raise DataError(f"{name} is a {type(t).__name__}, expected a tensor")
    if not t.is_floating_point():
        raise DataError(f"{name} has dtype {t.dtype}, expected a floating-point tensor")
    if shape is not None and (t.dim() != len(shape)
                              or any(w is not None and int(n) != int(w) for n, w in zip(t.shape, shape))):
        raise DataError(f"{name} has shape {list(t.shape)}, expected {['*' if w is None else w for w in shape]}")
    if t.numel() == 0:
        return
    if not bool(torch.isfinite(t).all()):
        raise DataError(f"{name} has non-finite values (NaN/inf)")
    big = float(t.detach().abs().max()) * abs(float(scale))
    if not math.isfinite(big) or big > bound:
        what = f"|{scale:g} * value|" if scale != 1.0 else "|value|"
        raise DataError(f"{name}: largest {what} is {big:.3g}, above the bound {bound:g} of an edit "
                        "(an overflow, not an edit)")


def check_outside(name: str, t, inside, where: str) -> None:
    """Raise DataError unless tensor `t` is exactly zero wherever the Bool mask `inside` (broadcastable) is False;
    `where` names what was declared (e.g. "head set 'top2' (2 heads)")."""
    import torch

    outside = t.detach() * (~inside.to(torch.bool)).to(t.dtype)
    if bool((outside != 0).any()):
        idx = [int(i) for i in torch.nonzero(outside)[0].tolist()]
        raise DataError(f"{name} is non-zero outside its {where} (first at index {idx}, value "
                        f"{float(t.detach()[tuple(idx)]):.3g}): the edit would act where it does not declare")


E = TypeVar("E")
EDIT_KINDS: dict[str, type] = {}
# modules whose import registers the built-in kinds (imported on the first `load_edit` / `edit_kinds`)
BUILTIN_MODULES: tuple[str, ...] = ("locaudit.edit.iti", "locaudit.edit.lora")


def register_edit(kind: str) -> Callable[[type[E]], type[E]]:
    """Class decorator: register an edit class under `kind` (its `kind` attribute is set to it).

    The class needs `applied`, `describe`, `save`, `verify(lm=None)` and a classmethod `load(path, **overrides)`.
    The registry wraps them so that no kind can skip verification: `applied(lm)`, `save(path)` and
    `export(lm, ...)` call `verify` first, and `load` verifies what it read (naming the folder).
    """
    def deco(cls: type[E]) -> type[E]:
        for name in ("applied", "describe", "save", "load", "verify"):
            if not callable(getattr(cls, name, None)):
                raise TypeError(f"edit kind {kind!r}: {cls.__name__} has no method {name}()")
        prev = EDIT_KINDS.get(kind)
        if prev is not None and prev.__qualname__ != cls.__qualname__:
            raise ConfigError(f"edit kind {kind!r} is already registered by {prev.__module__}.{prev.__qualname__}")
        cls.kind = kind  # type: ignore[attr-defined]
        _guard(cls)
        EDIT_KINDS[kind] = cls
        return cls
    return deco


def _verified_first(fn: Callable, with_lm: bool) -> Callable:
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        lm = (args[0] if args else kwargs.get("lm")) if with_lm else None
        self.verify(lm)
        return fn(self, *args, **kwargs)
    wrapper._verifies = True  # type: ignore[attr-defined]
    return wrapper


def _guard(cls: type) -> None:
    """Wrap a registered class's applied / save / export (verify first) and load (verify after)."""
    for name, with_lm in (("applied", True), ("save", False), ("export", True)):
        fn = getattr(cls, name, None)
        if callable(fn) and not getattr(fn, "_verifies", False):
            setattr(cls, name, _verified_first(fn, with_lm))
    load = getattr(cls, "load")
    func = getattr(load, "__func__", None)
    if func is not None and not getattr(func, "_verifies", False):
        @functools.wraps(func)
        def loaded(klass, path, *args, **kwargs):
            edit = func(klass, path, *args, **kwargs)
            try:
                edit.verify(None)
            except (ConfigError, DataError) as e:
                raise type(e)(f"{path}: {e}") from None
            return edit
        loaded._verifies = True  # type: ignore[attr-defined]
        cls.load = classmethod(loaded)  # type: ignore[attr-defined]


def verify_edit(edit, lm: LoadedModel | None = None) -> None:
    """`edit.verify(lm)`, for code that receives an edit from outside the registry (exports, evaluation);
    an object without `verify` is refused: it is not a registered edit kind."""
    fn = getattr(edit, "verify", None)
    if not callable(fn):
        raise ConfigError(f"{type(edit).__name__} has no verify(): not an edit of a registered kind")
    fn(lm)


def edit_kinds() -> dict[str, type]:
    """Every registered edit kind, built-ins included: {kind: class}."""
    for mod in BUILTIN_MODULES:
        importlib.import_module(mod)
    return dict(EDIT_KINDS)


class ExportMixin:
    """`export(lm, out, format)` for edit classes, delegating to edit/export.py, and the export methods every kind
    owns, here the unedited model's (no change; no adapter form): a kind that changes the model overrides them."""

    def merged_state(self, lm: LoadedModel) -> dict:
        """The model's state dict with this edit folded in (here: the model as it is)."""
        return dict(lm.model.state_dict())

    def peft_config(self, lm: LoadedModel):
        """This edit as a PEFT adapter on o_proj (edit/export.PeftAdapter), or None where it has no adapter form."""
        return None

    def adds_o_bias(self) -> bool:
        """Whether the merged model needs an o_proj bias the family may not declare (edit/export.bias_config)."""
        return False

    def export(self, lm: LoadedModel, out: str | os.PathLike, format: ExportFormat = "merged",
               overwrite: bool = False, **kwargs) -> Path:
        """Merged HF folder (`format="merged"`, reloads with AutoModelForCausalLM) or PEFT adapter ("peft")."""
        from locaudit.edit import export as ex

        if format == "merged":
            return ex.export_merged(self, lm, out, overwrite, **kwargs)
        if format == "peft":
            return ex.export_peft(self, lm, out, overwrite, **kwargs)
        raise ConfigError(f"export format {format!r} is not one of {EXPORT_FORMATS}")


@register_edit("none")
class NoEdit(ExportMixin):
    """The unedited model."""

    kind: ClassVar[str] = "none"

    @contextmanager
    def applied(self, lm: LoadedModel) -> Iterator[None]:
        yield

    def describe(self) -> dict:
        return {"kind": "none"}

    def verify(self, lm: LoadedModel | None = None) -> None:
        """Nothing to check: the unedited model has no parameters."""

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path / META_FILE, {"kind": "none"})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, **overrides) -> "NoEdit":
        if overrides:
            raise ConfigError(f"a 'none' edit takes no overrides, got {sorted(overrides)}")
        return cls()


def read_kind(path: str | os.PathLike) -> str:
    """The `kind` recorded in an edit folder's meta.json (ConfigError naming the file otherwise)."""
    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.exists():
        raise ConfigError(f"{path} is not an edit folder: {meta_path} is missing")
    try:
        kind = json.loads(meta_path.read_text(encoding="utf-8"))["kind"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"{meta_path}: malformed meta.json, expected a JSON object with field 'kind'") from e
    return str(kind)


def load_edit(path: str | os.PathLike, **overrides) -> Edit:
    """Load a saved edit folder by the `kind` in its meta.json (any registered kind)."""
    kind = read_kind(path)
    kinds = edit_kinds()
    if kind not in kinds:
        raise ConfigError(f"{Path(path) / META_FILE}: unknown edit kind {kind!r} "
                          f"(registered: {', '.join(repr(k) for k in sorted(kinds))})")
    return kinds[kind].load(path, **overrides)


def require_files(path: str | os.PathLike, names: tuple[str, ...], what: str) -> Path:
    """The folder `path`, or ConfigError naming the first of `names` missing from it (`what`: e.g. 'ITI edit')."""
    path = Path(path)
    for name in names:
        if not (path / name).exists():
            raise ConfigError(f"{path} is not {what} folder: {name} is missing")
    return path


def save_edit_folder(path: str | os.PathLike, tensor_file: str, tensors: dict, meta: dict) -> Path:
    """Write `tensors` (safetensors) then meta.json (it marks a complete folder) into `path`, atomically."""
    from safetensors.torch import save_file

    from locaudit.io import atomic_path

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with atomic_path(path / tensor_file) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    write_json_atomic(path / META_FILE, meta)
    return path
