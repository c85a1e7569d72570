"""A trial's cost includes the attempts that did not finish: a run killed without warning (its last heartbeat),
stopped (Ctrl-C) or failed and retried books the time its batch ran to the batch's trials, shared equally; a
kill before heartbeats were kept is counted as an attempt of unknown length, and the dry run and the report say
their cost is then a lower bound."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from locaudit.study.ledger import HEARTBEAT_PREFIX, Heartbeat, Ledger
from locaudit.study.runner import run_study
from locaudit.study.trials import expand
from test_study_ledger import FakeSteps, make_spec


def _batch(led: Ledger, keys: list[str], started: float) -> None:
    """Mark `keys` running as one batch that started at `started` (a fixed time, for exact shares)."""
    led.mark_running(keys)
    with led.transaction() as c:
        for k in keys:
            c.execute("UPDATE trials SET started = ?, batch = ? WHERE key = ?", (started, started, k))


def _beat(led: Ledger, at: float) -> None:
    with led.transaction() as c:
        c.execute("INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)", (HEARTBEAT_PREFIX + led.session, json.dumps(at)))


@pytest.fixture
def keys(tmp_path: Path) -> list[str]:
    trials = expand(make_spec(tmp_path))
    with Ledger(tmp_path / "run", writer=True) as led:
        led.sync(trials)
    return [t.key for t in trials][:4]


def test_a_killed_batch_books_its_time_up_to_the_last_heartbeat(tmp_path: Path, keys: list[str]) -> None:
    with Ledger(tmp_path / "run", writer=True) as led:  # the run that dies: one batch of 4, one trial recorded done
        _batch(led, keys, 1000.0)
        led.finish(keys[0], "done", {"m": 1.0}, started=1000.0, finished=1040.0)
        _beat(led, 1100.0)
    with Ledger(tmp_path / "run", writer=True) as led:  # the next run
        assert sorted(led.reset_interrupted()) == sorted(keys[1:])
        lost = led.lost_time()
    for k in keys[1:]:  # 1040 .. 1100 after the done one, shared by the 3 still running
        assert lost[k] == {"lost_s": pytest.approx(20.0), "lost_unknown": 0}
    assert keys[0] not in lost


def test_another_batch_in_flight_does_not_shorten_a_killed_batch(tmp_path: Path, keys: list[str]) -> None:
    """Ray runs several batches at once: a trial of batch B that finishes while batch A runs is B's time, not A's."""
    with Ledger(tmp_path / "run", writer=True) as led:
        _batch(led, keys[:2], 1000.0)  # batch A: 2 trials
        _batch(led, keys[2:3], 1010.0)  # batch B: 1 trial, done at 1060 (its worker started it at 1012)
        led.finish(keys[2], "done", {"m": 1.0}, started=1012.0, finished=1060.0)
        _beat(led, 1100.0)
    with Ledger(tmp_path / "run", writer=True) as led:
        assert sorted(led.reset_interrupted()) == sorted(keys[:2])
        lost = led.lost_time()
    for k in keys[:2]:  # A ran 1000 .. 1100, all of it lost, shared by its 2 trials
        assert lost[k] == {"lost_s": pytest.approx(50.0), "lost_unknown": 0}


def test_rows_from_before_batches_were_stamped_fall_back_to_their_session(tmp_path: Path, keys: list[str]) -> None:
    """A ledger written before the `batch` column: its running rows have none, and any trial of their session done
    since their start shortens their span (a share that can only be too small, as before)."""
    with Ledger(tmp_path / "run", writer=True) as led:
        _batch(led, keys[:2], 1000.0)
        _batch(led, keys[2:3], 1010.0)
        led.finish(keys[2], "done", {"m": 1.0}, started=1012.0, finished=1060.0)
        _beat(led, 1100.0)
        with led.transaction() as c:
            c.execute("UPDATE trials SET batch = NULL")
    with Ledger(tmp_path / "run", writer=True) as led:
        led.reset_interrupted()
        lost = led.lost_time()
    for k in keys[:2]:  # 1060 .. 1100, shared by 2
        assert lost[k] == {"lost_s": pytest.approx(20.0), "lost_unknown": 0}


def test_an_old_ledger_gains_the_batch_column(tmp_path: Path, keys: list[str]) -> None:
    import sqlite3

    db = tmp_path / "run" / "ledger.sqlite"
    with sqlite3.connect(db) as c:  # as a ledger of an earlier version: no batch column
        c.execute("ALTER TABLE trials DROP COLUMN batch")
    with Ledger(tmp_path / "run", writer=True) as led:
        led.mark_running(keys[:1])
        row = next(r for r in led.rows() if r["key"] == keys[0])
        assert row["batch"] == row["started"]


def test_a_kill_without_heartbeat_is_an_attempt_of_unknown_length(tmp_path: Path, keys: list[str]) -> None:
    with Ledger(tmp_path / "run", writer=True) as led:
        _batch(led, keys[:2], 1000.0)
    with Ledger(tmp_path / "run", writer=True) as led:
        led.reset_interrupted()
        lost = led.lost_time()
    assert lost[keys[0]] == lost[keys[1]] == {"lost_s": 0.0, "lost_unknown": 1}


def test_a_reset_from_before_lost_time_counts_as_unknown(tmp_path: Path, keys: list[str]) -> None:
    """Ledgers of earlier versions have 'reset' events and no 'lost' ones: those attempts' time is unknown."""
    with Ledger(tmp_path / "run", writer=True) as led:
        with led.transaction() as c:
            led._event(c, keys[0], "reset", "interrupted: was running when its process died")
            led._event(c, keys[0], "reset", "interrupted: was running when its process died")
        assert led.lost_time()[keys[0]] == {"lost_s": 0.0, "lost_unknown": 2}


