"""Issue 27, what was left: outputs written as one unit, and checks before writes.

- a study's trial folder trials/KEY is written into a temporary sibling and renamed into place whole once the
  trial is recorded as done; a trial that fails (in its step, on a non-finite metric, or killed) leaves no
  trials/KEY, and the rerun puts it in place complete;
- `locaudit localize` checks its effects for non-finite values before it writes its files (or its cache);
- `locaudit export --format both` replaces OUT/merged and OUT/peft together (both or neither);
- a file-size limit (RLIMIT_FSIZE) while writing is one line naming the file, and the rerun recovers.
Tiny models, fp32.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from locaudit.io import TEMP_RE

STUDY = {
    "name": "units",
    "model": {"name": "tiny:llama"},
    "precision": "fp32",
    "data": {"spec": "pairs:pairs.jsonl"},
    "localizers": {"probe": {"top_k": 2}, "random": {"n": 2}, "single": {"n": 1}},
    "iti": {"alphas": [1.0]},
    "optimal": {"taus": [0.1]},
}


def _spec(tmp: Path):
    from locaudit.study.spec import parse_study

    (tmp / "pairs.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    return parse_study(dict(STUDY), tmp, "units.yaml")


def _temps(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if TEMP_RE.match(p.name)]


class FakeSteps:
    """Steps of every kind that write through the real RunContext (trial_dir / rel), as the real steps do;
    `fail` trials raise after writing half their folder, `nan` trials return a non-finite metric."""

    def __init__(self, run: Path, fail=(), nan=()) -> None:
        self.run, self.fail, self.nan = run, set(fail), set(nan)
        self.seen: dict[str, dict] = {}

    def step(self, ctx, t):
        d = ctx.trial_dir(t.key)
        (d / "eval").mkdir(parents=True, exist_ok=True)
        (d / "eval" / "part1.json").write_text(json.dumps({"key": t.key}))
        self.seen[t.key] = {"dir": d, "final_exists": (self.run / "trials" / t.key).exists(),
                            "same_dir": ctx.trial_dir(t.key) == d}
        if t.key in self.fail:
            raise RuntimeError("the step died half way")
        (d / "eval" / "part2.json").write_text("{}")
        v = int(hashlib.sha256(t.key.encode()).hexdigest()[:6], 16) / 16**6
        return {"metrics": {"mc1": float("nan") if t.key in self.nan else v},
                "artifacts": {"eval": ctx.rel(d / "eval")}}

    def batched(self, ctx, trials):
        for t in trials:
            yield t.key, self.step(ctx, t)

    def install(self, monkeypatch) -> None:
        from locaudit.study import steps

        for kind in list(steps.STEPS):
            monkeypatch.setitem(steps.STEPS, kind, self.step)
        for kind in list(steps.BATCHED):
            monkeypatch.setitem(steps.BATCHED, kind, self.batched)


def test_trial_folders_are_put_in_place_whole(tmp_path, monkeypatch):
    from locaudit.study.ledger import Ledger, read_trial_record, verify_checksums
    from locaudit.study.runner import run_study
    from locaudit.study.trials import expand

    spec = _spec(tmp_path)
    trials = expand(spec)
    run = tmp_path / "run"
    baselines = [t.key for t in trials if t.kind == "baseline"]
    itis = [t.key for t in trials if t.kind == "iti"]
    assert baselines and itis
    fail, nan = baselines[0], itis[0]
    steps = FakeSteps(run, fail=[fail], nan=[nan])
    steps.install(monkeypatch)
    s = run_study(spec, run, progress=False)
    assert s.failed >= 2 and s.done > 0
    # every step wrote into a hidden sibling of trials/KEY, the same one for the whole trial, never into trials/KEY
    assert steps.seen and all(not v["final_exists"] and v["same_dir"] for v in steps.seen.values())
    assert all(v["dir"].parent == run / "trials" and v["dir"].name.startswith(f".{k}.") for k, v in steps.seen.items())
    # a failed trial leaves no trial folder (not a half-written one) and no staging folder
    assert not (run / "trials" / fail).exists() and not (run / "trials" / nan).exists()
    assert not _temps(run), _temps(run)
    with Ledger(run) as led:
        rows = {r["key"]: r for r in led.rows()}
    for k, r in rows.items():
        if r["status"] != "done":
            continue
        d = run / "trials" / k
        assert r["artifacts"]["eval"] == f"trials/{k}/eval"  # artifacts name the final place
        assert sorted(p.name for p in (d / "eval").iterdir()) == ["checksums.json", "part1.json", "part2.json"]
        assert verify_checksums(d / "eval") is None and read_trial_record(run, k)[0] is not None

    # the rerun (now without faults) puts the failed trials' folders in place, complete
    ok = FakeSteps(run)
    ok.install(monkeypatch)
    s = run_study(spec, run, retry_failed=True, progress=False)
    assert s.counts["done"] == len(trials) and fail in ok.seen and nan in ok.seen
    for k in (fail, nan):
        assert read_trial_record(run, k)[0]["status"] == "done"
        assert verify_checksums(run / "trials" / k / "eval") is None
    assert not _temps(run)


_KILLED_STUDY = r"""
import json, os, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from test_atomic_units import FakeSteps, _spec
from locaudit.study import steps
from locaudit.study.runner import run_study

