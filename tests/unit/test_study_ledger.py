"""Ledger and runner: resume, retries, interruptions, batching, dependencies (fake trial function)."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

from locaudit.errors import ConfigError
from locaudit.study.ledger import Ledger
from locaudit.study.runner import run_study
from locaudit.study.spec import parse_study
from locaudit.study.trials import expand

STUDY = {
    "name": "fake",
    "model": {"name": "tiny:llama"},
    "data": {"spec": "pairs:pairs.jsonl"},
    "localizers": {"probe": {"top_k": 2}, "random": {"n": 3}, "single": {"n": 2}},
    "iti": {"alphas": [1.0, 4.0]},
    "optimal": {"taus": [0.1, 0.2]},
}


def make_spec(tmp_path: Path, **over):
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    obj = {**STUDY, **over}
    return parse_study(obj, tmp_path, "fake.yaml")


class FakeSteps:
    """Deterministic metrics from the trial key; records every call; can fail or crash on demand."""

    def __init__(self, fail: set[str] = frozenset(), crash_after: int | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fail = set(fail)
        self.crash_after = crash_after

    def __call__(self, trials, spec, run_dir):
        self.calls.append([t.key for t in trials])
        for t in trials:
            if self.crash_after is not None and sum(map(len, self.calls)) > self.crash_after:
                raise KeyboardInterrupt
            if t.key in self.fail or t.kind in self.fail:
                raise RuntimeError(f"boom in {t.name}")
            v = int(hashlib.sha256(t.key.encode()).hexdigest()[:6], 16) / 16**6
            yield t.key, {"metrics": {"true": v, "info": 0.9, "mc1": v / 2, "kl": v / 10}, "artifacts": {"heads": "L0H0"}}

    @property
    def ran(self) -> list[str]:
        return [k for c in self.calls for k in c]


def test_run_then_resume_runs_nothing(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    fn = FakeSteps()
    s = run_study(spec, tmp_path / "run", fn=fn, progress=False)
    n = len(expand(spec))
    assert s.done == n and s.failed == 0 and sorted(fn.ran) == sorted(t.key for t in expand(spec))
    fn2 = FakeSteps()
    s2 = run_study(spec, tmp_path / "run", fn=fn2, progress=False)
    assert fn2.ran == [] and s2.counts["done"] == n
    with Ledger(tmp_path / "run") as led:
        rows = led.rows()
        assert all(r["status"] == "done" and r["attempts"] == 1 and r["metrics"] for r in rows)
        assert all(r["duration_s"] is not None and r["started"] <= r["finished"] for r in rows)
        assert led.get_meta("spec")["name"] == "fake"
        assert sqlite3.connect(str(led.path)).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_new_grid_value_runs_only_new_trials(tmp_path: Path) -> None:
    run_study(make_spec(tmp_path), tmp_path / "run", fn=FakeSteps(), progress=False)
    bigger = make_spec(tmp_path, iti={"alphas": [1.0, 4.0, 8.0]})
    fn = FakeSteps()
    s = run_study(bigger, tmp_path / "run", fn=fn, progress=False)
    # top + 3 random draws at the new alpha, each with its validation-scoring ('select') trial
    assert s.added == 8 and len(fn.ran) == 8
    # removing it again: the extra rows stay in the ledger but leave the current study
    run_study(make_spec(tmp_path), tmp_path / "run", fn=FakeSteps(), progress=False)
    with Ledger(tmp_path / "run") as led:
        assert len(led.rows(in_spec_only=False)) == len(led.rows()) + 8


def test_failed_trials_wait_for_retry(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    run_study(spec, tmp_path / "run", fn=FakeSteps(fail={"baseline"}), progress=False)
    with Ledger(tmp_path / "run") as led:
        (row,) = led.rows(status="failed")
        assert row["kind"] == "baseline" and "boom in baseline" in row["error"] and row["attempts"] == 1
    fn = FakeSteps()
    run_study(spec, tmp_path / "run", fn=fn, progress=False)
    assert fn.ran == []
    run_study(spec, tmp_path / "run", fn=fn, retry_failed=True, progress=False)
    assert fn.ran == [row["key"]]
    with Ledger(tmp_path / "run") as led:
        r = led.row(row["key"])
        assert r["status"] == "done" and r["attempts"] == 2 and r["error"] is None


def test_failed_dependency_blocks_dependents(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    s = run_study(spec, tmp_path / "run", fn=FakeSteps(fail={"probe"}), progress=False)
    by_kind = {}
    for t in expand(spec):
        by_kind.setdefault(t.kind, []).append(t)
    assert s.failed == 1
    blocked = set(s.blocked)
    assert {t.key for t in by_kind["iti"]} <= blocked
    assert {t.key for t in by_kind["optimal"] if t.localizer.needs_ranking} <= blocked
    with Ledger(tmp_path / "run") as led:
        st = led.status_of()
    assert all(st[t.key] == "done" for t in by_kind["optimal"] if not t.localizer.needs_ranking)


def test_interrupted_trials_restart_exactly_once(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run_study(spec, tmp_path / "run", fn=FakeSteps(crash_after=5), progress=False)
    with Ledger(tmp_path / "run") as led:
        c = led.counts()
        assert c["done"] == 5 and c["running"] == 0  # a clean stop releases its trial
    # a process that died mid-trial leaves a row 'running': simulate it, then resume
    with Ledger(tmp_path / "run", writer=True) as led:
        pending = led.rows(status="pending")[0]["key"]
        led.mark_running([pending])
    fn = FakeSteps()
    s = run_study(spec, tmp_path / "run", fn=fn, progress=False)
    assert pending in s.reset and fn.ran.count(pending) == 1
    with Ledger(tmp_path / "run") as led:
        assert led.counts()["done"] == len(expand(spec))
        done_events = [e for e in led.events() if e["event"] == "done"]
        assert len(done_events) == len({e["key"] for e in done_events}) == len(expand(spec))


def test_batches_group_optimal_edits(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, optimal={"taus": [0.1, 0.2], "batch_edits": 4, "lr": {"single": [5e-4]}})
    fn = FakeSteps()
    run_study(spec, tmp_path / "run", fn=fn, progress=False)
    by_key = {t.key: t for t in expand(spec)}
    opt_calls = [c for c in fn.calls if by_key[c[0]].kind == "optimal"]
    assert max(map(len, opt_calls)) == 4
    for c in opt_calls:
        assert len({by_key[k].batch_key for k in c}) == 1


def test_second_driver_is_locked_out(tmp_path: Path) -> None:
    with Ledger(tmp_path / "run", writer=True):
        with pytest.raises(ConfigError, match="another locaudit run"):
            Ledger(tmp_path / "run", writer=True)
    with Ledger(tmp_path / "run", writer=True) as led:  # released on close
        assert led.counts()["done"] == 0


def test_lock_held_sees_a_live_writer_only(tmp_path: Path) -> None:
    from locaudit.study.ledger import lock_held
    lock = tmp_path / "run" / ".lock"
    assert not lock_held(lock)  # no lock file yet
    with Ledger(tmp_path / "run", writer=True):
        assert lock_held(lock)
        assert lock_held(lock)  # asking does not take it
    assert lock.exists() and not lock_held(lock)  # released on close; the file stays
    with Ledger(tmp_path / "run", writer=True):  # and asking left it free for the next writer
        assert lock_held(lock)


def test_ledger_refuses_double_finish(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    t = expand(spec)[0]
    with Ledger(tmp_path / "run", writer=True) as led:
        led.sync([t])
        led.mark_running([t.key])
        with pytest.raises(RuntimeError, match="not pending"):
            led.mark_running([t.key])
        led.finish(t.key, "done", {"x": 1.0})
        with pytest.raises(RuntimeError, match="already done"):
            led.finish(t.key, "done", {"x": 2.0})
        assert led.row(t.key)["metrics"] == {"x": 1.0}
    with pytest.raises(ConfigError, match="not a run folder"):
        Ledger(tmp_path / "elsewhere")
