"""The run's ledger: an SQLite database (WAL) with one row per trial.

Only the driver writes (workers return their results), each trial's end is one transaction, and a
lock file keeps a second driver out of the same run folder. So a row marked ``running`` at start-up was
left by a process that died: `reset_interrupted` puts it back to ``pending``, booking the time it ran (up
to its run's last heartbeat, `Heartbeat`) as a ``lost`` event, as a stop (`release`) and a retry of a failed
trial (`retry_failed`) do: `lost_time` sums them, so a trial's cost counts its attempts that did not finish.

Tables: ``trials`` (key, kind, name, grp, spec JSON, status, attempts, timings, CPU seconds, worker, metrics JSON,
artifacts JSON, error, in_spec), ``events`` (start / done / failed / reset / lost per trial, for audits and costs) and
``meta`` (the study spec, so `locaudit report RUN` needs nothing else).

Damage: a ledger that is not an SQLite database, is truncated or fails SQLite's quick check is refused
with a message naming it; so is an empty (0-byte) or missing one beside trial folders (its history
would be lost). `repair` rebuilds it from the trial folders: every finished trial leaves
``trials/KEY/result.json`` (its metrics and artifacts), and its artifact folders carry checksums
(``checksums.json``, written last), so a trial is restored as done only where its files are intact.
Those records, checksums and staging folders are study/records.py's (their names are importable from here too).
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import socket
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from locaudit.errors import ConfigError
from locaudit.io import clean_tree_temps, temp_sibling
from locaudit.io import verify_checksums  # noqa: F401  (re-exported)
from locaudit.study.rundir import LEDGER_FILE, RECORD_FILE, RunDir  # noqa: F401  (re-exported)
from locaudit.study.records import (ARTIFACT_DIRS, METRIC_BOUND, artifact_dir, check_artifacts,  # noqa: F401
                                    commit_trial_folders, discard_trial_folders, invalid_metrics, metric_problem,
                                    nonfinite_message, nonfinite_metrics, read_trial_record, record_problem,
                                    seal_artifacts, staged_trial_folders, write_trial_record)  # (re-exported)
from locaudit.study.trials import Trial

log = logging.getLogger(__name__)

STATUSES = ("pending", "running", "done", "failed")
LOST_EVENT = "lost"  # the time an attempt of a trial ran without finishing (Ledger.lost_time)
HEARTBEAT_PREFIX = "heartbeat:"  # meta key of a session's last sign of life (Heartbeat)
PACKED_EVENT = "packed"  # a done trial whose artifact folders `locaudit pack` left out (study/pack.py)
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
    batch REAL,
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
_SQLITE_MAGIC = b"SQLite format 3\x00"


def repair_hint(run_dir: Path) -> str:
    return (f"`locaudit run STUDY --out {run_dir} --repair` rebuilds it from the trial folders "
            "(the damaged file is kept as a backup)")


def has_trial_folders(run_dir: Path) -> bool:
    """Whether a run folder holds results of earlier trials (trials/ or shared/ with content)."""
    return RunDir(run_dir).has_results()


def ledger_file_problem(run_dir: Path) -> str | None:
    """What is wrong with a run folder's ledger file before SQLite opens it (None: nothing seen)."""
    path = run_dir / LEDGER_FILE
    if not path.exists():
        if has_trial_folders(run_dir):
            return f"{path} is missing but {run_dir} holds trial folders (its history would be lost)"
        return None
    size = path.stat().st_size
    if size == 0:
        if has_trial_folders(run_dir):
            return f"{path} is empty (0 bytes) but {run_dir} holds trial folders (its history would be lost)"
        return None
    with open(path, "rb") as f:
        head = f.read(len(_SQLITE_MAGIC))
    if head != _SQLITE_MAGIC:
        return f"{path} is damaged: not an SQLite database ({size} bytes starting {head[:8]!r})"
    return None


