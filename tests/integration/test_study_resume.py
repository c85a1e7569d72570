"""A study killed mid-trial (a real SIGKILL of `locaudit run`) and resumed: every trial done exactly once,
with the same results as an uninterrupted run. Tiny random model, real steps (collect, probe, ITI,
optimal edits, evaluation)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from locaudit.study.ledger import Ledger
from locaudit.study.runner import run_study
from locaudit.study.spec import load_study
from locaudit.study.trials import expand

STUDY = """
name: tiny-resume
model: {{name: "tiny:llama"}}
data: {{spec: "truthfulqa:{csv}", max_questions: 12}}
localizers: {{probe: {{top_k: 2}}, random: {{n: 2}}, single: {{n: 1}}}}
iti: {{alphas: [2.0]}}
optimal: {{taus: [0.1], epochs: 1, max_train_pairs: 8, max_val_pairs: 4, batch_size: 4}}
evaluation: {{metrics: [mc, kl, ce], max_questions: 3}}
"""


def write_study(folder: Path, shared_data: Path) -> Path:
    csv = shared_data / "truthfulqa" / "data" / "v1" / "TruthfulQA.csv"
    if not csv.exists():
        pytest.skip(f"{csv} is absent")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "study.yaml"
    path.write_text(STUDY.format(csv=csv))
    return path


# The killed run slows every ITI trial down by 2 s (a patch applied only in that subprocess), so that the kill
# lands mid-trial however fast the machine is; the resumed and reference runs use the unpatched code.
_SLOW_ITI = """
import sys, time
import locaudit.study.steps as steps
from locaudit.cli.main import main
_iti = steps.STEPS["iti"]
def slow_iti(ctx, t):
    time.sleep(2.0)
    return _iti(ctx, t)
