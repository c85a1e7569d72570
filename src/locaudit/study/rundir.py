"""The layout of a study's run folder, in one place.

  ledger.sqlite           the ledger (study/ledger.py)
  shared/KIND-KEY/        results other trials read: collect-, probe-, localize- (by trial key) and optimal-
                          (a trained optimal edit, keyed by its training content only: OptimalTrial.training_key)
  shared/passes/pass-KEY/ a training pass in progress (edit/resume.py), removed once its edits are saved
  shared/scores/score-KEY/ a trained edit's scores as a group's chunk ends (steps/evaluation.score_many), so a
                          run killed while scoring a group does not score that chunk again
  trials/KEY/             a trial's own folder: edit/ (an ITI edit), eval/ (its evaluation; eval/val/ for
                          selection), dose.json and dose/, result.json (its record, what `repair` reads)
  report/                 the report (study/report.py); report-<judge>/ when re-judged

`RunDir(root)` gives absolute paths; the `*_rel` forms are the same places relative to the run folder, as
trial contents and ledger artifacts record them (POSIX separators, so they mean the same on every machine).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

LEDGER_FILE = "ledger.sqlite"
RECORD_FILE = "result.json"
SHARED = "shared"
TRIALS = "trials"
SHARED_KINDS = ("collect", "probe", "localize", "optimal")


def shared_rel(kind: str, key: str) -> str:
    """shared/KIND-KEY, relative to the run folder."""
    if kind not in SHARED_KINDS:
        raise ValueError(f"shared results are of kinds {SHARED_KINDS}, not {kind!r}")
    return str(PurePosixPath(SHARED) / f"{kind}-{key}")


def trial_rel(key: str, *parts: str) -> str:
    """trials/KEY[/parts...], relative to the run folder."""
    return str(PurePosixPath(TRIALS, key, *parts))


@dataclass(frozen=True)
class RunDir:
    """A study's run folder (see the module docstring for its layout)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def ledger(self) -> Path:
        return self.root / LEDGER_FILE

    def shared(self, kind: str, key: str) -> Path:
        return self.root / shared_rel(kind, key)

    def collect(self, key: str) -> Path:
        return self.shared("collect", key)

    def probe(self, key: str) -> Path:
        return self.shared("probe", key)

    def localize(self, key: str) -> Path:
        return self.shared("localize", key)

    def optimal(self, training_key: str) -> Path:
        return self.shared("optimal", training_key)

    @property
    def passes(self) -> Path:
        """shared/passes/: the checkpoints of training passes in progress (edit/resume.py)."""
        return self.root / SHARED / "passes"

    @property
    def scores(self) -> Path:
        """shared/scores/: trained edits' scores, keyed by content (steps/evaluation.score_many)."""
        return self.root / SHARED / "scores"

    def trial(self, key: str) -> Path:
        return self.root / trial_rel(key)

    def record(self, key: str) -> Path:
        """trials/KEY/result.json."""
        return self.trial(key) / RECORD_FILE

    @property
    def trials(self) -> Path:
        return self.root / TRIALS

    def recorded_keys(self) -> list[str]:
        """The keys of the trials that have a record (trials/KEY/result.json), sorted."""
        return sorted(p.parent.name for p in self.trials.glob(f"*/{RECORD_FILE}") if p.is_file())

    def has_results(self) -> bool:
        """Whether trials/ or shared/ holds anything."""
        return any((self.root / sub).is_dir() and any((self.root / sub).iterdir()) for sub in (TRIALS, SHARED))

    def is_run(self) -> bool:
        """Whether this is a run folder (a ledger, or trials/)."""
        return self.ledger.exists() or self.trials.is_dir()
