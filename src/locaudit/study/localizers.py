"""A localization as a study names it, before the model's shape and the probe's ranking are known.

`Localizer` is the hashable description stored in a trial (``top16``, ``random16@3``, ``single#5@0``,
``L12H3``, ``all``); `resolve(n_layers, n_heads, ranking)` turns it into the `HeadSet` to edit.
Sampled single heads are the i-th head of one seeded permutation, so they are distinct and raising
the number of heads keeps the earlier ones (and their trial keys).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from locaudit.errors import ConfigError
from locaudit.heads import Head, HeadSet


@dataclass(frozen=True)
class Localizer:
    """kind: top | random | single | heads | all. `group` is what statistics compare (top vs random ...)."""

    kind: str
    k: int | None = None
    seed: int | None = None
    index: int | None = None
    exclude_top: int | None = None  # K of the top set that random/single draws avoid
    heads: str | None = None  # explicit heads (kind 'heads'), e.g. "L12H3"
    avoid_top: int | None = None  # random draws: K of the top set a draw may not overlap by more than max_overlap
    max_overlap: float | None = None  # fraction of the smaller set; a draw above it is redrawn (seeded)

    @property
    def group(self) -> str:
        return "single" if self.kind == "heads" else self.kind

    @property
    def name(self) -> str:
        ex = f"-top{self.exclude_top}" if self.exclude_top else ""
        if self.kind == "top":
            return f"top{self.k}"
        if self.kind == "random":
            return f"random{self.k}@{self.seed}{ex}"
        if self.kind == "single":
            return f"single#{self.index}@{self.seed}{ex}"
        if self.kind == "heads":
            return str(self.heads)
        return "all"

    @property
    def needs_ranking(self) -> bool:
        return self.kind == "top" or bool(self.exclude_top) or self.redraws

    @property
    def redraws(self) -> bool:
        """A random draw that is redrawn when it overlaps the top-K set too much."""
        return self.kind == "random" and bool(self.avoid_top) and self.max_overlap is not None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict) -> "Localizer":
        return cls(**d)

    def resolve(self, n_layers: int, n_heads: int, ranking: Sequence[Head] | None = None) -> HeadSet:
        """The head set on a model with n_layers x n_heads; `ranking` (best first) for top / exclude_top."""
        if self.needs_ranking and ranking is None:
            raise ConfigError(f"localizer {self.name!r} needs the probe's head ranking")
        exclude = list(ranking[: self.exclude_top]) if self.exclude_top else []
        if self.kind == "top":
            return HeadSet.top(list(ranking), int(self.k))  # type: ignore[arg-type]
        if self.kind == "random":
            draw = HeadSet.random(int(self.k), int(self.seed), n_layers, n_heads, exclude=exclude, name=self.name)  # type: ignore[arg-type]
            return self._redrawn(draw, n_layers, n_heads, exclude, ranking) if self.redraws else draw
        if self.kind == "single":
            excluded = set(map(tuple, exclude))
            pool = [(l, h) for l in range(n_layers) for h in range(n_heads) if (l, h) not in excluded]
            if int(self.index) >= len(pool):  # type: ignore[arg-type]
                raise ConfigError(f"localizer {self.name!r}: only {len(pool)} distinct single heads exist")
            perm = np.random.default_rng(int(self.seed)).permutation(len(pool))  # type: ignore[arg-type]
            return HeadSet((pool[int(perm[int(self.index)])],), self.name)  # type: ignore[arg-type]
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
