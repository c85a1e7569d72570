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
  ``ranked#2``            the ranking's 3rd best head alone (index 2)
  ``LOCALIZER:FORM``      a ranking form read from another localizer's ranking: ``patching:top16``,
                          ``attribution:top8``, ``probe:random16@3-top16``; without a prefix the
                          ranking is the probe's (``top16`` == ``probe:top16``)

This module holds the one grammar: `Location.parse(text)` (also `parse_location`) reads a string into a
`Location` (localizer, kind and numbers) and `Location.resolve(n_layers, n_heads, ranking)` turns it into
a HeadSet; `HeadSet.parse` is the two in one. A `Ranking` holds the rankings a location may read, best
first, by localizer (``Ranking.of`` takes a plain sequence of heads as the probe's ranking, or a mapping
{localizer: heads}). study/localizers.py's `Localizer` is a Location as a study stores it in trial keys.
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
_RANKED = re.compile(r"^ranked#(\d+)$")
_LOCALIZER = re.compile(r"^([a-z][a-z0-9_]*):(.+)$")
DEFAULT_LOCALIZER = "probe"
FORMS = ("all, top16, random16@3, random16@3-top16, single@5, single#5@0, ranked#0, L12, L12H3,L20H1 (or 12.3), "
         "patching:top16")
KINDS = ("all", "top", "random", "single", "ranked", "heads")  # Location.kind


@dataclass(frozen=True)
class Ranking:
    """Head rankings, best first, by the localizer that ranked them: ``Ranking({"probe": [...], "patching":
    [...]})``. A location reads one of them (`heads`); an unqualified location reads the probe's."""

    by_localizer: Mapping[str, tuple[Head, ...]] = field(hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.by_localizer, Mapping):
            raise ConfigError(f"Ranking: expected {{localizer name: heads best first}}, got "
                              f"{type(self.by_localizer).__name__}")
        clean = {}
        for name, heads in self.by_localizer.items():
            try:
                clean[str(name)] = tuple((int(l), int(h)) for l, h in heads)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"Ranking {name!r}: expected a sequence of (layer, head) pairs") from e
        object.__setattr__(self, "by_localizer", clean)

    @classmethod
    def of(cls, value: "RankingLike") -> "Ranking | None":
        """A Ranking from what callers hold: a Ranking, {localizer: heads}, a sequence of heads (the probe's
        ranking), or None (no ranking: None)."""
        if value is None or isinstance(value, Ranking):
            return value
        if isinstance(value, Mapping):
            return cls(value)
        return cls({DEFAULT_LOCALIZER: value})

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self.by_localizer))

    def heads(self, localizer: str | None, spec: str) -> tuple[Head, ...]:
        """The ranking of `localizer` (None: the probe's) that location `spec` reads; ConfigError naming both
        where it is not here."""
        name = localizer or DEFAULT_LOCALIZER
        if name not in self.by_localizer:
            raise ConfigError(f"location {spec!r} needs the {name!r} ranking; rankings given: "
                              f"{', '.join(self.names) or 'none'}")
        return self.by_localizer[name]


RankingLike = Union[Ranking, Sequence[Head], Mapping[str, Sequence[Head]], None]


def _int(x: str | None) -> int | None:
    return int(x) if x else None


