"""What every part of a study file's schema shares: the strict base model, the seed type, the localizer
groups, the check of fields a study passes on to a library config, and a bounded repr for error messages."""

from __future__ import annotations

import reprlib
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

Group = Literal["top", "random", "single", "all"]
GROUPS: tuple[str, ...] = ("top", "random", "single", "all")


def check_config_fields(config_cls: type[BaseModel], fields: dict[str, Any], owned: set[str], owner: str, what: str,
                        known: set[str] | None = None) -> None:
    """Fields a study passes to a library config (`config_cls`): none that the study sets itself (`owned`,
    by `owner`), none unknown, and valid for the config; a ValueError names them."""
    clash = sorted(owned & set(fields))
    if clash:
        raise ValueError(f"{clash} are set by {owner}, not here")
    unknown = sorted(set(fields) - set(config_cls.model_fields))
    if unknown:
        raise ValueError(f"unknown {what}(s) {unknown}; known: {sorted(known or config_cls.model_fields)}")
    try:
        config_cls(**fields)
    except ValidationError as e:
        raise ValueError("; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())) from None


# a seed is a 32-bit unsigned integer: numpy's generators refuse negative seeds, and TrainConfig, PatchingConfig
# and tracing derive torch generator seeds as seed * 1_000_003 + index, which must fit in 64 bits
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # every number is finite


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 2, 4, 4, 4, 4
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 60, 40, 40


def bounded_repr(value: Any, limit: int = 80) -> str:
    """repr of a value in bounded time and length (a deep or shared structure is never fully walked)."""
    shown = _REPR.repr(value)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."
