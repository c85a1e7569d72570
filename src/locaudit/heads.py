"""`HeadSet`: the one value type for a location, a set of attention heads (layer, head).

Used everywhere a location is meant: probing picks one, edits are masked by one, studies compare them.

String forms (see `HeadSet.parse`):
  ``all``                 every head of every layer
  ``L12H3,L20H1``         explicit heads (also ``12.3``)
  ``L12``                 every head of layer 12
  ``top16``               the 16 best heads of a ranking (from probing)
  ``random16@3``          16 heads drawn uniformly with seed 3
  ``random16@3-top16``    the same draw, never picking one of the top 16
  ``single@5``            one head drawn with seed 5 (same as ``random1@5``)
  ``single#5@0``          the 6th head (index 5) of the permutation seeded 0 (the studies' distinct
                          single heads; ``single#5@0-top16`` avoids the top 16)
  ``LOCALIZER:FORM``      a ranking form read from another localizer's ranking: ``patching:top16``,
                          ``attribution:top8``, ``probe:random16@3-top16``; without a prefix the
                          ranking is the probe's (``top16`` == ``probe:top16``)

`parse_location(text) -> Location(localizer, form)` splits the prefix; `HeadSet.parse` takes a
ranking (best first) or a mapping {localizer name: ranking}.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass, field, replace
from typing import Iterable, Iterator, Mapping, Sequence, Union

import numpy as np
import torch

from locaudit.errors import ConfigError

log = logging.getLogger(__name__)
Head = tuple[int, int]

_EXPLICIT = re.compile(r"^L(\d+)H(\d+)$|^(\d+)\.(\d+)$")
_LAYER = re.compile(r"^L(\d+)$")
_TOP = re.compile(r"^top(\d+)$")
_RANDOM = re.compile(r"^random(\d+)@(\d+)(?:-top(\d+))?$")
_SINGLE = re.compile(r"^single@(\d+)(?:-top(\d+))?$")
_SINGLE_INDEX = re.compile(r"^single#(\d+)@(\d+)(?:-top(\d+))?$")
_LOCALIZER = re.compile(r"^([a-z][a-z0-9_]*):(.+)$")
DEFAULT_LOCALIZER = "probe"
Rankings = Union[Sequence[Head], Mapping[str, Sequence[Head]]]


@dataclass(frozen=True)
class Location:
    """A parsed location string: the localizer whose ranking it reads (None: none needed, or the
    default probe's) and the HeadSet form (``top16``, ``random16@3``, ``L12H3`` ...)."""

    localizer: str | None
    form: str

    @property
    def needs_ranking(self) -> bool:
        f = self.form
        return bool(_TOP.match(f)) or ("-top" in f and bool(_RANDOM.match(f) or _SINGLE.match(f) or _SINGLE_INDEX.match(f)))

    @property
    def ranking_name(self) -> str:
        """The localizer whose ranking this location reads (the default probe where unqualified)."""
        return self.localizer or DEFAULT_LOCALIZER

    def __str__(self) -> str:
        return self.form if self.localizer in (None, DEFAULT_LOCALIZER) else f"{self.localizer}:{self.form}"


def parse_location(text: str) -> Location:
    """Split ``LOCALIZER:FORM`` (``patching:top16``); an unqualified form has localizer None."""
    s = str(text).strip().replace(" ", "")
    if m := _LOCALIZER.match(s):
        return Location(m.group(1), m.group(2))
    return Location(None, s)


def pick_ranking(rankings: Rankings | None, localizer: str | None, spec: str) -> Sequence[Head] | None:
    """The ranking a location reads: a plain sequence is the default localizer's (probe) ranking."""
    if rankings is None:
        return None
    name = localizer or DEFAULT_LOCALIZER
    if isinstance(rankings, Mapping):
        if name not in rankings:
            raise ConfigError(f"head set {spec!r} needs the {name!r} ranking; rankings given: "
                              f"{', '.join(sorted(rankings)) or 'none'}")
        return rankings[name]
    if name != DEFAULT_LOCALIZER:
        raise ConfigError(f"head set {spec!r} reads the {name!r} ranking, but only the {DEFAULT_LOCALIZER!r} "
                          "ranking was given (pass a mapping {localizer: ranking})")
    return rankings


@dataclass(frozen=True)
class HeadSet:
    """A sorted, duplicate-free set of (layer, head) pairs with a name saying where it came from.

    Equality and hashing look at the heads only: the name is a label.
    """

    heads: tuple[Head, ...]
    name: str = field(default="", compare=False)
    meta: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        clean = tuple(sorted({(int(l), int(h)) for l, h in self.heads}))
        for l, h in clean:
            if l < 0 or h < 0:
                raise ConfigError(f"HeadSet {self.name!r}: negative index in head (layer={l}, head={h})")
        object.__setattr__(self, "heads", clean)
        if not self.name:
            object.__setattr__(self, "name", self.to_string())

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_heads(cls, heads: Iterable[Sequence[int]], name: str = "") -> "HeadSet":
        return cls(tuple((int(l), int(h)) for l, h in heads), name)

    @classmethod
    def all(cls, n_layers: int, n_heads: int) -> "HeadSet":
        return cls(tuple((l, h) for l in range(n_layers) for h in range(n_heads)), "all")

    @classmethod
    def layer(cls, layer: int, n_heads: int) -> "HeadSet":
        return cls(tuple((layer, h) for h in range(n_heads)), f"L{layer}")

    @classmethod
    def top(cls, ranking: Sequence[Head], k: int) -> "HeadSet":
        """The first k heads of `ranking` (best first)."""
        if k < 1 or k > len(ranking):
            raise ConfigError(f"top{k}: k must be in 1..{len(ranking)} (the ranking has {len(ranking)} heads)")
        return cls(tuple(ranking[:k]), f"top{k}")

    @classmethod
    def random(
        cls, k: int, seed: int, n_layers: int, n_heads: int, exclude: Iterable[Head] = (), name: str = ""
    ) -> "HeadSet":
        """k heads drawn uniformly without replacement; the same (k, seed, shape, exclude) gives the same set."""
        excluded = {(int(l), int(h)) for l, h in exclude}
        pool = [(l, h) for l in range(n_layers) for h in range(n_heads) if (l, h) not in excluded]
        if k < 1 or k > len(pool):
            raise ConfigError(f"random{k}@{seed}: k must be in 1..{len(pool)} (heads available after exclusion)")
        rng = np.random.default_rng(seed)
        idx = rng.choice(len(pool), size=k, replace=False)
        return cls(tuple(pool[i] for i in idx), name or f"random{k}@{seed}")

    @classmethod
    def single(cls, index: int, seed: int, n_layers: int, n_heads: int, exclude: Iterable[Head] = (),
               name: str = "") -> "HeadSet":
        """The `index`-th head of one seeded permutation of the heads not excluded: distinct indices give
        distinct heads, and raising the number of indices keeps the earlier heads."""
        excluded = {(int(l), int(h)) for l, h in exclude}
        pool = [(l, h) for l in range(n_layers) for h in range(n_heads) if (l, h) not in excluded]
        if not 0 <= int(index) < len(pool):
            raise ConfigError(f"{name or f'single#{index}@{seed}'}: only {len(pool)} distinct single heads exist")
        perm = np.random.default_rng(int(seed)).permutation(len(pool))
        return cls((pool[int(perm[int(index)])],), name or f"single#{index}@{seed}")

    @classmethod
    def parse(
        cls,
        spec: str,
        n_layers: int | None = None,
        n_heads: int | None = None,
        ranking: Rankings | None = None,
    ) -> "HeadSet":
        """Parse a location string (module docstring). The shape is needed for all/random/single/L<n>; a
        ranking (best first; or {localizer: ranking} for ``patching:top16`` forms) for top<k> and -top<k>."""
        loc = parse_location(spec)
        s = loc.form
        if not s:
            raise ConfigError("empty head set spec; try 'top16', 'random16@3', 'L12H3,L20H1' or 'all'")
        if loc.localizer is not None and not loc.needs_ranking:
            raise ConfigError(f"head set {spec!r}: a localizer prefix ({loc.localizer}:) goes with a ranking form "
                              "such as top16 or random16@3-top16")
        ranking = pick_ranking(ranking, loc.localizer, spec) if loc.needs_ranking else None

        def need_shape() -> tuple[int, int]:
            if n_layers is None or n_heads is None:
                raise ConfigError(f"head set {spec!r} needs the model's number of layers and heads")
            return n_layers, n_heads

        def named(hs: "HeadSet") -> "HeadSet":
            return hs if loc.localizer in (None, DEFAULT_LOCALIZER) else replace(hs, name=f"{loc.localizer}:{hs.name}")

        def excluded(top: str | None) -> Sequence[Head]:
            if top is None:
                return ()
            if ranking is None:
                raise ConfigError(f"head set {spec!r} excludes top{top}: it needs a head ranking")
            return ranking[: int(top)]

        if s == "all":
            return cls.all(*need_shape())
        if m := _TOP.match(s):
            if ranking is None:
                raise ConfigError(f"head set {spec!r} needs a head ranking: run `locaudit probe` first")
            return named(cls.top(ranking, int(m.group(1))))
        if m := _SINGLE_INDEX.match(s):
            L, H = need_shape()
            return named(cls.single(int(m.group(1)), int(m.group(2)), L, H, excluded(m.group(3)), name=s))
        if m := _RANDOM.match(s) or _SINGLE.match(s):
            L, H = need_shape()
            if s.startswith("single"):
                k, seed, top = 1, int(m.group(1)), m.group(2)
            else:
                k, seed, top = int(m.group(1)), int(m.group(2)), m.group(3)
            return named(cls.random(k, seed, L, H, exclude=excluded(top), name=s))
        heads: list[Head] = []
        for part in s.split(","):
            if m := _EXPLICIT.match(part):
                l, h = (m.group(1), m.group(2)) if m.group(1) is not None else (m.group(3), m.group(4))
                heads.append((int(l), int(h)))
            elif m := _LAYER.match(part):
                _, H = need_shape()
                heads.extend((int(m.group(1)), h) for h in range(H))
            else:
                raise ConfigError(
                    f"cannot parse head {part!r} in head set spec {spec!r}; expected forms: all, top16, "
                    "random16@3, random16@3-top16, single@5, single#5@0, L12, L12H3,L20H1 (or 12.3), "
                    "patching:top16"
                )
        out = cls(tuple(heads))
        if len(out) < len(heads):  # e.g. 'L1H1,1.1': one head written twice
            dup = sorted({h for h in heads if heads.count(h) > 1})
            msg = (f"head set {spec!r} names {', '.join(f'L{l}H{h}' for l, h in dup)} more than once; "
                   f"merged into {len(out)} distinct heads")
            warnings.warn(msg, UserWarning, stacklevel=2)
            log.warning(msg)
        if n_layers is not None and n_heads is not None:
            out.check(n_layers, n_heads)
        return out

    # ------------------------------------------------------------------ views
    def __len__(self) -> int:
        return len(self.heads)

    def __iter__(self) -> Iterator[Head]:
        return iter(self.heads)

    def __contains__(self, item: object) -> bool:
        return item in self.heads

    @property
    def layers(self) -> tuple[int, ...]:
        """Layers that contain at least one head of the set, ascending."""
        return tuple(sorted({l for l, _ in self.heads}))

    def heads_in(self, layer: int) -> tuple[int, ...]:
        return tuple(h for l, h in self.heads if l == layer)

    def check(self, n_layers: int, n_heads: int) -> "HeadSet":
        """Raise if a head lies outside a model with n_layers x n_heads; return self."""
        for l, h in self.heads:
            if l >= n_layers or h >= n_heads:
                raise ConfigError(
                    f"head set {self.name!r} has head L{l}H{h}, outside the model's {n_layers} layers x {n_heads} heads"
                )
        return self

    def head_mask(self, n_layers: int, n_heads: int) -> torch.Tensor:
        """Bool[Tensor, "layer head"]: True on the set's heads."""
        self.check(n_layers, n_heads)
        mask = torch.zeros(n_layers, n_heads, dtype=torch.bool)
        for l, h in self.heads:
            mask[l, h] = True
        return mask

    def dim_mask(self, n_layers: int, n_heads: int, head_dim: int) -> torch.Tensor:
        """Bool[Tensor, "layer head*head_dim"]: True on the o_proj input coordinates of the set's heads."""
        return self.head_mask(n_layers, n_heads).repeat_interleave(head_dim, dim=1)

    def to_string(self) -> str:
        """Explicit, parseable form (``L0H1,L3H2``)."""
        return ",".join(f"L{l}H{h}" for l, h in self.heads)

    def to_dict(self) -> dict:
        return {"name": self.name, "heads": [list(h) for h in self.heads]}

    @classmethod
    def from_dict(cls, d: dict) -> "HeadSet":
        try:
            return cls(tuple((int(l), int(h)) for l, h in d["heads"]), str(d.get("name", "")))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"malformed head set record {d!r}: expected {{'name': str, 'heads': [[layer, head], ...]}}") from e

    def __str__(self) -> str:
        return self.name