steps.STEPS["iti"] = slow_iti
sys.argv = ["locaudit", *sys.argv[1:]]
main()
"""


def _cli(study: Path, run: Path, env: dict, slow_iti: bool = False) -> subprocess.Popen:
    entry = ["-c", _SLOW_ITI] if slow_iti else ["-m", "locaudit.cli.main"]
    return subprocess.Popen([sys.executable, *entry, "run", str(study), "--out", str(run), "--no-report"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _rows(run: Path) -> list[tuple]:
    db = run / "ledger.sqlite"
    if not db.exists():
        return []
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return con.execute("SELECT key, status, started FROM trials").fetchall()
        finally:
            con.close()
    except sqlite3.OperationalError:  # created but no table yet
        return []


def test_sigkill_mid_trial_then_resume(tmp_path: Path, shared_data: Path, monkeypatch) -> None:
    study = write_study(tmp_path, shared_data)
    env = {**os.environ, "LOCAUDIT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    monkeypatch.setenv("LOCAUDIT_CACHE", str(tmp_path / "cache-ref"))
    spec = load_study(study)
    n = len(expand(spec))

    run = tmp_path / "killed"
    proc = _cli(study, run, env, slow_iti=True)
    victim = None
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        rows = _rows(run)
        done = sum(r[1] == "done" for r in rows)
        running = [r for r in rows if r[1] == "running" and r[2] and time.time() - r[2] > 0.2]
        if done >= 3 and running:
            victim = running[0][0]
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=30)
    out = proc.stdout.read() if proc.stdout else ""
    assert victim is not None, f"the run ended before it could be killed:\n{out[-3000:]}"
    assert proc.returncode == -signal.SIGKILL
    with Ledger(run) as led:
        assert led.row(victim)["status"] == "running"  # left behind by the dead process
        assert led.row(victim)["name"].startswith("iti"), led.row(victim)["name"]  # the slowed-down step
        done_before = {r["key"] for r in led.rows(status="done")}
    assert 3 <= len(done_before) < n

    resumed = _cli(study, run, env)
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out[-3000:]
    assert "restarted after an interruption" in out
    with Ledger(run) as led:
        rows = {r["key"]: r for r in led.rows()}
        events = led.events()
    assert len(rows) == n and all(r["status"] == "done" for r in rows.values())
    done_events = [e["key"] for e in events if e["event"] == "done"]
    assert sorted(done_events) == sorted(rows)  # every trial finished exactly once
    assert rows[victim]["attempts"] == 2
    assert all(rows[k]["attempts"] == 1 for k in done_before)
    assert any(e["event"] == "reset" and e["key"] == victim for e in events)

    # an uninterrupted run (in this process) gives the same results
    ref = tmp_path / "uninterrupted"
    summary = run_study(spec, ref, progress=False)
    assert summary.done == n
    with Ledger(ref) as led:
        ref_rows = {r["key"]: r for r in led.rows()}
    assert set(ref_rows) == set(rows)
    for k, r in ref_rows.items():
        a, b = r["metrics"], rows[k]["metrics"]
        assert set(a) == set(b), k
        for m in a:
            if m in ("train_seconds",):
                continue
            assert b[m] == pytest.approx(a[m], rel=1e-4, abs=1e-6), (r["name"], m)


def test_damaged_trained_edit_and_truncated_ledger_recover(tmp_path: Path, shared_data: Path, monkeypatch) -> None:
    """A trained-edit folder turned to garbage (its trained.json marker kept) is retrained, and a ledger
    truncated on disk is refused with one line naming it, then rebuilt by `run --repair`; both end with
    every trial done and the numbers of the uninterrupted run."""
    study = write_study(tmp_path, shared_data)
    env = {**os.environ, "LOCAUDIT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    monkeypatch.setenv("LOCAUDIT_CACHE", str(tmp_path / "cache"))
    spec = load_study(study)
    n = len(expand(spec))
    run = tmp_path / "run"
    assert run_study(spec, run, progress=False).done == n
    with Ledger(run) as led:
        reference = {r["key"]: r for r in led.rows()}

    def same_numbers(rows: dict) -> None:
        assert set(rows) == set(reference) and all(r["status"] == "done" for r in rows.values())
        for k, r in reference.items():
            assert set(rows[k]["metrics"]) == set(r["metrics"]), r["name"]
            for m, v in r["metrics"].items():
                if m != "train_seconds":
                    assert rows[k]["metrics"][m] == pytest.approx(v, rel=1e-4, abs=1e-6), (r["name"], m)

    # 1. garbage in a trained edit whose marker exists: the trials using it run again (retrained), not trusted
    folder = sorted((run / "shared").glob("optimal-*"))[0]
    rel = str(folder.relative_to(run))
    users = {k for k, r in reference.items() if r["artifacts"].get("edit") == rel}
    assert users and (folder / "trained.json").exists()
    (folder / "edit.safetensors").write_bytes(os.urandom(512))
    (folder / "meta.json").write_bytes(b"\xff\xfe garbage")
    again = run_study(spec, run, progress=False)
    assert again.ran == len(users) and again.failed == 0
    with Ledger(run) as led:
        rows = {r["key"]: r for r in led.rows()}
    assert {k for k, r in rows.items() if r["attempts"] == 2} == users
    same_numbers(rows)

    # 2. a ledger truncated on disk: one line naming it (exit 2), then --repair rebuilds it and resumes
    db = run / "ledger.sqlite"
    con = sqlite3.connect(str(db))
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    data = db.read_bytes()
    db.write_bytes(data[: min(20 * 1024, len(data) // 2)])
    victim = next(k for k, r in reference.items() if r["kind"] == "iti")
    (run / "trials" / victim / "eval" / "result.json").write_text("{}")  # and one damaged evaluation

    def cli(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "locaudit.cli.main", "run", str(study), "--out", str(run),
                               "--no-report", *extra], env=env, capture_output=True, text=True, timeout=600)

    refused = cli()
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert str(db) in refused.stderr and "--repair" in refused.stderr
    repaired = cli("--repair")
    assert repaired.returncode == 0, (repaired.stdout + repaired.stderr)[-3000:]
    assert f"{n - 1} trial(s) restored as done, 1 to run" in repaired.stdout, repaired.stdout
    assert list(run.glob("ledger.sqlite.damaged-*")), "the damaged ledger is kept as a backup"
    with Ledger(run) as led:
        rows = {r["key"]: r for r in led.rows()}
        assert [e["key"] for e in led.events() if e["event"] == "done"] == [victim]
    same_numbers(rows)
