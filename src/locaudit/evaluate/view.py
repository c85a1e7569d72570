"""The edited model view: the one way every metric runs the model with an edit (none, ITI, optimal).

`edited(lm, edit)` applies the edit at every position for the whole block (scoring and generation
alike), turns off gradients and runs at the given precision (models/precision.py); the model is restored on exit, also on
error, because restoring is the edit's own context manager's job (edit/base.py).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterator

import torch

from locaudit.edit.base import Edit, NoEdit
from locaudit.errors import ConfigError
from locaudit.models.loading import LoadedModel
from locaudit.models.precision import ResolvedPrecision, require_resolved


def as_edit(edit: Edit | None) -> Edit:
    """`None` means the unedited model; anything else must follow the Edit protocol."""
    if edit is None:
        return NoEdit()
    if not hasattr(edit, "applied") or not hasattr(edit, "describe"):
        raise ConfigError(f"{edit!r} is not an edit: it needs applied(lm) and describe() (edit/base.py)")
    return edit


def describe(edit: Edit | None) -> dict:
    return as_edit(edit).describe()


@contextmanager
def edited(lm: LoadedModel, edit: Edit | None = None, *, precision: ResolvedPrecision) -> Iterator[LoadedModel]:
    """Run the block with `edit` applied at every position, without gradients, at `precision`.

    `precision`: the job's ResolvedPrecision (models/precision.py), resolved where the job started; its
    `compute` context runs the block (autocast, and bf16 copies of the frozen weights in that form).
    Log-softmax and reductions stay in fp32 in every metric.
    """
    prec = require_resolved(precision, "view")
    with ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(prec.compute(lm.model, lm.dtype))
        stack.enter_context(as_edit(edit).applied(lm))
        yield lm
