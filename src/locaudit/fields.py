"""A config's field set from elsewhere (a study spec, a command line), taken from the config itself.

The study spec (study/spec.py) and `locaudit edit` (cli/edit.py) set some TrainConfig and EvalConfig fields under
the same names. `from_config` gives such a field the config's own type, default, constraints and description, so
that each is written once, in the config; cli/options.config_option does the same for a command-line option.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo


def sentence(text: str | None) -> str:
    """`text` with a capital first letter and a final full stop (config descriptions are written both ways)."""
    t = (text or "").strip()
    if not t:
        return ""
    t = t[0].upper() + t[1:]
    return t if t.endswith(".") else t + "."


def config_field(config: type[BaseModel], name: str) -> FieldInfo:
    """`config`'s field `name`; a KeyError names the config and its fields where it has none."""
    try:
        return config.model_fields[name]
    except KeyError:
        raise KeyError(f"{config.__name__} has no field {name!r}; its fields: {sorted(config.model_fields)}") from None


def described(config: type[BaseModel], name: str, note: str = "") -> str:
    """The field's description as a sentence, then `note` (what the restating place adds, e.g. 'speed only')."""
    return " ".join(x for x in (sentence(config_field(config, name).description), note.strip()) if x)


def from_config(config: type[BaseModel], name: str, note: str = "") -> Any:
    """The annotation of a model field that restates `config`'s field `name`: Annotated[its type, a copy of its
    FieldInfo] (default or default factory, constraints) described by `described(config, name, note)`."""
    fi = config_field(config, name)
    return Annotated[fi.annotation, FieldInfo.merge_field_infos(fi, description=described(config, name, note))]


__all__ = ["sentence", "config_field", "described", "from_config"]