def _try_lock(fd: int) -> bool:
    """Take an exclusive flock on `fd` without waiting; False where another process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def lock_held(lock: Path) -> bool:
    """Whether a live process holds a run folder's lock file (a Ledger's writer takes it with flock)."""
    if not lock.exists():
        return False
    fd = os.open(lock, os.O_RDONLY)
    try:
        return not _try_lock(fd)
    finally:
        os.close(fd)  # closing releases a lock taken here


class LedgerDamagedError(ConfigError):
    """The ledger file is damaged, truncated, empty or missing beside trial folders."""


class Ledger:
    """Open (creating if needed) the ledger of a run folder. `writer=True` takes the run's lock."""

    def __init__(self, run_dir: str | os.PathLike, writer: bool = False, busy_timeout_s: float = 60.0) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LEDGER_FILE
        self.session = uuid.uuid4().hex[:12]
        self._lock_fd: int | None = None
        self._busy_timeout_s = busy_timeout_s
        if not writer:
            if self.run_dir.exists() and not self.run_dir.is_dir():
                raise ConfigError(f"{self.run_dir} is not a run folder: it is a file")
            if not self.path.exists() and not has_trial_folders(self.run_dir):
                raise ConfigError(f"{self.run_dir} is not a run folder: {self.path} is missing")
        problem = ledger_file_problem(self.run_dir)
        if problem:
            raise LedgerDamagedError(f"{problem}; {repair_hint(self.run_dir)}")
        if not writer and self.path.stat().st_size == 0:
            raise ConfigError(f"{self.run_dir} is not a run folder: {self.path} is empty")
        if writer:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"cannot create the run folder {self.run_dir}: {e.strerror or e}") from None
            self._take_lock()
        try:
            self._connect(writer)
        except LedgerDamagedError:
            self.close()
            raise
        except sqlite3.OperationalError as e:  # a read-only folder, a full disk, an I/O error: not damage
            self.close()
            raise ConfigError(f"{self.path}: cannot use the ledger ({e}); check that the run folder is writable, "
                              "the disk has space and no file-size limit (ulimit -f) is in the way, then rerun "
                              "(nothing was changed)") from None
        except sqlite3.DatabaseError as e:
            self.close()
            raise LedgerDamagedError(f"{self.path} is damaged ({e}); {repair_hint(self.run_dir)}") from None
        if writer:
            clean_tree_temps(self.run_dir)  # what killed writers left behind (we hold the lock)

    def _connect(self, writer: bool, fresh: bool = False) -> None:
        """Open the database; `fresh`: a new file that `repair` fills (so trial folders beside it are expected)."""
        self.conn = sqlite3.connect(str(self.path), timeout=self._busy_timeout_s, isolation_level=None,
                                    check_same_thread=False)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_s * 1000)}")
        check = self.conn.execute("PRAGMA quick_check").fetchall()
        if [tuple(r) for r in check] != [("ok",)]:
            raise sqlite3.DatabaseError("quick_check: " + "; ".join(str(r[0]) for r in check[:3])[:300])
        problem = schema_problem(self.conn)
        if problem is not None and (problem != "no tables" or not writer or (not fresh and has_trial_folders(self.run_dir))):
            if problem == "no tables" and not has_trial_folders(self.run_dir):
                raise ConfigError(f"{self.run_dir} is not a run folder: {self.path} holds no ledger tables")
            raise LedgerDamagedError(
                f"{self.path} is a valid SQLite file but not a locaudit ledger this version can read ({problem}); "
                f"nothing was changed. `locaudit report` and `locaudit run` refuse it: restore the run's ledger, or "
                f"{repair_hint(self.run_dir)}")
        if writer:
            self.conn.execute("PRAGMA journal_mode = WAL")
            self.conn.execute("PRAGMA synchronous = NORMAL")
            self.conn.executescript(SCHEMA)
            cols = {r["name"] for r in self.conn.execute("PRAGMA table_info(trials)")}
            if "cpu_s" not in cols:  # ledgers written before CPU time was recorded
                self.conn.execute("ALTER TABLE trials ADD COLUMN cpu_s REAL")
            if "batch" not in cols:  # ledgers written before batches were stamped (their rows keep NULL)
                self.conn.execute("ALTER TABLE trials ADD COLUMN batch REAL")

    # ------------------------------------------------------------------ lifecycle
    def _take_lock(self) -> None:
        try:
            fd = os.open(self.run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"cannot write the lock file {self.run_dir / '.lock'}: {e.strerror or e} "
                              "(is the run folder read-only? use another --out)") from None
        if not _try_lock(fd):
            os.close(fd)
            raise ConfigError(f"another locaudit run is using {self.run_dir} (its lock {self.run_dir / '.lock'} "
                              "is held); wait for it to finish or use another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()}:{os.getpid()}\n".encode())
        self._lock_fd = fd

    def close(self) -> None:
        if getattr(self, "conn", None) is not None:
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
        """One atomic write: BEGIN IMMEDIATE .. COMMIT (ROLLBACK on error). A write SQLite cannot make (a full
        disk, a read-only folder, an I/O error) is one ConfigError naming the ledger; nothing of it is kept."""
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise self._write_error(e) from None
        try:
            yield self.conn
            self.conn.execute("COMMIT")
        except sqlite3.OperationalError as e:
            self._rollback()
            raise self._write_error(e) from None
        except BaseException:
            self._rollback()
            raise

    def _rollback(self) -> None:
        try:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # the transaction is gone with the failed statement

    def _write_error(self, e: sqlite3.OperationalError) -> ConfigError:
        return ConfigError(f"{self.path}: cannot write the ledger ({e}); free disk space or make the run folder "
                           "writable, then rerun: finished trials are kept, the interrupted ones run again")

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
        """Rows left 'running' by a dead driver (we hold the lock, so no live one exists) -> 'pending'. The time
        they ran is kept as 'lost' events: up to their session's last heartbeat (`Heartbeat`), else unknown."""
        with self.transaction() as c:
            rows = c.execute("SELECT * FROM trials WHERE status = 'running'").fetchall()
            beats = {r["k"][len(HEARTBEAT_PREFIX):]: json.loads(r["v"])
                     for r in c.execute("SELECT k, v FROM meta WHERE k LIKE ?", (HEARTBEAT_PREFIX + "%",))}
            self._record_lost(c, rows, lambda r: beats.get(r["session"]), "interrupted", exact_end=False)
            # a dead session's heartbeat has done its job once its trials' time is booked (we hold the lock)
            c.execute("DELETE FROM meta WHERE k LIKE ? AND k != ?", (HEARTBEAT_PREFIX + "%", HEARTBEAT_PREFIX + self.session))
            for r in rows:
                c.execute("UPDATE trials SET status = 'pending', worker = NULL WHERE key = ?", (r["key"],))
                self._event(c, r["key"], "reset", "interrupted: was running when its process died")
        return [r["key"] for r in rows]

    def retry_failed(self) -> list[str]:
        with self.transaction() as c:
            rows = c.execute("SELECT * FROM trials WHERE status = 'failed' AND in_spec = 1").fetchall()
            self._record_lost(c, rows, lambda r: r["finished"], "failed")
            for r in rows:
                c.execute("UPDATE trials SET status = 'pending' WHERE key = ?", (r["key"],))
                self._event(c, r["key"], "retry")
        return [r["key"] for r in rows]

    def _record_lost(self, c: sqlite3.Connection, rows: list, end_of: Callable[[Any], float | None], why: str,
                     exact_end: bool = True) -> None:
        """A 'lost' event per row: its share of the time its attempt ran before it was reset or retried. The trials
        of one batch ran together (`mark_running` stamps a batch at once: its `batch` column, which a trial's end
        does not overwrite; a failed batch's trials share the time of its last finished trial), so the batch's span,
        from its start (or the end of the last trial of the same batch recorded done since) to its end, is shared
        equally among them, as a finished batch's time is among its trials. Trials of other batches of the session
        (several in flight, with Ray) do not shorten it. Rows of a ledger from before batches were stamped (`batch`
        NULL) fall back to their session: any trial of it done since the start counts, so with several batches in
        flight a share can only be too small. `exact_end`: the end is when the batch stopped (a failure, a stop),
        so trials done after it belong to later work; else (a kill) it is the last heartbeat, and every trial of
        the batch done since its start came before the kill."""
        groups: dict[tuple, list] = {}
        for r in rows:
            if r["started"] is not None:
                batch = r["batch"] if "batch" in r.keys() else None
                groups.setdefault((r["session"], batch if batch is not None else r["started"], batch is not None),
                                  []).append(r)
        for (session, start, stamped), members in groups.items():
            end = max((e for e in (end_of(r) for r in members) if e is not None), default=None)
            upto = end if exact_end and end is not None else math.inf
            q = "SELECT MAX(finished) AS f FROM trials WHERE session = ? AND status = 'done' AND finished >= ? AND finished <= ?"
            args: tuple = (session, start, upto)
            if stamped:  # the batch's own trials only; unstamped (old) rows: any trial of the session
                q, args = q + " AND batch = ?", args + (start,)
            covered = c.execute(q, args).fetchone()["f"]
            share = None if end is None else max(0.0, end - max(start, covered or start)) / len(members)
            for r in members:
                self._event(c, r["key"], LOST_EVENT, json.dumps({"seconds": share, "why": why}))

    def lost_time(self) -> dict[str, dict[str, float]]:
        """{key: {"lost_s": seconds, "lost_unknown": attempts}}: what each trial's attempts that did not finish
        (killed, stopped, failed and retried) ran, known, and how many of them ran for an unknown time (killed
        before heartbeats were written, or reset by a locaudit that did not yet book lost time: a 'reset' or
        'retry' event without its 'lost' one). A trial's cost is its duration_s plus lost_s."""
        out: dict[str, dict[str, float]] = {}
        ends: dict[str, int] = {}  # resets and retries, each of which ended an attempt
        for r in self.conn.execute("SELECT key, event, detail FROM events WHERE event IN (?, 'reset', 'retry')",
                                   (LOST_EVENT,)):
            if r["event"] != LOST_EVENT:
                ends[r["key"]] = ends.get(r["key"], 0) + 1
                continue
            d = out.setdefault(r["key"], {"lost_s": 0.0, "lost_unknown": 0, "_n": 0})
            try:
                detail = json.loads(r["detail"] or "{}")
                sec, why = detail.get("seconds"), detail.get("why")
            except (ValueError, AttributeError):
                sec, why = None, None
            d["_n"] += why != "invalid"  # an invalidated attempt has no reset or retry event to pair with
            if isinstance(sec, (int, float)) and math.isfinite(sec):
                d["lost_s"] += float(sec)
            else:
                d["lost_unknown"] += 1
        for key, n in ends.items():
            d = out.setdefault(key, {"lost_s": 0.0, "lost_unknown": 0, "_n": 0})
            d["lost_unknown"] += max(0, n - d["_n"])
        for d in out.values():
            del d["_n"]
        return out

    def rows_with_cost(self, in_spec_only: bool = True) -> list[dict]:
        """`rows()`, each with `lost_s` and `lost_unknown` (`lost_time`; 0 where none)."""
        lost = self.lost_time()
        return [{**r, **lost.get(r["key"], {"lost_s": 0.0, "lost_unknown": 0})} for r in self.rows(in_spec_only)]

    def beat(self, conn: sqlite3.Connection | None = None) -> None:
        """This session's heartbeat: the time it was last known alive (meta heartbeat:SESSION)."""
        (conn or self.conn).execute("INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)",
                                    (HEARTBEAT_PREFIX + self.session, json.dumps(time.time())))

    def mark_running(self, keys: Iterable[str], worker: str = "") -> None:
        now = time.time()
        with self.transaction() as c:
            for k in keys:
                cur = c.execute(
                    "UPDATE trials SET status = 'running', attempts = attempts + 1, started = ?, batch = ?, "
                    "finished = NULL, duration_s = NULL, cpu_s = NULL, worker = ?, session = ?, error = NULL "
                    "WHERE key = ? AND status = 'pending'",
                    (now, now, worker, self.session, k))
                if cur.rowcount != 1:
                    raise RuntimeError(f"trial {k} is not pending; cannot start it")
                self._event(c, k, "start", worker)

    def finish(self, key: str, status: str, metrics: dict | None = None, artifacts: dict | None = None,
               error: str | None = None, started: float | None = None, finished: float | None = None,
               worker: str | None = None, cpu_s: float | None = None) -> None:
        """Record a trial's end in one transaction (status done or failed)."""
        if status not in ("done", "failed"):
            raise ValueError(f"finish: status must be 'done' or 'failed', got {status!r}")
        bad = nonfinite_metrics(metrics or {})
        if bad:  # nothing non-finite reaches the ledger (runner._record turns such a trial into a failure)
            raise ValueError(f"finish: trial {key} has non-finite or invalid metric(s) {bad}")
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

    def invalidate(self, key: str, reason: str, lost: bool = True) -> None:
        """A done trial whose artifacts failed their check goes back to pending (it will run again). The attempt
        that produced them ran for nothing: its time is kept as a 'lost' event, so the trial's cost counts it
        (`lost=False`: artifacts left out of a pack on purpose, recomputed; nothing was wasted)."""
        with self.transaction() as c:
            row = c.execute("SELECT duration_s FROM trials WHERE key = ? AND status = 'done'", (key,)).fetchone()
            if row is None:
                return
            c.execute("UPDATE trials SET status = 'pending', worker = NULL WHERE key = ?", (key,))
            self._event(c, key, "invalid", reason[-2000:])
            if lost:
                self._event(c, key, LOST_EVENT, json.dumps({"seconds": row["duration_s"], "why": "invalid"}))

    def keys_with_event(self, event: str) -> set[str]:
        """The keys of the trials that have at least one `event` event."""
        return {r["key"] for r in self.conn.execute("SELECT DISTINCT key FROM events WHERE event = ?", (event,))}

    def release(self, keys: Iterable[str]) -> None:
        """Put started trials back to pending (a clean stop, e.g. Ctrl-C), keeping the time they ran."""
        keys = list(keys)
        now = time.time()
        with self.transaction() as c:
            rows = [r for k in keys for r in c.execute("SELECT * FROM trials WHERE key = ? AND status = 'running'", (k,))]
            self._record_lost(c, rows, lambda r: now, "stopped")
            for r in rows:
                c.execute("UPDATE trials SET status = 'pending' WHERE key = ? AND status = 'running'", (r["key"],))
                self._event(c, r["key"], "reset", "released")

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


