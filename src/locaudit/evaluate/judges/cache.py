"""A disk cache of judgements keyed by (judge name, question, answer): a second request for the same
pair never reaches the judge. SQLite in WAL mode, so parallel workers can share one file safely."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Sequence

from locaudit.errors import DataError
from locaudit.evaluate.judges.base import Judge, JudgeScore, check_pairs
from locaudit.io import cache_dir

_SCHEMA = """
CREATE TABLE IF NOT EXISTS judgements (
    key TEXT PRIMARY KEY,
    judge TEXT NOT NULL,
    question TEXT NOT NULL,
    answer TEXT NOT NULL,
    truth REAL,
    info REAL,
    created REAL NOT NULL
)
"""


def judgement_key(judge: str, question: str, answer: str) -> str:
    h = hashlib.sha256()
    for part in (judge, question, answer):
        b = part.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def default_cache_path() -> Path:
    return cache_dir("judgements") / "judgements.sqlite"


class JudgementStore:
    """The SQLite file: `get(keys)` and `put(rows)`, each in one transaction."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        try:
            with self._conn() as con:
                con.execute(_SCHEMA)
        except sqlite3.DatabaseError as e:
            raise DataError(f"{self.path}: not a judgement cache (SQLite says: {e}); delete it or pass another path") from e

    def _conn(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=NORMAL")
            self._local.con = _Tx(con)
            con = self._local.con
        return con

    def get(self, keys: Sequence[str]) -> dict[str, tuple[float | None, float | None]]:
        out: dict[str, tuple[float | None, float | None]] = {}
        con = self._conn()
        for s in range(0, len(keys), 500):
            chunk = list(keys[s: s + 500])
            marks = ",".join("?" * len(chunk))
            with closing(con.raw.execute(f"SELECT key, truth, info FROM judgements WHERE key IN ({marks})", chunk)) as cur:
                for key, truth, info in cur:
                    out[key] = (truth, info)
        return out

    def put(self, rows: Sequence[tuple[str, str, str, str, float | None, float | None]]) -> None:
        """rows: (key, judge, question, answer, truth, info)."""
        now = time.time()
        with self._conn() as con:
            con.raw.executemany(
                "INSERT OR REPLACE INTO judgements (key, judge, question, answer, truth, info, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(*r, now) for r in rows],
            )

    def count(self, judge: str | None = None) -> int:
        con = self._conn().raw
        if judge is None:
            return con.execute("SELECT COUNT(*) FROM judgements").fetchone()[0]
        return con.execute("SELECT COUNT(*) FROM judgements WHERE judge = ?", (judge,)).fetchone()[0]


class _Tx:
    """`with` = one IMMEDIATE transaction (commit on success, rollback on error)."""

    def __init__(self, con: sqlite3.Connection) -> None:
        self.raw = con

    def __enter__(self) -> "_Tx":
        self.raw.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.raw.execute("COMMIT" if exc_type is None else "ROLLBACK")

    def execute(self, *args):
        return self.raw.execute(*args)


class CachedJudge(Judge):
    """Wraps a judge with the disk cache: only pairs never judged before (by this judge name) reach
    the inner judge, each once per call even if repeated."""

    def __init__(self, judge: Judge, path: str | Path | None = None) -> None:
        self.inner = judge
        self.name = judge.name
        self.kinds = judge.kinds
        self.store = JudgementStore(path if path is not None else default_cache_path())
        self.hits = 0
        self.misses = 0

    @property
    def path(self) -> Path:
        return self.store.path

    def score(self, questions: Sequence[str], answers: Sequence[str]) -> list[JudgeScore]:
        check_pairs(questions, answers)
        keys = [judgement_key(self.name, q, a) for q, a in zip(questions, answers)]
        found = self.store.get(list(dict.fromkeys(keys)))
        todo: dict[str, tuple[str, str]] = {}
        for k, q, a in zip(keys, questions, answers):
            if k not in found and k not in todo:
                todo[k] = (q, a)
        self.hits += sum(1 for k in keys if k in found)
        self.misses += len(todo)
        if todo:
            qs, as_ = zip(*todo.values())
            scores = self.inner.score(list(qs), list(as_))
            if len(scores) != len(todo):
                raise RuntimeError(f"judge {self.name!r} returned {len(scores)} scores for {len(todo)} answers")
            rows = []
            for k, (q, a), s in zip(todo, todo.values(), scores):
                found[k] = (s.truth, s.info)
                rows.append((k, self.name, q, a, s.truth, s.info))
            self.store.put(rows)
        return [JudgeScore(*found[k]) for k in keys]
