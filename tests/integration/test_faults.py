"""Fault injection (issue 27): a tiny study (tiny:llama, real steps) whose writes fail at random, seeded points
(ENOSPC at the moment a written file or folder is put in place: trial artifacts, caches, result records,
checksums, the report, an export). Rerun after each fault until everything is through, it must end with every
trial done exactly once, the same numbers as a clean run, a complete report and a complete export; nothing
half-written is ever used."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from locaudit.study.ledger import Ledger
from locaudit.study.runner import run_study
from locaudit.study.trials import expand

STUDY = """
name: tiny-faults
model: {{name: "tiny:llama"}}
data: {{spec: "truthfulqa:{csv}", max_questions: 5}}
localizers: {{probe: {{top_k: 2}}, random: {{n: 1}}, single: {{n: 0}}}}
iti: {{alphas: [2.0]}}
optimal: {{taus: [0.1], epochs: 1, max_train_pairs: 4, max_val_pairs: 2, batch_size: 4, localizers: [top]}}
evaluation: {{metrics: [mc], max_questions: 2, protocol: bare}}
"""

N_FAULTS = 24  # issue 27 asks for at least 20 seeded fault points across trials, reports and exports


class Faults:
    """Make the n-th `put in place` of a write fail with ENOSPC where the seeded schedule says so (at most
    `budget` faults): os.replace (files: io.atomic_path, caches, records) and io._exchange (folders)."""

    def __init__(self, seed: int, p: float, budget: int) -> None:
        self.rng = random.Random(seed)
        self.p, self.budget = p, budget
        self.calls = 0
        self.phase = "trials"
        self.in_phase: dict[str, int] = {}
        # the report's and the export's first builds also fail at a seeded write of their own
        self.forced = {"report": self.rng.randint(1, 8), "export": self.rng.randint(1, 2)}
        self.hits: list[tuple[str, str]] = []

    def maybe_fail(self, what: str, path) -> None:
        self.calls += 1
        k = self.in_phase[self.phase] = self.in_phase.get(self.phase, 0) + 1
        forced = self.forced.get(self.phase) == k
        if forced or (self.phase == "trials" and len(self.hits) < self.budget and self.rng.random() < self.p):
            self.hits.append((self.phase, f"{what} {Path(str(path)).name}"))
            raise OSError(errno.ENOSPC, "No space left on device (injected)", str(path))


def _metrics(run: Path) -> dict[str, dict]:
    with Ledger(run) as led:
        return {r["key"]: r["metrics"] for r in led.rows()}


def _export_iti(run: Path, out: Path) -> Path:
    from locaudit.cli.export import load_named_model, trial_edit_dir
    from locaudit.edit.base import load_edit
    from locaudit.edit.export import export_merged

    with Ledger(run) as led:
        iti = next(r for r in led.rows(status="done") if r["kind"] == "iti")
    edit_dir, _ = trial_edit_dir(run, iti["key"])
    edit = load_edit(edit_dir)
    return export_merged(edit, load_named_model("tiny:llama"), out, overwrite=True)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_random_write_failures_then_rerun_give_the_clean_results(tmp_path: Path, shared_data: Path, monkeypatch):
    import locaudit.io as lio
    from locaudit.study.report import build_report
    from locaudit.study.spec import load_study

    csv = shared_data / "truthfulqa" / "data" / "v1" / "TruthfulQA.csv"
    if not csv.exists():
        pytest.skip(f"{csv} is absent")
    (tmp_path / "study.yaml").write_text(STUDY.format(csv=csv))
    spec = load_study(tmp_path / "study.yaml")
    n = len(expand(spec))
    t0 = time.time()
    # the clean run (fresh cache) goes on beside the faulty one, in its own process
    clean = tmp_path / "clean"
    env = {**os.environ, "LOCAUDIT_CACHE": str(tmp_path / "cache-clean"), "OMP_NUM_THREADS": "1"}
    clean_proc = subprocess.Popen([sys.executable, "-m", "locaudit.cli.main", "run", str(tmp_path / "study.yaml"),
                                   "--out", str(clean), "--no-report"], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)

    # the faulty run first, on an empty cache (so cache writes fail too)
    monkeypatch.setenv("LOCAUDIT_CACHE", str(tmp_path / "cache-faults"))
    faults = Faults(seed=27, p=0.2, budget=N_FAULTS)
    real_replace, real_exchange = os.replace, lio._exchange

    def replace(src, dst, *a, **k):
        faults.maybe_fail("replace", dst)
        return real_replace(src, dst, *a, **k)

    def exchange(a, b):
        faults.maybe_fail("exchange", b)
        return real_exchange(a, b)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(lio, "_exchange", exchange)
    run, export = tmp_path / "run", tmp_path / "export"
    attempts, errors = 0, []
    report_ok = export_ok = False
    while attempts < 60:
        attempts += 1
        try:
            faults.phase = "trials"
            s = run_study(spec, run, retry_failed=True, progress=False)
            if s.counts["done"] < n:
                continue
            if not report_ok:
                faults.phase = "report"
                build_report(run, n_resamples=99)
                report_ok = True
            if not export_ok:
                faults.phase = "export"
                _export_iti(run, export)
                export_ok = True
            break
        except OSError as e:  # a fault outside a trial (the report, the export, the runner's own files)
            errors.append(str(e))
    monkeypatch.setattr(os, "replace", real_replace)
    monkeypatch.setattr(lio, "_exchange", real_exchange)
    assert len(faults.hits) >= 20, (faults.calls, faults.hits)
    assert report_ok and export_ok, (attempts, errors[-3:])
    assert {p for p, _ in faults.hits} == {"trials", "report", "export"}, faults.hits
    kinds = {h.split()[1].split(".")[0] for _, h in faults.hits}
    assert len(kinds) >= 4, faults.hits  # the faults hit several kinds of files

    with Ledger(run) as led:
        rows = led.rows()
        events = led.events()
    assert len(rows) == n and len({r["key"] for r in rows}) == n and all(r["status"] == "done" for r in rows)
    assert sorted(e["key"] for e in events if e["event"] == "done") == sorted(r["key"] for r in rows)
    assert any(r["attempts"] > 1 for r in rows)  # some trials did fail and ran again
    # every temporary file of a failed write is gone (the clean run, still writing beside it, is checked once done)
    faulty = [run, export, tmp_path / "cache-faults"]
    leftovers = [p for d in faulty for p in d.rglob("*") if lio.TEMP_RE.match(p.name)]
    assert not leftovers, leftovers[:5]

    # the report and the export are complete and readable
    verdict = json.loads((run / "report" / "verdict.json").read_text())
    assert (run / "report" / "index.html").is_file() and verdict["counts"]["done"] == n
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(export))

    # the clean run gives the same numbers, report table and export
    out = clean_proc.communicate(timeout=600)[0]
    assert clean_proc.returncode == 0, out[-3000:]
    leftovers = [p for p in tmp_path.rglob("*") if lio.TEMP_RE.match(p.name)]
    assert not leftovers, leftovers[:5]
    got, want = _metrics(run), _metrics(clean)
    assert len(want) == n
    assert set(got) == set(want)
    for k in want:
        assert set(got[k]) == set(want[k]), k
        for m, v in want[k].items():
            if m != "train_seconds":
                assert got[k][m] == pytest.approx(v, rel=1e-6, abs=1e-9), (k, m)
    clean_verdict = json.loads(build_report(clean, n_resamples=99).index.with_name("verdict.json").read_text())
    assert verdict["table"] == clean_verdict["table"] and verdict["headline"] == clean_verdict["headline"]
    clean_export = _export_iti(clean, tmp_path / "export-clean")
    a, b = _tree(export), _tree(clean_export)
    assert a.keys() == b.keys() and a["model.safetensors"] == b["model.safetensors"]
    assert time.time() - t0 < 240  # the two runs side by side: about a minute on a 2-core CPU
