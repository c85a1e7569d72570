"""A run folder's results, small enough to commit or carry: `locaudit pack RUN --out DEST`.

A study that runs for many hours may outlive the machine it started on. Everything it has computed that costs
time is small: trial records and evaluations, trained edits (a rank-1 edit per layer is a few kB), the kept
scores of a group's chunks, the checkpoints of training passes in progress and the ledger's history (timings,
lost time). What is large can be recomputed in minutes: the probe examples' activations (shared/collect-*), and
the report. `pack_run` copies the former into DEST and leaves the latter out:

  DEST/ledger.sqlite   a consistent snapshot of the ledger (SQLite's online backup, so the run may be live);
                       done trials whose artifacts were left out get a 'packed' event in it: they stay done
                       while no trial still to run reads them (ledger.recheck_done), and run again, without
                       booking lost time, when one does
  DEST/trials/, DEST/shared/ (without collect-* unless `activations=True`), as in the run folder, except that
                       evaluation files hold no text of the dataset (pack_text.py: the questions of generated
                       answers, the reference answers keyed by their text), so a pack can be committed

`locaudit run STUDY --out DEST` then goes on from there, on any machine: finished trials are kept (their
artifact checksums are checked as at every start), a training pass resumes from its last early-stopping check,
a group's scoring from its last kept chunk, and the activations are collected again only if a trial still to
run reads them. DEST is built beside itself and
swapped in at once, so a pack killed part way leaves the previous pack whole.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from locaudit.errors import ConfigError
from locaudit.io import TMP_TAG, atomic_dir
from locaudit.study.ledger import PACKED_EVENT, lock_held
from locaudit.study.pack_text import strip_dataset_text
from locaudit.study.records import ARTIFACT_DIRS
from locaudit.study.rundir import LEDGER_FILE, SHARED, TRIALS, RunDir

LEFT_OUT_KINDS = ("collect",)  # shared/KIND-* folders that are recomputed rather than packed (activations)


@dataclass
class PackSummary:
    """What a pack holds: files and bytes per part, and the done trials whose artifacts were left out."""

    dest: Path
    parts: dict[str, tuple[int, int]] = field(default_factory=dict)  # part -> (files, bytes)
    left_out: list[str] = field(default_factory=list)  # keys of done trials whose artifacts were left out
    status: dict[str, int] = field(default_factory=dict)  # the packed ledger's trial counts by status
    stripped: int = 0  # evaluation files rewritten without the dataset's text (pack_text.py)

    @property
    def bytes(self) -> int:
        return sum(b for _, b in self.parts.values())

    def line(self) -> str:
        parts = ", ".join(f"{k} {n} file(s) {b / 1e6:.2f} MB" for k, (n, b) in sorted(self.parts.items()))
        st = ", ".join(f"{k} {v}" for k, v in sorted(self.status.items()))
        out = f"packed {self.bytes / 1e6:.2f} MB into {self.dest}: {parts}; trials: {st}"
        if self.stripped:
            out += f"; {self.stripped} evaluation file(s) without the dataset's questions and answers"
        if self.left_out:
            out += (f"; {len(self.left_out)} trial(s) packed without their activations (run again only if a trial "
                    "still to run needs them)")
        return out


def _part_of(rel: Path) -> str:
    """The part of the run a file belongs to, for the summary: trials, shared/KIND, ledger."""
    if rel.parts[0] == SHARED and len(rel.parts) > 1:
        return f"shared/{rel.parts[1].split('-', 1)[0]}"
    return rel.parts[0]


def _left_out(rel: Path, activations: bool) -> bool:
    """Whether a run-folder path stays out of the pack."""
    if any(TMP_TAG in p for p in rel.parts):  # a writer's temporary file or folder
        return True
    if rel.parts[0] not in (TRIALS, SHARED):  # the ledger (backed up apart), its WAL, the lock, reports
        return True
    return (not activations and rel.parts[0] == SHARED and len(rel.parts) > 1
            and rel.parts[1].split("-", 1)[0] in LEFT_OUT_KINDS)


def _backup_ledger(src: Path, dst: Path) -> None:
    """A consistent copy of a (possibly live) SQLite ledger, WAL included."""
    try:
        s = sqlite3.connect(f"file:{src}?mode=ro", uri=True, timeout=60.0)
    except sqlite3.Error as e:
        raise ConfigError(f"{src}: cannot open the ledger to pack it ({e})") from None
    try:
        d = sqlite3.connect(str(dst))
        try:
            s.backup(d)
            d.execute("PRAGMA journal_mode = DELETE")  # one self-contained file, no -wal beside it
        finally:
            d.close()
    except sqlite3.DatabaseError as e:
        raise ConfigError(f"{src}: the ledger could not be read to pack it ({e}); `locaudit run STUDY --out "
                          f"{src.parent} --repair` rebuilds it from the trial folders") from None
    finally:
        s.close()


def _mark_left_out(db: Path, activations: bool) -> tuple[list[str], dict[str, int]]:
    """In the packed ledger, each done trial whose artifacts were left out gets a 'packed' event: it stays done
    while no trial still to run reads them, and runs again, without booking lost time, once one does
    (ledger.recheck_done). Returns their keys and the trial counts by status."""
    left: list[str] = []
    conn = sqlite3.connect(str(db), isolation_level=None)
    try:
        conn.row_factory = sqlite3.Row
        conn.execute("BEGIN IMMEDIATE")
        for r in conn.execute("SELECT key, artifacts FROM trials WHERE status = 'done'").fetchall():
            arts = json.loads(r["artifacts"] or "{}")
            rels = [Path(arts[k]) for k in ARTIFACT_DIRS if isinstance(arts.get(k), str) and arts[k]]
            if any(rel.parts and not rel.is_absolute() and _left_out(rel, activations) for rel in rels):
                conn.execute("INSERT INTO events (key, event, time, session, detail) VALUES (?, ?, ?, NULL, ?)",
                             (r["key"], PACKED_EVENT, time.time(), "packed without its artifacts (recomputable): "
                              "runs again if a trial still to run needs them"))
                left.append(r["key"])
        conn.execute("COMMIT")
        status = {row[0]: int(row[1]) for row in
                  conn.execute("SELECT status, COUNT(*) FROM trials WHERE in_spec = 1 GROUP BY status")}
    finally:
        conn.close()
    return left, status


def pack_run(run_dir: str | Path, dest: str | Path, activations: bool = False) -> PackSummary:
    """Copy a run folder's results (not its recomputable activations, nor its report) into `dest`, atomically.

    `activations`: also copy shared/collect-* (the probe examples' per-head activations, tens of MB), so that
    their trials need not run again. `dest` is replaced as a whole if it exists and is a pack (it holds a ledger);
    any other existing folder is refused."""
    run, dest = Path(run_dir).resolve(), Path(dest).resolve()
    rd = RunDir(run)
    if not (run / LEDGER_FILE).is_file():
        raise ConfigError(f"{run} is not a run folder with a ledger ({run / LEDGER_FILE} is missing)")
    if dest == run or run in dest.parents or dest in run.parents:
        raise ConfigError(f"--out {dest}: a pack goes outside the run folder {run}, not in or above it")
    if dest.exists() and (not dest.is_dir() or (any(dest.iterdir()) and not (dest / LEDGER_FILE).is_file())):
        raise ConfigError(f"--out {dest} exists and is not an earlier pack (no {LEDGER_FILE} in it); "
                          "choose a new folder")
    if lock_held(dest / ".lock"):
        raise ConfigError(f"--out {dest}: a locaudit run is using it (its lock {dest / '.lock'} is held); a pack "
                          "would replace the folder under it: pack elsewhere, or stop that run first")
    summary = PackSummary(dest)
    with atomic_dir(dest) as tmp:
        _backup_ledger(rd.ledger, tmp / LEDGER_FILE)  # first: every trial it calls done has its folders sealed
        for sub in (TRIALS, SHARED):
            top = run / sub
            if not top.is_dir():
                continue
            for src in sorted(top.rglob("*")):
                rel = src.relative_to(run)
                if src.is_dir() or _left_out(rel, activations) or src.is_symlink():
                    continue
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target)
        summary.stripped = strip_dataset_text(tmp)
        for f in sorted(tmp.rglob("*")):
            rel = f.relative_to(tmp)
            if f.is_file() and rel.parts[0] in (TRIALS, SHARED):
                n, b = summary.parts.get(_part_of(rel), (0, 0))
                summary.parts[_part_of(rel)] = (n + 1, b + f.stat().st_size)
        summary.left_out, summary.status = _mark_left_out(tmp / LEDGER_FILE, activations)
        summary.parts[LEDGER_FILE] = (1, (tmp / LEDGER_FILE).stat().st_size)
    return summary
