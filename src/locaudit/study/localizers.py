"""A localization as a study names it, before the model's shape and the localizers' rankings are known.

`Localizer` is the hashable description stored in a trial: the parts of a `heads.Location` as trial keys
store them (heads.py holds the one location grammar: `Location.parse` reads ``top16``, ``random16@3``,
``single#5@0``, ``ranked#2``, ``L12H3``, ``all``, ``patching:top16``; `Location.format` prints them;
`Location.resolve` turns them into a HeadSet), plus the one rule that is the study's own: a random draw
that overlaps the top-K heads too much is redrawn, seeded (`avoid_top`, `max_overlap`). Sampled single
heads are the i-th head of one seeded permutation (`HeadSet.single`), so they are distinct and raising
the number of heads keeps the earlier ones (and their trial keys).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from locaudit.errors import ConfigError
from locaudit.heads import DEFAULT_LOCALIZER, HeadSet, Location, Ranking, RankingLike


@dataclass(frozen=True)
class Localizer:
    """kind: top | random | single | ranked | heads | all (heads.KINDS). `group` is what statistics compare
    (top vs random ...); `ranked#i` is the ranking's i-th best head alone (0-based), a single head. The fields
    are a `heads.Location`'s, as trial keys store them, plus the study's redraw rule (avoid_top, max_overlap)."""

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
        return Location.format(self.kind, self.k, self.seed, self.index, self.exclude_top, self.heads, self.ranking)

    @classmethod
    def parse(cls, text: str) -> "Localizer":
        """Read a location string (`heads.Location.parse`: top16, random16@3[-top16], single#5@0[-top16],
        single@5 (= random1@5), ranked#2, L12H3,L20H1 / L12, all, and ranking-qualified forms: patching:top16)."""
        loc = Location.parse(text)
        ranking = loc.localizer if loc.localizer not in (None, DEFAULT_LOCALIZER) else None
        return cls(loc.kind, k=loc.k, seed=loc.seed, index=loc.index, exclude_top=loc.exclude_top,
                   heads=loc.form if loc.kind == "heads" else None, ranking=ranking)

    @property
    def location(self) -> Location:
        return Location.parse(self.name)

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

    def resolve(self, n_layers: int, n_heads: int, ranking: RankingLike = None) -> HeadSet:
        """The head set on a model with n_layers x n_heads (`Location.resolve`, then the redraw rule); `ranking`:
        a `heads.Ranking` (or what `Ranking.of` takes) for top / ranked / exclude_top / redraws."""
        ranking = Ranking.of(ranking)
        if self.needs_ranking and ranking is None:
            raise ConfigError(f"localizer {self.name!r} needs the {self.ranking or DEFAULT_LOCALIZER} head ranking")
        draw = self.location.resolve(n_layers, n_heads, ranking)
        if not self.redraws:
            return draw
        top = ranking.heads(self.ranking, self.name)  # type: ignore[union-attr]
        return self._redrawn(draw, n_layers, n_heads, top[: self.exclude_top] if self.exclude_top else (), top)

    def _redrawn(self, draw: HeadSet, n_layers: int, n_heads: int, exclude, ranking,
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
