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

import importlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, ClassVar, ContextManager, Iterator, Literal, Protocol, TypeVar, runtime_checkable

from locaudit.errors import ConfigError
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


E = TypeVar("E")
EDIT_KINDS: dict[str, type] = {}
# modules whose import registers the built-in kinds (imported on the first `load_edit` / `edit_kinds`)
BUILTIN_MODULES: tuple[str, ...] = ("locaudit.edit.iti", "locaudit.edit.lora")


def register_edit(kind: str) -> Callable[[type[E]], type[E]]:
    """Class decorator: register an edit class under `kind` (its `kind` attribute is set to it).

    The class needs `applied`, `describe`, `save` and a classmethod `load(path, **overrides)`.
    """
    def deco(cls: type[E]) -> type[E]:
        for name in ("applied", "describe", "save", "load"):
            if not callable(getattr(cls, name, None)):
                raise TypeError(f"edit kind {kind!r}: {cls.__name__} has no method {name}()")
        prev = EDIT_KINDS.get(kind)
        if prev is not None and prev.__qualname__ != cls.__qualname__:
            raise ConfigError(f"edit kind {kind!r} is already registered by {prev.__module__}.{prev.__qualname__}")
        cls.kind = kind  # type: ignore[attr-defined]
        EDIT_KINDS[kind] = cls
        return cls
    return deco


def edit_kinds() -> dict[str, type]:
    """Every registered edit kind, built-ins included: {kind: class}."""
    for mod in BUILTIN_MODULES:
        importlib.import_module(mod)
    return dict(EDIT_KINDS)


class ExportMixin:
    """`export(lm, out, format)` for edit classes, delegating to edit/export.py."""

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
