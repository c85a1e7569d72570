"""A localization as a study names it, before the model's shape and the localizers' rankings are known.

`Localizer` is the hashable description stored in a trial, written in the one location language of
heads.py (``top16``, ``random16@3``, ``single#5@0``, ``L12H3``, ``all``, ``patching:top16``):
`Localizer.parse(text)` reads it, `name` prints it, and `resolve(n_layers, n_heads, ranking)` turns it
into the `HeadSet` to edit. Sampled single heads are the i-th head of one seeded permutation
(`HeadSet.single`), so they are distinct and raising the number of heads keeps the earlier ones (and
their trial keys).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from typing import Sequence

import numpy as np

from locaudit.errors import ConfigError
from locaudit.heads import DEFAULT_LOCALIZER, Head, HeadSet, Rankings, parse_location, pick_ranking

_TOP = re.compile(r"^top(\d+)$")
_RANDOM = re.compile(r"^random(\d+)@(\d+)(?:-top(\d+))?$")
_SINGLE = re.compile(r"^single@(\d+)(?:-top(\d+))?$")
_SINGLE_INDEX = re.compile(r"^single#(\d+)@(\d+)(?:-top(\d+))?$")
_RANKED = re.compile(r"^ranked#(\d+)$")


def _int_or_none(x: str | None) -> int | None:
    return int(x) if x else None


@dataclass(frozen=True)
class Localizer:
    """kind: top | random | single | ranked | heads | all. `group` is what statistics compare (top vs
    random ...); `ranked#i` is the ranking's i-th best head alone (0-based), a single head."""

    kind: str
    k: int | None = None
    seed: int | None = None
    index: int | None = None
    exclude_top: int | None = None  # K of the top set that random/single draws avoid
    heads: str | None = None  # explicit heads (kind 'heads'), e.g. "L12H3"
    avoid_top: int | None = None  # random draws: K of the top set a draw may not overlap by more than max_overlap
    max_overlap: float | None = None  # fraction of the smaller set; a draw above it is redrawn (seeded)
    ranking: str | None = None  # the localizer whose ranking top/exclude_top read (None: the probe's)

    @property
    def group(self) -> str:
        return "single" if self.kind in ("heads", "ranked") else self.kind

    @property
    def name(self) -> str:
        """The location string (heads.py's language); `Localizer.parse(name)` reads it back."""
        base = self._form()
        return f"{self.ranking}:{base}" if self.ranking not in (None, DEFAULT_LOCALIZER) else base

    def _form(self) -> str:
        ex = f"-top{self.exclude_top}" if self.exclude_top else ""
        if self.kind == "top":
            return f"top{self.k}"
        if self.kind == "random":
            return f"random{self.k}@{self.seed}{ex}"
        if self.kind == "single":
            return f"single#{self.index}@{self.seed}{ex}"
        if self.kind == "ranked":
            return f"ranked#{self.index}"
        if self.kind == "heads":
            return str(self.heads)
        return "all"

    @classmethod
    def parse(cls, text: str) -> "Localizer":
        """Read a location string: top16, random16@3[-top16], single#5@0[-top16], single@5 (= random1@5),
        L12H3,L20H1 / L12, all, and ranking-qualified forms (patching:top16)."""
        loc = parse_location(text)
        ranking = loc.localizer if loc.localizer not in (None, DEFAULT_LOCALIZER) else None
        f = loc.form
        if loc.localizer is not None and not loc.needs_ranking:
            raise ConfigError(f"location {text!r}: a localizer prefix goes with a ranking form "
                              "(top16, random16@3-top16)")
        if f == "all":
            return cls("all")
        if m := _TOP.match(f):
            return cls("top", k=int(m.group(1)), ranking=ranking)
        if m := _RANDOM.match(f):
            return cls("random", k=int(m.group(1)), seed=int(m.group(2)), exclude_top=_int_or_none(m.group(3)),
                       ranking=ranking)
        if m := _SINGLE.match(f):
            return cls("random", k=1, seed=int(m.group(1)), exclude_top=_int_or_none(m.group(2)), ranking=ranking)
        if m := _SINGLE_INDEX.match(f):
            return cls("single", index=int(m.group(1)), seed=int(m.group(2)), exclude_top=_int_or_none(m.group(3)),
                       ranking=ranking)
        if m := _RANKED.match(f):
            return cls("ranked", index=int(m.group(1)), ranking=ranking)
        if not all(re.match(r"^L\d+$", part) for part in f.split(",")):
            HeadSet.parse(f)  # explicit heads: raises ConfigError naming the bad part
        return cls("heads", heads=f)

    @property
    def needs_ranking(self) -> bool:
        return self.kind in ("top", "ranked") or bool(self.exclude_top) or self.redraws

    @property
    def redraws(self) -> bool:
        """A random draw that is redrawn when it overlaps the top-K set too much."""
        return self.kind == "random" and bool(self.avoid_top) and self.max_overlap is not None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict) -> "Localizer":
        return cls(**d)

    def resolve(self, n_layers: int, n_heads: int, ranking: Rankings | None = None) -> HeadSet:
        """The head set on a model with n_layers x n_heads; `ranking` (best first: the probe's, or a mapping
        {localizer: ranking}) for top / exclude_top."""
        if self.needs_ranking and ranking is None:
            raise ConfigError(f"localizer {self.name!r} needs the {self.ranking or DEFAULT_LOCALIZER} head ranking")
        if ranking is not None and self.needs_ranking:
            ranking = list(pick_ranking(ranking, self.ranking, self.name) or [])
        exclude = list(ranking[: self.exclude_top]) if self.exclude_top else []  # type: ignore[index]
        if self.kind == "top":
            return replace(HeadSet.top(list(ranking), int(self.k)), name=self.name)  # type: ignore[arg-type]
        if self.kind == "random":
            draw = HeadSet.random(int(self.k), int(self.seed), n_layers, n_heads, exclude=exclude, name=self.name)  # type: ignore[arg-type]
            return self._redrawn(draw, n_layers, n_heads, exclude, ranking) if self.redraws else draw  # type: ignore[arg-type]
        if self.kind == "ranked":
            ranked = list(ranking)  # type: ignore[arg-type]
            if int(self.index) >= len(ranked):  # type: ignore[arg-type]
                raise ConfigError(f"location {self.name!r}: the ranking has only {len(ranked)} heads")
            return HeadSet((tuple(ranked[int(self.index)]),), self.name)  # type: ignore[arg-type]
        if self.kind == "single":
            return HeadSet.single(int(self.index), int(self.seed), n_layers, n_heads, exclude, self.name)  # type: ignore[arg-type]
        if self.kind == "heads":
            return HeadSet.parse(str(self.heads), n_layers, n_heads)
        if self.kind == "all":
            return HeadSet.all(n_layers, n_heads)
        raise ConfigError(f"unknown localizer kind {self.kind!r}")

    def _redrawn(self, draw: HeadSet, n_layers: int, n_heads: int, exclude: list, ranking: Sequence[Head] | None,
                 max_attempts: int = 1000) -> HeadSet:
        """The draw, or the first seeded redraw (rng [seed, attempt]) whose overlap with the top-K heads is
        at most max_overlap of the smaller set; meta records the attempt and the overlap."""
        top = set(map(tuple, list(ranking or [])[: int(self.avoid_top)]))  # type: ignore[arg-type]
        limit = float(self.max_overlap) * min(len(draw), len(top))  # type: ignore[arg-type]
        excluded = set(map(tuple, exclude))
        pool = [(l, h) for l in range(n_layers) for h in range(n_heads) if (l, h) not in excluded]
        for attempt in range(max_attempts):
            if attempt:
                rng = np.random.default_rng([int(self.seed), attempt])  # type: ignore[arg-type]
                idx = rng.choice(len(pool), size=len(draw), replace=False)
                draw = HeadSet(tuple(pool[i] for i in idx), self.name)
            overlap = len(set(draw.heads) & top)
            if overlap <= limit + 1e-9:
                draw.meta.update(redraw_attempt=attempt, overlap_with_top=overlap)
                return draw
        raise ConfigError(f"localizers.random.max_overlap={self.max_overlap}: no draw of {len(draw)} heads out of "
                          f"{len(pool)} overlaps the top-{self.avoid_top} by at most that in {max_attempts} tries; "
                          "raise max_overlap or set it to null")
