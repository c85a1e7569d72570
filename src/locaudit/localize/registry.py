"""Causal localizers by name: each ranks every attention head of a model for a behaviour from its preference pairs.

A causal localizer is a function `fn(lm, pairs, config, *, precision, progress) -> HeadEffects` (pairs already
selected by `config.max_pairs` / `config.pair_seed`) with a pydantic config class: `PatchingConfig`
(localize/corruptions.py: corruption, noise, positions, max_pairs, ...) or a subclass of it adding options. `localize_heads` (localize/causal.py)
runs the one named, caches its result and checks it is finite; the CLI's `locaudit localize --method NAME`, a
study's `localizers.causal.NAME` and the location language (`NAME:top16`) all read this table.

Adding one: put the function in its own module under localize/ and add one line to `BUILTIN` below.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from locaudit.errors import ConfigError

# name -> (module:function, module:config class). One line per localizer.
BUILTIN: dict[str, tuple[str, str]] = {
    "patching": ("locaudit.localize.patching:activation_patching", "locaudit.localize.corruptions:PatchingConfig"),
    "attribution": ("locaudit.localize.attribution:attribution_patching",
                    "locaudit.localize.corruptions:PatchingConfig"),
}


def _load(target: str) -> Any:
    module, _, name = target.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"causal localizer {target!r} cannot be imported: {e}") from None


@dataclass(frozen=True)
class CausalLocalizer:
    """A registered causal localizer: its name, function and config class (imported on first use)."""

    name: str
    target: str
    config_target: str

    @property
    def fn(self) -> Callable[..., Any]:
        return _load(self.target)

    @property
    def config(self) -> type:
        return _load(self.config_target)

    def make_config(self, options: Any = None):
        """Its config from a mapping of options (or the config itself)."""
        cls = self.config
        return options if isinstance(options, cls) else cls(**(options or {}))


_REGISTRY: dict[str, CausalLocalizer] = {name: CausalLocalizer(name, fn, cfg) for name, (fn, cfg) in BUILTIN.items()}


def register_causal(name: str, target: str, config_target: str = "locaudit.localize.corruptions:PatchingConfig") -> None:
    """Register a causal localizer from outside the package (`target`, `config_target`: 'module:attribute')."""
    if not name.isidentifier() or name == "probe":
        raise ConfigError(f"causal localizer name {name!r}: a Python identifier other than 'probe'")
    _REGISTRY[name] = CausalLocalizer(name, target, config_target)


def causal_names() -> tuple[str, ...]:
    """Registered causal localizers, in registration order (the order a study's candidates come in)."""
    return tuple(_REGISTRY)


def causal_localizer(name: str) -> CausalLocalizer:
    """The registered causal localizer `name`; a ConfigError lists the registered ones."""
    got = _REGISTRY.get(name)
    if got is None:
        raise ConfigError(f"causal localizer {name!r} is not registered; registered: {list(_REGISTRY)} "
                          "(localize/registry.py)")
    return got