def test_a_stopped_and_a_failed_batch_book_their_time(tmp_path: Path, keys: list[str]) -> None:
    with Ledger(tmp_path / "run", writer=True) as led:
        t0 = time.time() - 30.0
        _batch(led, keys[:2], t0)
        led.release(keys[:2])  # Ctrl-C 30 s in
        lost = led.lost_time()
        for k in keys[:2]:
            assert 15.0 <= lost[k]["lost_s"] <= 15.0 + 5.0 and lost[k]["lost_unknown"] == 0
        _batch(led, keys[2:4], 2000.0)  # a batch that fails 90 s in: both trials carry the batch's span
        for k in keys[2:4]:
            led.finish(k, "failed", error="boom", started=2000.0, finished=2090.0)
        later = led.rows(status="pending")[0]["key"]  # the run goes on: a later batch is done before the retry
        _batch(led, [later], 2100.0)
        led.finish(later, "done", {"m": 1.0}, started=2100.0, finished=2200.0)
        led.retry_failed()
        lost = led.lost_time()
    for k in keys[2:4]:
        assert lost[k] == {"lost_s": pytest.approx(45.0), "lost_unknown": 0}


def test_heartbeat_thread_marks_the_session_alive(tmp_path: Path, keys: list[str]) -> None:
    with Ledger(tmp_path / "run", writer=True) as led:
        with Heartbeat(led, interval=0.05):
            first = led.get_meta(HEARTBEAT_PREFIX + led.session)
            time.sleep(0.4)
            later = led.get_meta(HEARTBEAT_PREFIX + led.session)
        assert first is not None and later > first


def test_run_books_a_killed_run_and_the_dry_run_and_report_count_it(tmp_path: Path, monkeypatch) -> None:
    """End to end: a run's batch killed (its driver gone, rows left running) after a heartbeat: the next run
    restarts it, and the trial times the report and the dry run use include the killed attempt."""
    from locaudit.study.design import design, design_text
    from locaudit.study.frames import trials_frame
    from locaudit.study.report import timing_table

    spec = make_spec(tmp_path)
    run_study(spec, tmp_path / "run", fn=FakeSteps(), progress=False, kinds=("collect",))
    with Ledger(tmp_path / "run", writer=True) as led:
        todo = [r["key"] for r in led.rows(status="pending")][:3]
        _batch(led, todo, time.time() - 300.0)
        _beat(led, time.time() - 60.0)  # it was last seen 240 s after its batch started
    run_study(spec, tmp_path / "run", fn=FakeSteps(), progress=False)
    with Ledger(tmp_path / "run") as led:
        rows = led.rows_with_cost()
    by = {r["key"]: r for r in rows}
    for k in todo:
        assert by[k]["status"] == "done" and by[k]["lost_s"] == pytest.approx(80.0, abs=1.0)
    t = timing_table(trials_frame(rows)).set_index("kind")
    assert t.loc["total", "earlier_attempts_s"] == pytest.approx(240.0, abs=3.0)
    assert t.loc["total", "wall_s"] >= 240.0 and t.loc["total", "unknown_attempts"] == 0

    text = "\n".join(design_text(design(spec, None, 10, {"optimal": 100.0}, {"optimal": 4}, {"optimal": 2})))
    assert "cost optimal: 4 trials x 100 s" in text and "at least: 2 earlier attempt(s)" in text
    text = "\n".join(design_text(design(spec, None, 10, {"optimal": 100.0}, {"optimal": 4})))
    assert "at least" not in text


def test_an_invalidated_attempt_books_its_time(tmp_path: Path, keys: list[str]) -> None:
    """A done trial whose artifacts fail their check runs again: the attempt that made them counts in its cost,
    and it does not hide an older kill of unknown length (which has a 'reset' event and no 'lost' one)."""
    with Ledger(tmp_path / "run", writer=True) as led:
        with led.transaction() as c:
            led._event(c, keys[0], "reset", "interrupted: was running when its process died")
        _batch(led, keys[:1], 1000.0)
        led.finish(keys[0], "done", {"m": 1.0}, started=1000.0, finished=1070.0)
        led.invalidate(keys[0], "checksum mismatch")
        led.invalidate(keys[0], "checksum mismatch")  # no longer done: nothing more to book
        assert led.row(keys[0])["status"] == "pending"
        assert led.lost_time()[keys[0]] == {"lost_s": pytest.approx(70.0), "lost_unknown": 1}


def test_a_dead_sessions_heartbeat_goes_once_its_time_is_booked(tmp_path: Path, keys: list[str]) -> None:
    with Ledger(tmp_path / "run", writer=True) as led:
        dead = led.session
        _batch(led, keys[:2], 1000.0)
        _beat(led, 1100.0)
    with Ledger(tmp_path / "run", writer=True) as led:
        led.beat()
        led.reset_interrupted()
        assert led.lost_time()[keys[0]]["lost_s"] == pytest.approx(50.0)
        assert led.get_meta(HEARTBEAT_PREFIX + dead) is None
        assert led.get_meta(HEARTBEAT_PREFIX + led.session) is not None