# the columns every ledger has (cpu_s is added to older ledgers when a run opens them)
COLUMNS = {
    "meta": {"k", "v"},
    "trials": {"key", "kind", "name", "grp", "spec", "status", "attempts", "created", "started", "finished",
               "duration_s", "worker", "session", "metrics", "artifacts", "error", "in_spec"},
    "events": {"id", "key", "event", "time", "session", "detail"},
}


def schema_problem(conn: sqlite3.Connection) -> str | None:
    """None for a locaudit ledger's tables and columns; "no tables" for a new (empty) database; else what
    differs (missing tables, missing columns)."""
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    tables.discard("sqlite_sequence")
    if not tables:
        return "no tables"
    missing = sorted(set(COLUMNS) - tables)
    if missing:
        return f"tables {sorted(tables)[:6]}; missing table(s) {missing}"
    for t, want in COLUMNS.items():
        have = {r[1] for r in conn.execute(f"PRAGMA table_info({t})")}
        lack = sorted(want - have)
        if lack:
            return f"table {t!r} lacks column(s) {lack}"
    return None


def _decode(r: sqlite3.Row) -> dict:
    d = dict(r)
    d["spec"] = json.loads(d["spec"]) if d["spec"] else None
    for f in ("metrics", "artifacts"):
        d[f] = json.loads(d[f]) if d[f] else {}
    return d