@dataclass(frozen=True)
class Location:
    """A parsed location string: the localizer whose ranking it reads (None: none needed, or the default
    probe's), the form as written (``top16``, ``random16@3``, ``L12H3`` ...) and what the form says: its
    `kind` (KINDS) and numbers (k heads, seed, index, the top-K set excluded). `Location.parse` builds it."""

    localizer: str | None
    form: str
    kind: str
    k: int | None = None
    seed: int | None = None
    index: int | None = None
    exclude_top: int | None = None

    @classmethod
    def parse(cls, text: str) -> "Location":
        """Read a location string (module docstring); ConfigError naming the string and the forms where it
        is not one. The model's shape and rankings are not needed (`resolve` takes them)."""
        spec = str(text).strip().replace(" ", "")
        localizer, f = (m.group(1), m.group(2)) if (m := _LOCALIZER.match(spec)) else (None, spec)
        if not f:
            raise ConfigError("empty head set spec; try 'top16', 'random16@3', 'L12H3,L20H1' or 'all'")
        if f == "all":
            loc = cls(localizer, f, "all")
        elif m := _TOP.match(f):
            loc = cls(localizer, f, "top", k=int(m.group(1)))
        elif m := _RANDOM.match(f):
            loc = cls(localizer, f, "random", k=int(m.group(1)), seed=int(m.group(2)), exclude_top=_int(m.group(3)))
        elif m := _SINGLE.match(f):  # single@5 == random1@5
            loc = cls(localizer, f, "random", k=1, seed=int(m.group(1)), exclude_top=_int(m.group(2)))
        elif m := _SINGLE_INDEX.match(f):
            loc = cls(localizer, f, "single", index=int(m.group(1)), seed=int(m.group(2)),
                      exclude_top=_int(m.group(3)))
        elif m := _RANKED.match(f):
            loc = cls(localizer, f, "ranked", index=int(m.group(1)))
        else:
            for part in f.split(","):
                if not (_EXPLICIT.match(part) or _LAYER.match(part)):
                    raise ConfigError(f"cannot parse head {part!r} in head set spec {text!r}; expected forms: {FORMS}")
            loc = cls(localizer, f, "heads")
        if localizer is not None and not loc.needs_ranking:
            raise ConfigError(f"location {text!r}: a localizer prefix ({localizer}:) goes with a ranking form "
                              "such as top16 or random16@3-top16")
        return loc

    @staticmethod
    def format(kind: str, k: int | None = None, seed: int | None = None, index: int | None = None,
               exclude_top: int | None = None, heads: str | None = None, localizer: str | None = None) -> str:
        """The canonical string of a location's parts, which `parse` reads back (``single@5`` is written
        ``random1@5``; the default probe's prefix is left out)."""
        ex = f"-top{exclude_top}" if exclude_top else ""
        forms = {"top": f"top{k}", "random": f"random{k}@{seed}{ex}", "single": f"single#{index}@{seed}{ex}",
                 "ranked": f"ranked#{index}", "heads": str(heads), "all": "all"}
        if kind not in forms:
            raise ConfigError(f"location kind {kind!r}: expected one of {', '.join(KINDS)}")
        return forms[kind] if localizer in (None, DEFAULT_LOCALIZER) else f"{localizer}:{forms[kind]}"

    @property
    def needs_ranking(self) -> bool:
        return self.kind in ("top", "ranked") or bool(self.exclude_top)

    @property
    def ranking_name(self) -> str:
        """The localizer whose ranking this location reads (the default probe where unqualified)."""
        return self.localizer or DEFAULT_LOCALIZER

    def __str__(self) -> str:
        return self.form if self.localizer in (None, DEFAULT_LOCALIZER) else f"{self.localizer}:{self.form}"

    def resolve(self, n_layers: int | None = None, n_heads: int | None = None, ranking: RankingLike = None,
                name: str | None = None) -> "HeadSet":
        """The HeadSet on a model with n_layers x n_heads (needed by all, random, single and L<n>), reading
        `ranking` (a Ranking, or what `Ranking.of` takes) for top<k>, ranked#i and -top<k>. Named `name`, else
        the location as written (explicit heads by their sorted list)."""
        spec = name or str(self)
        given = Ranking.of(ranking) if self.needs_ranking else None
        heads = given.heads(self.localizer, spec) if given is not None else None

        def need_shape() -> tuple[int, int]:
            if n_layers is None or n_heads is None:
                raise ConfigError(f"head set {spec!r} needs the model's number of layers and heads")
            return n_layers, n_heads

        def need_ranking() -> tuple[Head, ...]:
            if heads is None:
                raise ConfigError(f"head set {spec!r} needs the {self.ranking_name} head ranking (for the probe's: "
                                  "run `locaudit probe` first)")
            return heads

        excluded = need_ranking()[: self.exclude_top] if self.exclude_top else ()
        if self.kind == "all":
            return HeadSet.all(*need_shape())
        if self.kind == "top":
            return replace(HeadSet.top(need_ranking(), int(self.k)), name=spec)  # type: ignore[arg-type]
        if self.kind == "ranked":
            ranked = need_ranking()
            if int(self.index) >= len(ranked):  # type: ignore[arg-type]
                raise ConfigError(f"location {spec!r}: the ranking has only {len(ranked)} heads")
            return HeadSet((ranked[int(self.index)],), spec)  # type: ignore[arg-type]
        if self.kind == "single":
            return HeadSet.single(int(self.index), int(self.seed), *need_shape(), excluded,  # type: ignore[arg-type]
                                  spec)
        if self.kind == "random":
            return HeadSet.random(int(self.k), int(self.seed), *need_shape(),  # type: ignore[arg-type]
                                  exclude=excluded, name=spec)
        out: list[Head] = []
        for part in self.form.split(","):
            if m := _EXPLICIT.match(part):
                l, h = (m.group(1), m.group(2)) if m.group(1) is not None else (m.group(3), m.group(4))
                out.append((int(l), int(h)))
            elif m := _LAYER.match(part):
                out.extend((int(m.group(1)), h) for h in range(need_shape()[1]))
        hs = HeadSet(tuple(out))
        if len(hs) < len(out):  # e.g. 'L1H1,1.1': one head written twice
            dup = sorted({h for h in out if out.count(h) > 1})
            msg = (f"head set {spec!r} names {', '.join(f'L{l}H{h}' for l, h in dup)} more than once; "
                   f"merged into {len(hs)} distinct heads")
            warnings.warn(msg, UserWarning, stacklevel=3)
            log.warning(msg)
        if n_layers is not None and n_heads is not None:
            hs.check(n_layers, n_heads)
        return hs


def parse_location(text: str) -> Location:
    """`Location.parse`: ``LOCALIZER:FORM`` (``patching:top16``) or an unqualified form (localizer None)."""
    return Location.parse(text)


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
    def parse(cls, spec: str, n_layers: int | None = None, n_heads: int | None = None,
              ranking: RankingLike = None) -> "HeadSet":
        """Parse a location string (module docstring) and resolve it: `Location.parse(spec).resolve(...)`. The
        shape is needed for all/random/single/L<n>; a ranking (a Ranking, a sequence of heads best first, or
        {localizer: heads} for ``patching:top16`` forms) for top<k>, ranked#i and -top<k>."""
        return Location.parse(spec).resolve(n_layers, n_heads, ranking)

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