tmp, victim = Path(sys.argv[1]), sys.argv[2]

class Killing(FakeSteps):
    def step(self, ctx, t):
        if t.key == victim:
            d = ctx.trial_dir(t.key)
            (d / "eval").mkdir(parents=True)
            (d / "eval" / "part1.json").write_text("{}")
            os.kill(os.getpid(), signal.SIGKILL)
        return super().step(ctx, t)

k = Killing(tmp / "run")
for kind in list(steps.STEPS):
    steps.STEPS[kind] = k.step
for kind in list(steps.BATCHED):
    steps.BATCHED[kind] = k.batched
run_study(_spec(tmp), tmp / "run", progress=False)
"""


def test_a_trial_killed_while_writing_leaves_no_trial_folder(tmp_path, monkeypatch):
    from locaudit.study.ledger import Ledger, read_trial_record
    from locaudit.study.runner import run_study
    from locaudit.study.trials import expand

    spec = _spec(tmp_path)
    trials = expand(spec)
    victim = next(t.key for t in trials if t.kind == "baseline")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _KILLED_STUDY, str(tmp_path), victim, str(Path(__file__).parent)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-2000:]
    run = tmp_path / "run"
    assert not (run / "trials" / victim).exists()  # only a hidden staging folder, which nothing reads
    assert [p.name.split(".")[1] for p in _temps(run / "trials")] == [victim]
    assert read_trial_record(run, victim) == (None, "no result record")
    steps = FakeSteps(run)
    steps.install(monkeypatch)
    s = run_study(spec, run, progress=False)  # cleans what the killed process left, runs the trial once
    assert s.counts["done"] == len(trials) and victim in steps.seen
    assert sorted(p.name for p in (run / "trials" / victim / "eval").iterdir()) == \
        ["checksums.json", "part1.json", "part2.json"]
    assert not _temps(run)
    with Ledger(run) as led:
        done = [e["key"] for e in led.events() if e["event"] == "done"]
    assert sorted(done) == sorted(t.key for t in trials)  # every trial done exactly once


# ---------------------------------------------------------------------------------------------- localize
def _cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    from locaudit.cli.main import main

    monkeypatch.setattr(sys, "argv", ["locaudit", *map(str, args)])
    monkeypatch.setenv("COLUMNS", "300")
    capsys.readouterr()
    with pytest.raises(SystemExit) as ei:
        main()
    out = capsys.readouterr()
    code = ei.value.code if isinstance(ei.value.code, int) else (0 if ei.value.code is None else 1)
    return code, out.err + out.out


def test_localize_checks_for_non_finite_effects_before_it_writes(tmp_path, monkeypatch, capsys):
    from locaudit.localize.effects import HeadEffects

    monkeypatch.setenv("LOCAUDIT_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Item {i}?", "chosen": f"Good {i}.", "rejected": f"Bad {i}!"})
                            + "\n" for i in range(12)))

    def diverged(lm, pairs, config, **kw):
        L, H = lm.sites.n_layers, lm.sites.n_heads
        per = torch.randn(len(pairs), L, H)
        per[:, 1, 0] = float("inf")
        return HeadEffects.from_per_example(per, "patching", {"model": lm.name})

    from locaudit.localize import patching

    monkeypatch.setattr(patching, "activation_patching", diverged)  # the registry imports it by name at each call
    out = tmp_path / "loc"
    code, text = _cli(monkeypatch, capsys, "localize", "--model", "tiny:llama", "--data", f"pairs:{data}",
                      "--max-pairs", "4", "--top-k", "2", "--precision", "fp32", "--out", out)
    assert code == 2, text
    errs = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(errs) == 1 and "Traceback" not in text and "not finite" in errs[0] and "L1H0" in errs[0], text
    assert not out.exists()  # checked first: nothing was written
    assert not [p for p in (tmp_path / "cache" / "localize").rglob("*") if p.is_file()]  # nor cached


def test_nonfinite_problem_ignores_heads_that_were_not_computed():
    from locaudit.localize.causal import nonfinite_problem
    from locaudit.localize.corruptions import PatchingConfig
    from locaudit.localize.effects import HeadEffects

    per = torch.full((3, 2, 2), float("nan"))
    per[:, 0, 1] = torch.tensor([0.1, 0.2, 0.4])
    eff = HeadEffects.from_per_example(per, "patching")
    assert nonfinite_problem(eff, PatchingConfig(heads="L0H1")) is None  # only L0H1 was patched
    assert "L0H0" in nonfinite_problem(eff, PatchingConfig())
    one = HeadEffects.from_per_example(torch.randn(1, 2, 2), "attribution")  # one pair: no standard error
    assert nonfinite_problem(one, PatchingConfig()) is None
    one.effect[1, 1] = float("-inf")
    assert "1 head effect(s)" in nonfinite_problem(one, PatchingConfig())


# ---------------------------------------------------------------------------------------------- export both
def _iti_edit(lm, alpha: float):
    from locaudit.edit.iti import ITIEdit
    from locaudit.heads import HeadSet

    L, H, D = lm.sites.shape
    theta = torch.zeros(L, H * D)
    theta[1, :D] = 1.0
    return ITIEdit(theta, alpha=alpha, heads=HeadSet.parse("L1H0"), n_heads=H,
                   model={"name": "tiny:llama", "fingerprint": lm.fingerprint})


def _alphas(out: Path) -> dict:
    from locaudit.edit.export import EXPORT_META

    return {f: json.loads((out / f / EXPORT_META).read_text()).get("edit", json.loads(
        (out / f / EXPORT_META).read_text()).get("adapter_of"))["alpha"] for f in ("merged", "peft")}


def test_export_both_replaces_the_two_folders_as_one_unit(tmp_path, monkeypatch):
    import locaudit.edit.export as ex
    from locaudit.models.tiny import tiny_model

    lm = tiny_model("llama")
    out = tmp_path / "out"
    ex.export_both(_iti_edit(lm, 1.0), lm, out)
    (out / "NOTES.txt").write_text("mine")  # a file of the user's beside the exports
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert _alphas(out) == {"merged": 1.0, "peft": 1.0}

    # the adapter fails after the merged model is complete: neither folder changes
    def broken(*a, **k):
        raise OSError(28, "No space left on device", str(out / "peft"))

    monkeypatch.setattr(ex, "export_peft", broken)
    with pytest.raises(OSError):
        ex.export_both(_iti_edit(lm, 3.0), lm, out, overwrite=True)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not _temps(tmp_path)
    monkeypatch.undo()

    # an edit with no adapter form (the unedited model's) is refused before anything is written
    from locaudit.edit.base import NoEdit
    from locaudit.errors import ConfigError

    with pytest.raises(ConfigError, match="no adapter"):
        ex.export_both(NoEdit(), lm, tmp_path / "none")
    assert not (tmp_path / "none").exists()

    # success replaces both at once and keeps the user's file
    got = ex.export_both(_iti_edit(lm, 3.0), lm, out, overwrite=True)
    assert got == {"merged": out / "merged", "peft": out / "peft"}
    assert _alphas(out) == {"merged": 3.0, "peft": 3.0} and (out / "NOTES.txt").read_text() == "mine"
    assert not _temps(tmp_path)


_KILLED_EXPORT = r"""
import os, signal, sys
sys.path.insert(0, sys.argv[3])
import locaudit.edit.export as ex
from locaudit.models.tiny import tiny_model
from test_atomic_units import _iti_edit