class Heartbeat:
    """`with Heartbeat(ledger):` marks the ledger's session alive every `interval` seconds from a thread of its own
    (with its own connection), so that a run killed without warning (SIGKILL, a lost machine) leaves how long its
    trials ran: the next run books it to them as 'lost' time (Ledger.reset_interrupted). A beat that cannot be
    written is skipped (logged once); it never stops the run."""

    def __init__(self, ledger: Ledger, interval: float = 60.0) -> None:
        self.ledger, self.interval = ledger, float(interval)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "Heartbeat":
        self.ledger.beat()
        self._thread = threading.Thread(target=self._run, name="locaudit-ledger-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        warned = False
        conn = None
        try:
            conn = sqlite3.connect(str(self.ledger.path), timeout=self.ledger._busy_timeout_s, isolation_level=None)
            while not self._stop.wait(self.interval):
                try:
                    self.ledger.beat(conn)
                except sqlite3.Error as e:
                    if not warned:
                        log.warning("ledger heartbeat not written (%s); the run goes on", e)
                        warned = True
        except sqlite3.Error as e:
            log.warning("ledger heartbeat not started (%s); the run goes on", e)
        finally:
            if conn is not None:
                conn.close()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


# ---------------------------------------------------------------------------------------------- integrity
def _absent(run_dir: Path, artifacts: dict) -> bool:
    """Whether some artifact folder of a trial is absent altogether (not damaged: gone)."""
    for k in ARTIFACT_DIRS:
        d = artifact_dir(Path(run_dir), artifacts[k]) if k in artifacts else None
        if d is not None and not d.exists():
            return True
    return False


def recheck_done(ledger: Ledger, needed: Iterable[str] | None = None) -> list[tuple[str, str]]:
    """Done trials whose artifact folders fail their checksums go back to pending: (key, reason) each.

    A trial whose folders `locaudit pack` left out (a 'packed' event; activations, recomputed in minutes) stays
    done while no trial still to run reads them: it runs again only when a key in `needed` (the dependencies of
    the trials still to run; None: every such trial counts as needed) names it, and that is not lost time."""
    packed = ledger.keys_with_event(PACKED_EVENT)
    need = None if needed is None else set(needed)
    bad = []
    for r in ledger.rows(status="done"):
        problem = check_artifacts(ledger.run_dir, r["artifacts"])
        if not problem:
            continue
        left_out = r["key"] in packed and _absent(ledger.run_dir, r["artifacts"])
        if left_out and need is not None and r["key"] not in need:
            continue
        if left_out:
            problem = f"left out of a pack and needed again: {problem}"
        ledger.invalidate(r["key"], problem, lost=not left_out)
        bad.append((r["key"], problem))
    return bad


def _restore_done(led: Ledger, trials: list[Trial]) -> int:
    """Mark done again, in the ledger being rebuilt, each trial whose ``result.json`` passes `record_problem` and
    whose artifact folders match their checksums; returns how many."""
    restored = 0
    for t in trials:
        rec, _ = read_trial_record(led.run_dir, t.key)
        if rec is None or check_artifacts(led.run_dir, rec["artifacts"], strict=True):
            continue
        finished = float(rec.get("finished") or time.time())
        started = float(rec.get("started") or finished)
        with led.transaction() as c:
            c.execute(
                "UPDATE trials SET status = 'done', attempts = 1, started = ?, finished = ?, duration_s = ?, "
                "cpu_s = ?, worker = ?, metrics = ?, artifacts = ?, error = NULL WHERE key = ?",
                (started, finished, finished - started, rec.get("cpu_s"), rec.get("worker"),
                 json.dumps(rec["metrics"], sort_keys=True), json.dumps(rec["artifacts"], sort_keys=True), t.key))
            led._event(c, t.key, "repaired", f"restored from {RECORD_FILE}")
        restored += 1
    return restored


def repair(run_dir: str | os.PathLike, trials: Iterable[Trial], meta: dict) -> dict:
    """Rebuild a damaged, empty or missing ledger from the trial folders, keeping the old file as a backup.

    A trial becomes done again where its ``result.json`` passes the runner's own validation (`record_problem`:
    finite, bounded numbers as metrics, paths as artifacts) and its artifact folders match their checksums;
    every other trial is pending. A healthy ledger is left as it is. The new ledger is built in a temporary
    file beside the old one, which is moved aside (the backup) only once the new one is complete; a ledger
    that cannot be written or read for want of space or permission is not damaged, and is left alone.
    Returns {"healthy", "backup", "restored", "pending", "problem"}.
    """
    led = Ledger.__new__(Ledger)
    led.run_dir, led.session, led._lock_fd, led._busy_timeout_s, led.conn = Path(run_dir), uuid.uuid4().hex[:12], None, 60.0, None
    led.path = led.run_dir / LEDGER_FILE
    if not led.run_dir.is_dir():
        raise ConfigError(f"--repair: {led.run_dir} is not a folder")
    led._take_lock()
    real = led.path
    tmp_db = temp_sibling(real)
    try:
        problem = ledger_file_problem(led.run_dir)
        if problem is None and real.exists() and real.stat().st_size > 0:
            try:
                led._connect(writer=True)
                return {"healthy": True, "backup": None, "restored": 0, "pending": 0, "problem": None}
            except sqlite3.OperationalError as e:  # cannot write or read it (permissions, disk): not damage
                raise ConfigError(f"--repair: {real} cannot be used ({e}); it was left as it is: check that the run "
                                  "folder is writable and the disk has space, then rerun") from None
            except (sqlite3.DatabaseError, LedgerDamagedError) as e:
                problem = f"{real} is damaged ({e})"
            finally:
                if led.conn is not None:
                    led.conn.close()
                    led.conn = None
        if problem is None:
            return {"healthy": True, "backup": None, "restored": 0, "pending": 0, "problem": None}
        # rebuild into a temporary file beside the ledger; the damaged file is moved aside only once it is done
        led.path = tmp_db
        led._connect(writer=True, fresh=True)
        for k, v in meta.items():
            led.set_meta(k, v)
        trials = list(trials)
        led.sync(trials)
        restored = _restore_done(led, trials)
        led.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        led.conn.execute("PRAGMA journal_mode = DELETE")  # one self-contained file to move into place
        led.conn.close()
        led.conn = None
        backup = None
        if real.exists():
            backup = led.run_dir / f"{LEDGER_FILE}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{led.session[:4]}"
            for suffix in ("", "-wal", "-shm"):
                src = Path(str(real) + suffix)
                if src.exists():
                    os.replace(src, Path(str(backup) + suffix))
        else:
            for suffix in ("-wal", "-shm"):  # without their database these cannot be replayed
                Path(str(real) + suffix).unlink(missing_ok=True)
        os.replace(tmp_db, real)
        return {"healthy": False, "backup": str(backup) if backup else None, "restored": restored,
                "pending": len(trials) - restored, "problem": problem}
    except sqlite3.OperationalError as e:  # a full disk or read-only folder while rebuilding: nothing was moved
        raise ConfigError(f"--repair: cannot write the rebuilt ledger beside {real} ({e}); the ledger was left as "
                          "it is: free space or make the folder writable, then rerun") from None
    finally:
        led.close()
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(str(tmp_db) + suffix).unlink(missing_ok=True)
