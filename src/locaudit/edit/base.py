"""What every edit is: something that can be applied to a loaded model inside a `with` block.

Kinds: ``none`` (the unedited model), ``iti`` (edit/iti.py: alpha * theta added to head outputs),
``lora`` (edit/lora.py: the optimal localized edit, <a, o> W b). Evaluation only uses this protocol,
so every metric scores every kind of edit the same way, at every position.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import ContextManager, Iterator, Protocol, runtime_checkable

from locaudit.errors import ConfigError
from locaudit.models.loading import LoadedModel


@runtime_checkable
class Edit(Protocol):
    kind: str

    def applied(self, lm: LoadedModel) -> ContextManager[None]:
        """Apply the edit to `lm` for the duration of the block; the model is restored on exit."""

    def describe(self) -> dict:
        """A JSON-able description (kind, head set, hyper-parameters) for results and ledgers."""


class NoEdit:
    """The unedited model."""

    kind = "none"

    @contextmanager
    def applied(self, lm: LoadedModel) -> Iterator[None]:
        yield

    def describe(self) -> dict:
        return {"kind": "none"}


def load_edit(path: str | Path, **overrides) -> Edit:
    """Load a saved edit folder (ITI or optimal) by the `kind` in its meta.json."""
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.exists():
        raise ConfigError(f"{path} is not an edit folder: {meta_path} is missing")
    try:
        kind = json.loads(meta_path.read_text(encoding="utf-8"))["kind"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"{meta_path}: malformed meta.json, expected a JSON object with field 'kind'") from e
    if kind == "iti":
        from locaudit.edit.iti import ITIEdit

        return ITIEdit.load(path, **overrides)
    if kind == "lora":
        from locaudit.edit.lora import LoRAEdit

        return LoRAEdit.load(path, **overrides)
    raise ConfigError(f"{meta_path}: unknown edit kind {kind!r} (expected 'iti' or 'lora')")