def export_peft(*a, **k):  # the merged model of the new export is complete; die while writing the adapter
    os.kill(os.getpid(), signal.SIGKILL)
ex.export_peft = export_peft
lm = tiny_model("llama")
ex.export_both(_iti_edit(lm, 3.0), lm, sys.argv[1], overwrite=True)
"""


def test_export_both_killed_half_way_keeps_the_previous_pair(tmp_path):
    from locaudit.edit.export import export_both
    from locaudit.io import clean_stale_temps
    from locaudit.models.tiny import tiny_model

    lm = tiny_model("llama")
    out = tmp_path / "out"
    export_both(_iti_edit(lm, 1.0), lm, out)
    proc = subprocess.run([sys.executable, "-c", _KILLED_EXPORT, str(out), "", str(Path(__file__).parent)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert _alphas(out) == {"merged": 1.0, "peft": 1.0}  # the old pair, not a new merged beside an old adapter
    clean_stale_temps(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---------------------------------------------------------------------------------------------- file-size limit
_FSIZE = r"""
import resource, sys
from locaudit.cli.main import main
limit = int(sys.argv[1])
if limit:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
sys.argv = ["locaudit", *sys.argv[2:]]
main()
"""


def test_a_file_size_limit_is_one_line_naming_the_file_and_the_rerun_recovers(tmp_path):
    """RLIMIT_FSIZE (ulimit -f): Python ignores SIGXFSZ, so a write past the limit is EFBIG. The export's large
    file cannot be written: one error line naming it, exit 2, nothing left half written; the previous export
    stays whole, and the same command without the limit replaces it."""
    from locaudit.edit.export import EXPORT_META
    from locaudit.models.tiny import tiny_model

    lm = tiny_model("llama")
    edit_dir = _iti_edit(lm, 3.0).save(tmp_path / "edit")
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOCAUDIT_CACHE": str(tmp_path / "cache")}
    args = ["export", str(edit_dir), "--model", "tiny:llama", "--format", "merged", "--out", str(out), "--overwrite"]
    from locaudit.edit.export import export_merged

    export_merged(_iti_edit(lm, 1.0), lm, out)
    limit = 16 * 1024
    assert max(f.stat().st_size for f in out.rglob("*") if f.is_file()) > limit  # the export cannot fit under it
    proc = subprocess.run([sys.executable, "-c", _FSIZE, str(limit), *args], env=env, capture_output=True,
                          text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text[-3000:]
    errs = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(errs) == 1 and "Traceback" not in text, text[-3000:]
    assert "File too large" in errs[0] and str(tmp_path) in errs[0], errs[0]  # names the file it was writing
    assert json.loads((out / EXPORT_META).read_text())["edit"]["alpha"] == 1.0  # the previous export, whole
    assert not _temps(tmp_path), _temps(tmp_path)
    proc = subprocess.run([sys.executable, "-c", _FSIZE, "0", *args], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert json.loads((out / EXPORT_META).read_text())["edit"]["alpha"] == 3.0


_FSIZE_STUDY = r"""
import resource, sys
from pathlib import Path
sys.path.insert(0, sys.argv[4])
from test_atomic_units import FakeSteps
from locaudit.study import steps
from locaudit.cli.main import main

