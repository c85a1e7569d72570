"""The run's ledger: an SQLite database (WAL) with one row per trial.

Only the driver writes (workers return their results), each trial's end is one transaction, and a
lock file keeps a second driver out of the same run folder. So a row marked ``running`` at start-up was
left by a process that died: `reset_interrupted` puts it back to ``pending``.

Tables: ``trials`` (key, kind, name, grp, spec JSON, status, attempts, timings, CPU seconds, worker, metrics JSON,
artifacts JSON, error, in_spec), ``events`` (start / done / failed / reset per trial, for audits) and
``meta`` (the study spec, so `locaudit report RUN` needs nothing else).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sqlite3
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from locaudit.errors import ConfigError
from locaudit.study.trials import Trial

STATUSES = ("pending", "running", "done", "failed")
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS trials (
    key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    grp TEXT NOT NULL,
    spec TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    duration_s REAL,
    cpu_s REAL,
    worker TEXT,
    session TEXT,
    metrics TEXT,
    artifacts TEXT,
    error TEXT,
    in_spec INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS trials_status ON trials(status);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    event TEXT NOT NULL,
    time REAL NOT NULL,
    session TEXT,
    detail TEXT
);
"""
LEDGER_FILE = "ledger.sqlite"


class Ledger:
    """Open (creating if needed) the ledger of a run folder. `writer=True` takes the run's lock."""

    def __init__(self, run_dir: str | os.PathLike, writer: bool = False, busy_timeout_s: float = 60.0) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LEDGER_FILE
        self.session = uuid.uuid4().hex[:12]
        self._lock_fd: int | None = None
        if writer:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._take_lock()
        elif not self.path.exists():
            raise ConfigError(f"{self.run_dir} is not a run folder: {self.path} is missing")
        self.conn = sqlite3.connect(str(self.path), timeout=busy_timeout_s, isolation_level=None,
                                    check_same_thread=False)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        if writer:
            self.conn.execute("PRAGMA journal_mode = WAL")
            self.conn.execute("PRAGMA synchronous = NORMAL")
            self.conn.executescript(SCHEMA)
            cols = {r["name"] for r in self.conn.execute("PRAGMA table_info(trials)")}
            if "cpu_s" not in cols:  # ledgers written before CPU time was recorded
                self.conn.execute("ALTER TABLE trials ADD COLUMN cpu_s REAL")

    # ------------------------------------------------------------------ lifecycle
    def _take_lock(self) -> None:
        fd = os.open(self.run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"another locaudit run is using {self.run_dir} (its lock {self.run_dir / '.lock'} "
                              "is held); wait for it to finish or use another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()}:{os.getpid()}\n".encode())
        self._lock_fd = fd

    def close(self) -> None:
        self.conn.close()
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic write: BEGIN IMMEDIATE .. COMMIT (ROLLBACK on error)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def _event(self, c: sqlite3.Connection, key: str, event: str, detail: str | None = None) -> None:
        c.execute("INSERT INTO events (key, event, time, session, detail) VALUES (?, ?, ?, ?, ?)",
                  (key, event, time.time(), self.session, detail))

    # ------------------------------------------------------------------ meta
    def set_meta(self, k: str, v: Any) -> None:
        with self.transaction() as c:
            c.execute("INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)", (k, json.dumps(v, sort_keys=True)))

    def get_meta(self, k: str, default: Any = None) -> Any:
        row = self.conn.execute("SELECT v FROM meta WHERE k = ?", (k,)).fetchone()
        return json.loads(row["v"]) if row else default

    # ------------------------------------------------------------------ trials
    def sync(self, trials: Iterable[Trial]) -> dict[str, int]:
        """Insert new trials as pending; mark which rows belong to the current spec. Existing rows keep
        their status and results (a key is its content, so an old row is the same trial)."""
        trials = list(trials)
        now = time.time()
        added = 0
        with self.transaction() as c:
            c.execute("UPDATE trials SET in_spec = 0")
            for t in trials:
                cur = c.execute(
                    "INSERT OR IGNORE INTO trials (key, kind, name, grp, spec, status, created, in_spec) "
                    "VALUES (?, ?, ?, ?, ?, 'pending', ?, 1)",
                    (t.key, t.kind, t.name, t.group, json.dumps(t.to_dict(), sort_keys=True), now))
                if cur.rowcount:
                    added += 1
                else:
                    c.execute("UPDATE trials SET in_spec = 1 WHERE key = ?", (t.key,))
        return {"total": len(trials), "added": added}

    def reset_interrupted(self) -> list[str]:
        """Rows left 'running' by a dead driver (we hold the lock, so no live one exists) -> 'pending'."""
        with self.transaction() as c:
            keys = [r["key"] for r in c.execute("SELECT key FROM trials WHERE status = 'running'")]
            for k in keys:
                c.execute("UPDATE trials SET status = 'pending', worker = NULL WHERE key = ?", (k,))
                self._event(c, k, "reset", "interrupted: was running when its process died")
        return keys

    def retry_failed(self) -> list[str]:
        with self.transaction() as c:
            keys = [r["key"] for r in c.execute("SELECT key FROM trials WHERE status = 'failed' AND in_spec = 1")]
            for k in keys:
                c.execute("UPDATE trials SET status = 'pending' WHERE key = ?", (k,))
                self._event(c, k, "retry")
        return keys

    def mark_running(self, keys: Iterable[str], worker: str = "") -> None:
        now = time.time()
        with self.transaction() as c:
            for k in keys:
                cur = c.execute(
                    "UPDATE trials SET status = 'running', attempts = attempts + 1, started = ?, finished = NULL, "
                    "duration_s = NULL, cpu_s = NULL, worker = ?, session = ?, error = NULL WHERE key = ? AND status = 'pending'",
                    (now, worker, self.session, k))
                if cur.rowcount != 1:
                    raise RuntimeError(f"trial {k} is not pending; cannot start it")
                self._event(c, k, "start", worker)

    def finish(self, key: str, status: str, metrics: dict | None = None, artifacts: dict | None = None,
               error: str | None = None, started: float | None = None, finished: float | None = None,
               worker: str | None = None, cpu_s: float | None = None) -> None:
        """Record a trial's end in one transaction (status done or failed)."""
        if status not in ("done", "failed"):
            raise ValueError(f"finish: status must be 'done' or 'failed', got {status!r}")
        finished = finished or time.time()
        with self.transaction() as c:
            row = c.execute("SELECT status, started FROM trials WHERE key = ?", (key,)).fetchone()
            if row is None:
                raise KeyError(f"no trial {key} in the ledger")
            if row["status"] == "done":
                raise RuntimeError(f"trial {key} is already done; refusing to record it twice")
            started = started or row["started"] or finished
            c.execute(
                "UPDATE trials SET status = ?, finished = ?, started = ?, duration_s = ?, cpu_s = ?, metrics = ?, "
                "artifacts = ?, error = ?, worker = COALESCE(?, worker) WHERE key = ?",
                (status, finished, started, finished - started, cpu_s, json.dumps(metrics or {}, sort_keys=True),
                 json.dumps(artifacts or {}, sort_keys=True), error, worker, key))
            self._event(c, key, status, (error or "")[-2000:] or None)

    def release(self, keys: Iterable[str]) -> None:
        """Put started trials back to pending (a clean stop, e.g. Ctrl-C)."""
        with self.transaction() as c:
            for k in keys:
                c.execute("UPDATE trials SET status = 'pending' WHERE key = ? AND status = 'running'", (k,))
                self._event(c, k, "reset", "released")

    # ------------------------------------------------------------------ reading
    def rows(self, in_spec_only: bool = True, status: str | None = None) -> list[dict]:
        q = "SELECT * FROM trials"
        cond, args = [], []
        if in_spec_only:
            cond.append("in_spec = 1")
        if status:
            cond.append("status = ?")
            args.append(status)
        if cond:
            q += " WHERE " + " AND ".join(cond)
        return [_decode(r) for r in self.conn.execute(q + " ORDER BY created, rowid", args)]

    def row(self, key: str) -> dict | None:
        r = self.conn.execute("SELECT * FROM trials WHERE key = ?", (key,)).fetchone()
        return _decode(r) if r else None

    def status_of(self, keys: Iterable[str] | None = None) -> dict[str, str]:
        rows = self.conn.execute("SELECT key, status FROM trials").fetchall()
        wanted = set(keys) if keys is not None else None
        return {r["key"]: r["status"] for r in rows if wanted is None or r["key"] in wanted}

    def counts(self, in_spec_only: bool = True) -> dict[str, int]:
        q = "SELECT status, COUNT(*) AS n FROM trials" + (" WHERE in_spec = 1" if in_spec_only else "") + " GROUP BY status"
        out = {s: 0 for s in STATUSES}
        out.update({r["status"]: r["n"] for r in self.conn.execute(q)})
        return out

    def events(self, key: str | None = None) -> list[dict]:
        if key is None:
            return [dict(r) for r in self.conn.execute("SELECT * FROM events ORDER BY id")]
        return [dict(r) for r in self.conn.execute("SELECT * FROM events WHERE key = ? ORDER BY id", (key,))]


def _decode(r: sqlite3.Row) -> dict:
    d = dict(r)
    d["spec"] = json.loads(d["spec"]) if d["spec"] else None
    for f in ("metrics", "artifacts"):
        d[f] = json.loads(d[f]) if d[f] else {}
    return d