limit, run, study = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
fake = FakeSteps(run)
for kind in list(steps.STEPS):
    steps.STEPS[kind] = fake.step
for kind in list(steps.BATCHED):
    steps.BATCHED[kind] = fake.batched
if limit:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
sys.argv = ["locaudit", "run", study, "--out", str(run), "--no-report"]
main()
"""


def test_a_study_under_a_file_size_limit_fails_in_one_line_and_the_rerun_completes(tmp_path):
    """`locaudit run` with RLIMIT_FSIZE below what its files need: one error line naming a file of the run (no
    traceback), exit 2; the rerun without the limit ends with every trial done exactly once."""
    import yaml

    from locaudit.study.ledger import Ledger
    from locaudit.study.trials import expand

    spec = _spec(tmp_path)
    n = len(expand(spec))
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(STUDY))
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOCAUDIT_CACHE": str(tmp_path / "cache")}
    here = str(Path(__file__).parent)
    proc = subprocess.run([sys.executable, "-c", _FSIZE_STUDY, str(24 * 1024), str(run), str(tmp_path / "study.yaml"),
                           here], env=env, capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text[-3000:]
    errs = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(errs) == 1 and "Traceback" not in text and str(run) in errs[0], text[-3000:]
    proc = subprocess.run([sys.executable, "-c", _FSIZE_STUDY, "0", str(run), str(tmp_path / "study.yaml"), here],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    with Ledger(run) as led:
        rows = led.rows()
        done = [e["key"] for e in led.events() if e["event"] == "done"]
    assert len(rows) == n and all(r["status"] == "done" for r in rows)
    assert sorted(done) == sorted(r["key"] for r in rows)
    assert not _temps(run)
