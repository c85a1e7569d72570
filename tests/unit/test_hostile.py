"""Hostile inputs and faults (issue 15): every case is one entry of CASES, run by one parametrised test.

Groups: finite-or-failed (NaN/inf never ends "done"), bounded parsing (YAML bombs, huge values),
recoverable runs (damaged ledgers, damaged artifacts, --repair), shareable artifacts (umask), errors
that are one line (exit code 2), and no silent damage to inputs. Cases that already passed before the
hardening are kept here too, so none regresses. Tiny models only, fp32.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sqlite3
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from locaudit.errors import ConfigError, DataError
from locaudit.study.ledger import Ledger, LedgerDamagedError, repair
from locaudit.study.runner import run_study
from locaudit.study.spec import load_study, parse_study
from locaudit.study.trials import expand

STUDY = {
    "name": "hostile",
    "model": {"name": "tiny:llama"},
    "data": {"spec": "pairs:pairs.jsonl"},
    "localizers": {"probe": {"top_k": 2}, "random": {"n": 2}, "single": {"n": 1}},
    "iti": {"alphas": [1.0]},
    "optimal": {"taus": [0.1]},
}


@dataclass
class Env:
    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    capsys: pytest.CaptureFixture
    caplog: pytest.LogCaptureFixture


CASES: list[Callable[[Env], None]] = []


def case(fn: Callable[[Env], None]) -> Callable[[Env], None]:
    CASES.append(fn)
    return fn


# ---------------------------------------------------------------------------------------------- helpers
def spec_of(tmp: Path, **over):
    (tmp / "pairs.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    return parse_study({**STUDY, **over}, tmp, "hostile.yaml")


def study_file(tmp: Path, text: str) -> Path:
    (tmp / "pairs.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    p = tmp / "study.yaml"
    p.write_text(text)
    return p


class Steps:
    """A fake group function: deterministic metrics, and an artifact folder trials/KEY/eval per trial."""

    def __init__(self, nan_kinds: tuple[str, ...] = ()) -> None:
        self.ran: list[str] = []
        self.nan_kinds = nan_kinds

    def __call__(self, trials, spec, run_dir):
        for t in trials:
            self.ran.append(t.key)
            d = Path(run_dir) / "trials" / t.key / "eval"
            d.mkdir(parents=True, exist_ok=True)
            (d / "metrics.json").write_text(json.dumps({"key": t.key}))
            v = int(hashlib.sha256(t.key.encode()).hexdigest()[:6], 16) / 16**6
            mc1 = float("nan") if t.kind in self.nan_kinds else v
            yield t.key, {"metrics": {"mc1": mc1, "kl": v / 10}, "artifacts": {"eval": f"trials/{t.key}/eval"}}


def fake_run(env: Env, **over) -> tuple[object, Path, Steps]:
    spec = spec_of(env.tmp, **over)
    run = env.tmp / "run"
    fn = Steps()
    s = run_study(spec, run, fn=fn, progress=False)
    assert s.done == len(expand(spec)) and s.failed == 0
    return spec, run, fn


def cli(env: Env, *args) -> tuple[int, str]:
    """Run `locaudit ARGS` in this process through main() (its error handling); (exit code, output)."""
    from locaudit.cli.main import main

    env.monkeypatch.setattr(sys, "argv", ["locaudit", *map(str, args)])
    env.monkeypatch.setenv("COLUMNS", "300")  # help text on one line per option
    env.monkeypatch.setenv("TERMINAL_WIDTH", "300")
    env.capsys.readouterr()
    with pytest.raises(SystemExit) as ei:
        main()
    out = env.capsys.readouterr()
    code = ei.value.code if isinstance(ei.value.code, int) else (0 if ei.value.code is None else 1)
    return code, out.err + out.out


def one_line_error(code: int, out: str, *needles: str) -> None:
    assert code == 2, out
    errs = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(errs) == 1 and "Traceback" not in out, out
    for n in needles:
        assert n in errs[0], (n, errs[0])


def bad_spec(tmp: Path, match: str, **over) -> None:
    with pytest.raises(ConfigError, match="(?s)" + match):
        spec_of(tmp, **over)


def train_kwargs() -> dict:
    """fp32 on CPU whatever the TrainConfig spells it (precision, or the older autocast flag)."""
    from locaudit.edit.config import TrainConfig

    return {"precision": "fp32"} if "precision" in TrainConfig.model_fields else {"autocast": False}


# ---------------------------------------------------------------------------------------------- 1. finite or failed
@case
def nan_alpha_is_refused(env: Env) -> None:
    bad_spec(env.tmp, r"iti\.alphas\.0", iti={"alphas": [float("nan")]})


@case
def inf_alpha_is_refused(env: Env) -> None:
    bad_spec(env.tmp, r"iti\.alphas\.0", iti={"alphas": [float("inf")]})


@case
def inf_learning_rate_is_refused(env: Env) -> None:
    bad_spec(env.tmp, r"optimal\.lr\.top\.0", optimal={"lr": {"top": [float("inf")]}})


@case
def inf_tau_is_refused(env: Env) -> None:
    bad_spec(env.tmp, r"optimal\.taus\.0", optimal={"taus": [float("inf")]})


@case
def nan_fraction_is_refused(env: Env) -> None:
    over = {"data": {"spec": "pairs:pairs.jsonl", "fractions": [float("nan"), 0.5, 0.5]}}
    bad_spec(env.tmp, r"data\.fractions", **over)


@case
def yaml_nan_in_a_study_file_is_refused(env: Env) -> None:
    p = study_file(env.tmp, "name: x\ndata: {spec: 'pairs:pairs.jsonl'}\niti: {alphas: [.nan]}\n")
    with pytest.raises(ConfigError, match=r"(?s)study\.yaml.*iti\.alphas\.0: Input should be a finite number"):
        load_study(p)


@case
def nan_metric_keeps_out_of_done(env: Env) -> None:
    spec = spec_of(env.tmp)
    run = env.tmp / "run"
    s = run_study(spec, run, fn=Steps(nan_kinds=("optimal",)), progress=False)
    n_opt = sum(t.kind == "optimal" for t in expand(spec))
    assert s.failed == n_opt > 0
    with Ledger(run) as led:
        failed = led.rows(status="failed")
        done = led.rows(status="done")
    assert all(math.isfinite(v) for r in done for v in r["metrics"].values())
    err = failed[0]["error"]
    assert failed[0]["key"] in err and "mc1 = nan" in err and "learning rate" in err, err
    assert not (run / "trials" / failed[0]["key"] / "result.json").exists()


@case
def flatten_metrics_keeps_nan_but_drops_metrics_of_empty_data(env: Env) -> None:
    from locaudit.study.steps import flatten_metrics

    out = flatten_metrics({"mc1": 0.0, "mc2": float("nan"), "n_mc": 5, "pref_acc": float("nan"), "n_pairs": 0})
    assert math.isnan(out["mc2"]) and "pref_acc" not in out and out["mc1"] == 0.0


@case
def ledger_refuses_non_finite_metrics(env: Env) -> None:
    spec = spec_of(env.tmp)
    t = expand(spec)[0]
    with Ledger(env.tmp / "run", writer=True) as led:
        led.sync([t])
        led.mark_running([t.key])
        with pytest.raises(ValueError, match="non-finite"):
            led.finish(t.key, "done", {"kl": float("inf")})
        assert led.row(t.key)["status"] == "running"


@case
def divergence_names_exploding_parameters_and_the_learning_rate(env: Env) -> None:
    from locaudit.edit.train import TrainLog, divergence

    tlog = TrainLog("L0H0", 1e6, before={"val_loss": 25.0}, epochs=[{"val_loss": 24.0}])
    a = torch.zeros(2, 1, 8)
    assert divergence(a, a, tlog) is None
    msg = divergence(a, torch.full((2, 1, 8), 5e30), tlog)
    assert "exploded" in msg and "lr=1e+06" in msg
    assert "non-finite" in divergence(a, torch.full((2, 1, 8), float("nan")), tlog)
    rising = TrainLog("L0H0", 0.5, before={"val_loss": 0.69}, epochs=[{"val_loss": 40.0}])
    assert "rose from 0.69 to 40" in divergence(a, a, rising)


@case
def huge_learning_rate_fails_training_and_saves_nothing(env: Env) -> None:
    from locaudit.data.types import PreferencePair
    from locaudit.edit.train import TrainingError, train_edit
    from locaudit.heads import HeadSet
    from locaudit.models.tiny import tiny_model

    lm = tiny_model("llama", seed=0)
    pairs = [PreferencePair(qid=f"q{i}", question=f"Question {i}?", chosen=f"yes {i}", rejected=f"no {i}")
             for i in range(8)]
    with pytest.raises(TrainingError, match=r"diverged.*lr=1e\+06"):
        train_edit(lm, HeadSet.parse("L1H0"), pairs[:6], pairs[6:], lr=1e6, epochs=1, batch_size=2,
                   progress=False, reference_disk_cache=False, **train_kwargs())


@case
def nan_activations_are_refused_by_the_probe(env: Env) -> None:
    from locaudit.localize.probe import probe_activations

    acts = _nan_activations(env.tmp)
    with pytest.raises(DataError, match=r"activations\.safetensors: non-finite values .* example 1"):
        probe_activations(acts)


@case
def nan_activations_are_refused_by_iti(env: Env) -> None:
    from locaudit.edit.iti import fit_iti
    from locaudit.heads import HeadSet

    acts = _nan_activations(env.tmp)
    with pytest.raises(DataError, match=r"non-finite activations"):
        fit_iti(acts, HeadSet.parse("L0H0,L1H1"), alpha=5.0)


def _nan_activations(tmp: Path):
    from locaudit.localize.activations import ActivationSet

    X = torch.randn(8, 2, 2, 4)
    X[1, 0, 0, 0] = float("nan")
    ex = [{"qid": f"q{i // 2}", "text": "t", "label": i % 2, "split": "train" if i < 4 else "val"} for i in range(8)]
    ActivationSet(X, ex, {}).save(tmp / "acts")
    return ActivationSet.load(tmp / "acts")


@case
def nan_iti_file_is_refused(env: Env) -> None:
    from locaudit.edit.iti import ITIEdit
    from locaudit.heads import HeadSet

    theta = torch.zeros(2, 8)
    theta[0, :4] = 1.0  # L0H0 of 2 heads x 4 dims
    d = ITIEdit(theta, alpha=1.0, heads=HeadSet.parse("L0H0"), n_heads=2).save(env.tmp / "iti")
    from safetensors.torch import save_file

    save_file({"theta": torch.full((2, 8), float("nan"))}, str(d / "iti.safetensors"))
    with pytest.raises(ConfigError, match=r"iti\.safetensors: tensor 'theta' must be a finite"):
        ITIEdit.load(d)


@case
def nan_alpha_on_the_command_line_is_one_line(env: Env) -> None:
    from locaudit.localize.activations import ActivationSet

    X = torch.randn(8, 2, 2, 4)
    ex = [{"qid": f"q{i // 2}", "text": "t", "label": i % 2, "split": "train" if i < 4 else "val"} for i in range(8)]
    ActivationSet(X, ex, {}).save(env.tmp / "acts")
    code, out = cli(env, "iti", "--activations", env.tmp / "acts", "--heads", "L0H0", "--alpha", "nan",
                    "--out", env.tmp / "iti")
    one_line_error(code, out, "--alpha nan: must be a finite number")
    assert not (env.tmp / "iti").exists()


# ---------------------------------------------------------------------------------------------- 2. bounded parsing
BOMB = "\n".join(
    ["name: &a [" + ",".join(['"lol"'] * 9) + "]"]
    + [f"{c}: &{c} [" + ",".join([f"*{p}"] * 9) + "]" for p, c in zip("abcdefgh", "bcdefghi")]
    + ["description: *i", "data: {spec: *i}", ""])


@case
def billion_laughs_is_refused_in_under_a_second(env: Env) -> None:
    p = study_file(env.tmp, BOMB)
    assert len(BOMB) < 700
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"study\.yaml: not valid YAML: more than \d+ YAML aliases"):
        load_study(p)
    assert time.perf_counter() - t0 < 1.0


@case
def billion_laughs_dry_run_is_one_line(env: Env) -> None:
    p = study_file(env.tmp, BOMB)
    t0 = time.perf_counter()
    code, out = cli(env, "run", p, "--dry-run", "--out", env.tmp / "run")
    one_line_error(code, out, "aliases")
    assert time.perf_counter() - t0 < 1.0


@case
def a_few_aliases_still_load(env: Env) -> None:
    p = study_file(env.tmp, "name: x\ndata: {spec: 'pairs:pairs.jsonl'}\n"
                   "iti: {alphas: &g [1.0, 2.0]}\noptimal: {taus: [0.1], lr: {top: *g, random: *g}}\n")
    spec = load_study(p)
    assert spec.optimal.lr.top == [1.0, 2.0]


@case
def huge_bad_value_renders_bounded(env: Env) -> None:
    from locaudit.study.spec import bounded_repr

    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as ei:
        parse_study({"name": ["x" * 10_000] * 10_000, "data": {"spec": "pairs:p.jsonl"},
                     "iti": {"alphas": [float("nan")] * 5000}}, env.tmp)
    assert len(str(ei.value)) < 4000 and "the first 20 of" in str(ei.value)
    deep: list = []
    for _ in range(10_000):
        deep = [deep, deep]
    assert len(bounded_repr(deep)) <= 80
    # naive rendering of `deep` never ends (2**10000 nodes) and of the name takes 100 MB; bounded rendering is
    # about a second on a loaded 2-core CPU (the 100 MB input itself costs that): a guard, not a benchmark
    assert time.perf_counter() - t0 < 10.0


@case
def non_utf8_study_file_is_one_error(env: Env) -> None:
    p = env.tmp / "study.yaml"
    p.write_bytes(b"name: caf\xe9\ndata: {spec: x}\n")
    with pytest.raises(ConfigError, match=r"study\.yaml: not UTF-8"):
        load_study(p)


@case
def oversized_study_file_is_refused(env: Env) -> None:
    p = env.tmp / "study.yaml"
    p.write_text("name: x\n" + "# " + "x" * (1 << 20) + "\n")
    with pytest.raises(ConfigError, match="a study file is at most"):
        load_study(p)


@case
def study_path_that_is_a_folder_is_refused(env: Env) -> None:
    with pytest.raises(ConfigError, match="is not a file"):
        load_study(env.tmp)


@case
def python_yaml_tags_are_refused(env: Env) -> None:  # passed before: safe loading only
    p = study_file(env.tmp, "name: !!python/object/apply:os.system ['touch pwned']\ndata: {spec: x}\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_study(p)
    assert not Path("pwned").exists()


@case
def unknown_field_is_named(env: Env) -> None:  # passed before
    bad_spec(env.tmp, r"iti\.alphaz: unknown field", iti={"alphaz": [1.0]})


@case
def unset_variable_is_named(env: Env) -> None:  # passed before
    env.monkeypatch.delenv("LOCAUDIT_NO_SUCH_VAR", raising=False)
    bad_spec(env.tmp, r"data\.spec: environment variable \$\{LOCAUDIT_NO_SUCH_VAR\}",
             data={"spec": "pairs:${LOCAUDIT_NO_SUCH_VAR}/p.jsonl"})


# ---------------------------------------------------------------------------------------------- 3. recoverable runs
@case
def truncated_ledger_is_named_with_the_repair_hint(env: Env) -> None:
    _, run, _ = fake_run(env)
    db = run / "ledger.sqlite"
    with sqlite3.connect(str(db)) as con:  # fold the WAL in, so truncation hits the real content
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = db.read_bytes()
    db.write_bytes(data[: max(4096, len(data) // 3)])
    for writer in (False, True):
        with pytest.raises(LedgerDamagedError, match=r"ledger\.sqlite.*--repair"):
            Ledger(run, writer=writer)


@case
def overwritten_ledger_is_named(env: Env) -> None:
    _, run, _ = fake_run(env)
    (run / "ledger.sqlite").write_bytes(b"garbage " * 3000)
    with pytest.raises(LedgerDamagedError, match=r"ledger\.sqlite is damaged: not an SQLite database"):
        Ledger(run)


@case
def empty_ledger_beside_trial_folders_is_not_a_new_run(env: Env) -> None:
    spec, run, _ = fake_run(env)
    for suffix in ("-wal", "-shm"):
        Path(str(run / "ledger.sqlite") + suffix).unlink(missing_ok=True)
    (run / "ledger.sqlite").write_bytes(b"")
    with pytest.raises(LedgerDamagedError, match=r"empty \(0 bytes\).*trial folders"):
        run_study(spec, run, fn=Steps(), progress=False)
    fresh = env.tmp / "fresh"
    fresh.mkdir()
    (fresh / "ledger.sqlite").write_bytes(b"")  # nothing to lose: a new run
    assert run_study(spec, fresh, fn=Steps(), progress=False).failed == 0


@case
def repair_rebuilds_the_ledger_with_a_backup(env: Env) -> None:
    spec, run, _ = fake_run(env)
    with Ledger(run) as led:
        before = {r["key"]: r["metrics"] for r in led.rows()}
    (run / "ledger.sqlite").write_bytes(b"\0" * 20_000)
    r = repair(run, expand(spec), {"spec": spec.to_json()})
    assert not r["healthy"] and r["restored"] == len(before) and r["pending"] == 0
    assert Path(r["backup"]).read_bytes() == b"\0" * 20_000
    fn = Steps()
    s = run_study(spec, run, fn=fn, progress=False)
    assert fn.ran == [] and s.counts["done"] == len(before)
    with Ledger(run) as led:
        assert {r["key"]: r["metrics"] for r in led.rows()} == before
    assert repair(run, expand(spec), {})["healthy"]


@case
def repair_reruns_a_trial_whose_artifacts_are_damaged(env: Env) -> None:
    spec, run, _ = fake_run(env)
    key = expand(spec)[-1].key
    (run / "trials" / key / "eval" / "metrics.json").write_text("tampered")
    (run / "ledger.sqlite").unlink()
    r = repair(run, expand(spec), {"spec": spec.to_json()})
    assert r["backup"] is None and r["pending"] == 1
    fn = Steps()
    run_study(spec, run, fn=fn, progress=False)
    assert fn.ran == [key]


@case
def cli_repair_then_resume(env: Env) -> None:
    spec, run, _ = fake_run(env)
    (run / "ledger.sqlite").write_bytes(b"")
    p = env.tmp / "study.yaml"
    import yaml

    p.write_text(yaml.safe_dump({k: v for k, v in spec.to_json().items() if k != "base_dir"}))
    code, out = cli(env, "run", p, "--out", run, "--repair", "--dry-run")
    assert code == 0 and "ledger rebuilt" in out and " new " not in out, out


@case
def done_trial_with_damaged_artifacts_runs_again(env: Env) -> None:
    spec, run, _ = fake_run(env)
    key = expand(spec)[2].key
    (run / "trials" / key / "eval" / "metrics.json").write_text("{}")
    fn = Steps()
    run_study(spec, run, fn=fn, progress=False)
    assert fn.ran == [key]
    with Ledger(run) as led:
        assert led.row(key)["status"] == "done" and led.row(key)["attempts"] == 2
        assert any(e["event"] == "invalid" and "artifact eval" in e["detail"] and "metrics.json: size" in e["detail"]
                   for e in led.events(key))


@case
def checksums_catch_changed_missing_and_resized_files(env: Env) -> None:
    from locaudit.io import verify_checksums, write_checksums

    d = env.tmp / "art"
    (d / "sub").mkdir(parents=True)
    (d / "a.bin").write_bytes(b"12345")
    (d / "sub" / "b.txt").write_text("x")
    write_checksums(d)
    assert verify_checksums(d) is None
    (d / "a.bin").write_bytes(b"12346")
    assert "a.bin: content differs" in verify_checksums(d)
    (d / "a.bin").write_bytes(b"1")
    assert "size 1 bytes" in verify_checksums(d)
    (d / "sub" / "b.txt").unlink()
    write_checksums(d)
    (d / "checksums.json").write_text("{not json")
    assert "unreadable" in verify_checksums(d)


def _layer0(t: torch.Tensor) -> torch.Tensor:
    """`t` [L, r, dim] kept on layer 0 only: a LoRA edit at L0H0 is zero on every other layer."""
    t = t.clone()
    t[1:] = 0
    return t


@case
def garbage_trained_edit_folder_is_retrained_not_trusted(env: Env) -> None:
    from locaudit.edit.lora import LoRAEdit
    from locaudit.heads import HeadSet
    from locaudit.io import write_checksums
    from locaudit.study.steps import TRAINED_MARKER, trained_ok

    d = env.tmp / "optimal"
    LoRAEdit(torch.zeros(2, 1, 8), _layer0(torch.ones(2, 1, 8)), HeadSet.parse("L0H0")).save(d)
    (d / TRAINED_MARKER).write_text("{}")
    write_checksums(d)
    assert trained_ok(d)
    (d / "edit.safetensors").write_bytes(os.urandom(300))
    assert not trained_ok(d)
    (d / "checksums.json").unlink()  # a folder from before checksums: loaded, and refused as garbage
    assert not trained_ok(d)


@case
def garbage_lora_files_name_the_file(env: Env) -> None:
    from locaudit.edit.lora import LoRAEdit
    from locaudit.heads import HeadSet

    d = LoRAEdit(torch.zeros(2, 1, 8), _layer0(torch.ones(2, 1, 8)), HeadSet.parse("L0H0")).save(env.tmp / "e")
    (d / "edit.safetensors").write_bytes(b"\xff\xfe" + os.urandom(200))
    with pytest.raises(DataError, match=r"edit\.safetensors: not a readable safetensors"):
        LoRAEdit.load(d)
    (d / "meta.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match=r"meta\.json: malformed"):
        LoRAEdit.load(d)


@case
def garbage_edit_meta_names_the_file(env: Env) -> None:
    from locaudit.edit.base import load_edit

    (env.tmp / "e").mkdir()
    (env.tmp / "e" / "meta.json").write_bytes(os.urandom(64) + b"\xff")
    with pytest.raises(ConfigError, match=r"meta\.json: malformed"):
        load_edit(env.tmp / "e")


@case
def nan_lora_weights_are_refused(env: Env) -> None:
    from locaudit.edit.lora import LoRAEdit
    from locaudit.heads import HeadSet

    d = LoRAEdit(torch.zeros(2, 1, 8), _layer0(torch.ones(2, 1, 8)), HeadSet.parse("L0H0")).save(env.tmp / "e")
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2, 1, 8), "b": torch.full((2, 1, 8), float("inf"))}, str(d / "edit.safetensors"))
    with pytest.raises(DataError, match=r"edit\.safetensors: the edit has non-finite values"):
        LoRAEdit.load(d)


@case
def second_run_on_one_folder_is_refused(env: Env) -> None:  # passed before
    with Ledger(env.tmp / "run", writer=True):
        with pytest.raises(ConfigError, match=r"another locaudit run is using"):
            Ledger(env.tmp / "run", writer=True)


@case
def read_only_run_folder_is_one_error(env: Env) -> None:
    import locaudit.study.ledger as ledger_mod

    real_open = os.open

    def deny(path, *a, **k):
        if str(path).endswith(".lock"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    env.monkeypatch.setattr(ledger_mod.os, "open", deny)
    with pytest.raises(ConfigError, match=r"cannot write the lock file .*\.lock: Permission denied"):
        Ledger(env.tmp / "run", writer=True)


# ---------------------------------------------------------------------------------------------- 4. shareable artifacts
@case
def atomic_files_follow_the_umask(env: Env) -> None:
    from locaudit.io import write_text_atomic

    old = os.umask(0o022)
    try:
        write_text_atomic(env.tmp / "a.txt", "x")
        assert stat.S_IMODE((env.tmp / "a.txt").stat().st_mode) == 0o644
        os.umask(0o002)
        write_text_atomic(env.tmp / "b.txt", "x")
        assert stat.S_IMODE((env.tmp / "b.txt").stat().st_mode) == 0o664
        os.chmod(env.tmp / "a.txt", 0o600)  # replacing a file keeps its mode, as open("w") would
        write_text_atomic(env.tmp / "a.txt", "y")
        assert stat.S_IMODE((env.tmp / "a.txt").stat().st_mode) == 0o600
    finally:
        os.umask(old)


@case
def run_folder_files_are_readable_by_others(env: Env) -> None:
    old = os.umask(0o022)
    try:
        _, run, _ = fake_run(env)
    finally:
        os.umask(old)
    files = [f for f in run.rglob("*") if f.is_file() and f.name != ".lock"]
    assert files and all(f.stat().st_mode & 0o044 == 0o044 for f in files), \
        [f for f in files if f.stat().st_mode & 0o044 != 0o044]


# ---------------------------------------------------------------------------------------------- 5. errors, not tracebacks
@case
def missing_local_model_folder_is_named(env: Env) -> None:
    from locaudit.models.loading import load_model

    with pytest.raises(ConfigError, match=r"looked for a local model folder .*no-such-model, which does not exist"):
        load_model("./no-such-model")


@case
def unknown_hub_id_offline_says_the_hub_is_unreachable(env: Env) -> None:
    from locaudit.models.loading import load_model

    import huggingface_hub.constants

    env.monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    env.monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    env.monkeypatch.chdir(env.tmp)
    with pytest.raises(ConfigError, match=r"model 'nosuchorg/nosuchmodel': .*(hub is unreachable offline|the hub is not "
                                          r"asked as HF_HUB_OFFLINE is set)"):
        load_model("nosuchorg/nosuchmodel")


@case
def model_path_that_is_a_file_is_named(env: Env) -> None:
    from locaudit.models.loading import load_model

    (env.tmp / "model.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"model\.txt is a file, not a model folder"):
        load_model(str(env.tmp / "model.txt"))


@case
def every_model_loading_command_has_trust_remote_code(env: Env) -> None:
    for cmd in (["collect"], ["edit"], ["iti"], ["eval"], ["judge", "eval"], ["judge", "score"]):
        code, out = cli(env, *cmd, "--help")
        assert code == 0 and "--trust-remote-code" in out, (cmd, out[-500:])


@case
def edit_cli_with_huge_lr_fails_and_saves_nothing(env: Env) -> None:
    from locaudit.models.tiny import tiny_model

    lm = tiny_model("llama")
    lm.model.save_pretrained(str(env.tmp / "model"))
    lm.tokenizer.save_pretrained(str(env.tmp / "model"))
    data = env.tmp / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is item {i}?", "chosen": f"Good {i % 4}.",
                                        "rejected": f"Bad bad {i % 3}!"}) + "\n" for i in range(30)))
    env.monkeypatch.setenv("LOCAUDIT_CACHE", str(env.tmp / "cache"))
    _, helptext = cli(env, "edit", "--help")
    fp32 = ["--precision", "fp32"] if "--precision" in helptext else ["--no-autocast"]
    code, out = cli(env, "edit", "--model", env.tmp / "model", "--data", f"pairs:{data}", "--heads", "L1H2",
                    "--epochs", "1", "--lr", "1e6", "--no-progress", "--no-checkpointing", *fp32, "--out", env.tmp / "e")
    one_line_error(code, out, "diverged", "lr=1e+06", "not saved")
    assert not (env.tmp / "e").exists()


@case
def report_on_a_damaged_ledger_is_one_line(env: Env) -> None:
    _, run, _ = fake_run(env)
    (run / "ledger.sqlite").write_bytes(b"x" * 5000)
    one_line_error(*cli(env, "report", run), "ledger.sqlite", "--repair")


@case
def report_on_a_file_is_one_line(env: Env) -> None:
    (env.tmp / "f.txt").write_text("x")
    one_line_error(*cli(env, "report", env.tmp / "f.txt"), "f.txt", "not a run folder")


@case
def report_on_a_non_run_folder_writes_nothing(env: Env) -> None:
    (env.tmp / "empty").mkdir()
    one_line_error(*cli(env, "report", env.tmp / "empty"), "not a run folder")
    assert not (env.tmp / "empty" / "report").exists()


@case
def report_with_zero_resamples_is_one_line(env: Env) -> None:
    _, run, _ = fake_run(env)
    one_line_error(*cli(env, "report", run, "--resamples", "0"), "--resamples 0")


@case
def missing_data_file_is_one_line(env: Env) -> None:  # passed before
    p = env.tmp / "study.yaml"
    p.write_text("name: x\ndata: {spec: 'pairs:nowhere.jsonl'}\n")
    one_line_error(*cli(env, "run", p, "--dry-run"), "data.spec", "nowhere.jsonl")


@case
def non_utf8_caa_file_is_named(env: Env) -> None:
    from locaudit.data.caa import load_caa

    p = env.tmp / "caa.json"
    p.write_bytes(b'[{"question": "caf\xe9"}]')
    with pytest.raises(DataError, match=r"caa\.json: not UTF-8"):
        load_caa(p)


@case
def non_utf8_pairs_file_is_named(env: Env) -> None:  # passed before
    from locaudit.data.pairs import load_pairs

    p = env.tmp / "p.jsonl"
    p.write_bytes(b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(DataError, match=r"p\.jsonl: not UTF-8"):
        load_pairs(p)


@case
def non_utf8_truthfulqa_file_is_named(env: Env) -> None:  # passed before
    from locaudit.data.truthfulqa import load_truthfulqa

    p = env.tmp / "tqa.csv"
    p.write_bytes(b"Type,Category,Question\nx,y,caf\xe9\n")
    with pytest.raises(DataError, match=r"tqa\.csv: not UTF-8"):
        load_truthfulqa(p)


# ---------------------------------------------------------------------------------------------- 6. no silent damage
@case
def long_answer_keeps_its_question_and_warns(env: Env) -> None:
    from locaudit.models.scoring import encode_completions
    from locaudit.models.tiny import tiny_model

    tok = tiny_model("llama").tokenizer
    env.caplog.set_level(logging.WARNING, logger="locaudit.models.scoring")
    prompt = "Q: What happens if you crack your knuckles a lot?\nA:"
    enc = encode_completions(tok, [prompt, "Q: short?\nA:"], [" yes" * 2000, " no"], max_length=64)
    (p, c), (p2, c2) = enc
    n_prompt = len(tok(prompt)["input_ids"])
    assert len(p) == min(n_prompt, 16) and len(p) + len(c) == 64 and len(p2) == len(tok("Q: short?\nA:")["input_ids"])
    assert "1 of 2 (prompt, completion) pairs exceed max_length=64" in env.caplog.text
    assert "1 completion(s) cut at the end" in env.caplog.text


@case
def long_prompt_is_cut_at_its_start_first(env: Env) -> None:
    from locaudit.models.scoring import encode_completions
    from locaudit.models.tiny import tiny_model

    tok = tiny_model("llama").tokenizer
    env.caplog.set_level(logging.WARNING, logger="locaudit.models.scoring")
    prompt = "context " * 200 + "Q: last words?\nA:"
    (p, c), = encode_completions(tok, [prompt], [" an answer"], max_length=64)
    full_p, full_c = tok(prompt)["input_ids"], tok(" an answer", add_special_tokens=False)["input_ids"]
    assert c == full_c and p == full_p[-(64 - len(c)):]
    assert "1 prompt(s) cut at the start, 0 completion(s)" in env.caplog.text


@case
def identical_chosen_and_rejected_pair_is_refused_with_its_line(env: Env) -> None:
    from locaudit.data.pairs import load_pairs

    p = env.tmp / "p.jsonl"
    p.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "same", "rejected": " same"}\n')
    with pytest.raises(DataError, match=r"p\.jsonl:2: chosen and rejected are the same text 'same'"):
        load_pairs(p)


@case
def identical_caa_answers_are_refused_with_the_item(env: Env) -> None:
    from locaudit.data.caa import load_caa

    p = env.tmp / "caa.json"
    item = {"question": "Pick (A) or (B)", "answer_matching_behavior": "(A)", "answer_not_matching_behavior": "(A)"}
    p.write_text(json.dumps([item]))
    with pytest.raises(DataError, match=r"caa\.json: item 0: .* same text"):
        load_caa(p)


@case
def duplicate_single_heads_are_merged_with_a_warning(env: Env) -> None:
    with pytest.warns(UserWarning, match=r"'1\.1' is 'L1H1' again; merged"):
        spec = spec_of(env.tmp, localizers={"probe": {"top_k": 2}, "random": {"n": 1},
                                            "single": {"heads": ["L1H1", "1.1", "L0H2"]}})
    assert spec.localizers.single.heads == ["L1H1", "L0H2"]
    singles = [t for t in expand(spec) if t.kind == "optimal" and t.group == "single"]
    assert len(singles) == 2


@case
def duplicate_heads_in_a_head_set_warn(env: Env) -> None:
    from locaudit.heads import HeadSet

    with pytest.warns(UserWarning, match=r"names L1H1 more than once; merged into 2 distinct heads"):
        hs = HeadSet.parse("L1H1,1.1,L2H0")
    assert len(hs) == 2


@case
def zero_random_draws_with_random_localizers_is_refused(env: Env) -> None:
    bad_spec(env.tmp, r"random draws no heads \(n: 0\) but 'random' is listed in iti\.localizers and "
             r"optimal\.localizers", localizers={"random": {"n": 0}})
    spec = spec_of(env.tmp, localizers={"random": {"n": 0}}, iti={"localizers": ["top"]},
                   optimal={"localizers": ["top", "all"]})  # a table of edits, no localization test
    assert not [t for t in expand(spec) if t.group == "random"]


@case
def absolute_path_study_name_stays_under_runs(env: Env) -> None:
    spec = spec_of(env.tmp, name="/etc/../tmp/evil")
    d = spec.default_run_dir()
    assert d.parent == Path("runs") and d.name.startswith("etc-..-tmp-evil-") and "/" not in d.name
    d = spec_of(env.tmp, name="..").default_run_dir()
    assert d.parent == Path("runs") and d.name.startswith("study-")


@case
def dry_run_with_absolute_name_touches_nothing_outside(env: Env) -> None:
    target = env.tmp / "elsewhere"
    p = study_file(env.tmp, f"name: {target}\ndata: {{spec: 'pairs:pairs.jsonl'}}\n")
    env.monkeypatch.chdir(env.tmp)
    code, out = cli(env, "run", p, "--dry-run")
    assert code == 0 and not target.exists(), out


@case
def garbage_probe_folder_is_named_and_no_stale_heatmap_is_kept(env: Env) -> None:
    from locaudit.study import report as report_mod

    bad = env.tmp / "other" / "shared" / "probe-x"
    bad.mkdir(parents=True)
    (bad / "probes.safetensors").write_bytes(b"\x00garbage" * 10)
    notes: list[str] = []
    rows = [{"kind": "probe", "status": "done", "artifacts": {"probe": "shared/probe-x"}}]
    assert report_mod._probe(env.tmp / "other", rows, notes) is None
    assert len(notes) == 1 and str(bad) in notes[0]
    spec, run, _ = fake_run(env)
    (run / "report").mkdir(exist_ok=True)
    stale = run / "report" / "probe_heatmap.png"
    stale.write_bytes(b"an old heatmap")
    report_mod.build_report(run, n_resamples=99)
    assert not stale.exists()


@case
def nan_answer_scores_give_nan_mc_not_zero(env: Env) -> None:
    import math

    from locaudit.evaluate.mc import mc1_score, mc2_score

    assert math.isnan(mc1_score([float("nan"), -3.0], [1, 0]))
    assert math.isnan(mc2_score([float("nan"), -3.0], [1, 0]))


@case
def judge_train_has_trust_remote_code(env: Env) -> None:
    from locaudit.evaluate.judges.train import JudgeTrainConfig

    code, out = cli(env, "judge", "train", "--help")
    assert code == 0 and "--trust-remote-code" in out
    assert JudgeTrainConfig.model_fields["trust_remote_code"].default is False


# ---------------------------------------------------------------------------------------------- 7. issue 27
# nothing destroyed before success; every artifact checked when read; an edit is what it declares
def _iti(lm, outside: bool = False, alpha: float = 2.0):
    from locaudit.edit.iti import ITIEdit
    from locaudit.heads import HeadSet

    L, H, D = lm.sites.shape
    theta = torch.zeros(L, H * D)
    theta[1, :D] = 0.5  # L1H0, the declared head
    if outside:
        theta[1, D: 2 * D] = 0.5  # L1H1: not declared ("top1, 1 head" acting on two)
    return ITIEdit(theta, alpha=alpha, heads=HeadSet.parse("L1H0"), n_heads=H,
                   model={"name": "tiny:llama", "fingerprint": lm.fingerprint})


def _unrelated(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("my unrelated notes")
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "data.csv").write_text("a,b\n1,2\n")
    return {str(p.relative_to(folder)): p.read_text() for p in folder.rglob("*") if p.is_file()}


def _files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in folder.rglob("*") if p.is_file()}


@case
def failing_export_with_overwrite_keeps_the_folder_it_would_replace(env: Env) -> None:
    from locaudit.edit.export import export_merged, export_peft
    from locaudit.models.tiny import tiny_model

    lm = tiny_model("llama")
    out = env.tmp / "out"
    before = _unrelated(out)
    other = _iti(lm)
    other.model = {"name": "tiny:llama", "fingerprint": "another-model"}
    with pytest.raises(ConfigError, match="fingerprint"):
        export_merged(other, lm, out, overwrite=True)
    assert _files(out) == before
    env.monkeypatch.setattr("safetensors.torch.save_file", _disk_full)  # fails while writing the adapter
    with pytest.raises(OSError, match="No space left"):
        export_peft(_iti(lm), lm, out, overwrite=True)
    assert _files(out) == before and sorted(p.name for p in env.tmp.iterdir()) == ["out"]


def _disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device", str(args[-1]) if args else "?")


@case
def leftovers_of_a_killed_export_do_not_block_the_rerun(env: Env) -> None:
    import subprocess

    from locaudit.edit.export import export_peft
    from locaudit.models.tiny import tiny_model

    dead = subprocess.Popen(["true"])
    dead.wait()
    (env.tmp / f"peft.tmp{dead.pid}").mkdir()  # what `export` left before issue 27
    (env.tmp / f"peft.tmp{dead.pid}" / "adapter_config.json").write_text("{")
    (env.tmp / f".peft.locaudit-tmp-{dead.pid}-ab12").mkdir()
    lm = tiny_model("llama")
    export_peft(_iti(lm), lm, env.tmp / "peft")
    assert sorted(p.name for p in env.tmp.iterdir()) == ["peft"]
    assert (env.tmp / "peft" / "adapter_model.safetensors").is_file()


@case
def exported_files_follow_the_umask(env: Env) -> None:
    from locaudit.edit.export import export_merged
    from locaudit.models.tiny import tiny_model

    lm = tiny_model("llama")
    old = os.umask(0o022)
    try:
        out = export_merged(_iti(lm), lm, env.tmp / "merged")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    assert modes["model.safetensors"] == 0o644 and modes["merged"] == 0o755, modes
    assert all(m in (0o644, 0o755) for m in modes.values()), modes


@case
def judge_training_into_a_folder_of_other_files_is_refused_before_work(env: Env) -> None:
    from locaudit.evaluate.judges.train import check_judge_target

    before = _unrelated(env.tmp / "judge")
    with pytest.raises(ConfigError, match=r"judge.* holds files that are not a judge's \(notes\.txt, sub\)"):
        check_judge_target(env.tmp / "judge")
    assert _files(env.tmp / "judge") == before


@case
def repair_after_an_io_failure_leaves_a_healthy_ledger_alone(env: Env) -> None:
    spec, run, _ = fake_run(env)
    data = (run / "ledger.sqlite").read_bytes()

    def io_error(self, writer, fresh=False):
        raise sqlite3.OperationalError("disk I/O error")

    env.monkeypatch.setattr(Ledger, "_connect", io_error)
    with pytest.raises(ConfigError, match=r"--repair: .*ledger\.sqlite cannot be used \(disk I/O error\); it was left"):
        repair(run, expand(spec), {})
    env.monkeypatch.undo()
    assert (run / "ledger.sqlite").read_bytes() == data
    assert not [p for p in run.iterdir() if ".damaged-" in p.name or "locaudit-tmp" in p.name]


@case
def repair_failing_midway_moves_nothing(env: Env) -> None:
    spec, run, _ = fake_run(env)
    (run / "ledger.sqlite").write_bytes(b"\0" * 20_000)
    real_sync = Ledger.sync

    def full(self, trials):
        raise sqlite3.OperationalError("database or disk is full")

    env.monkeypatch.setattr(Ledger, "sync", full)
    with pytest.raises(ConfigError, match=r"--repair: cannot write the rebuilt ledger .*disk is full.*left as it is"):
        repair(run, expand(spec), {})
    assert (run / "ledger.sqlite").read_bytes() == b"\0" * 20_000
    assert not [p for p in run.iterdir() if ".damaged-" in p.name or "locaudit-tmp" in p.name]
    env.monkeypatch.setattr(Ledger, "sync", real_sync)
    assert repair(run, expand(spec), {})["restored"] == len(expand(spec))


@case
def repair_restores_only_records_the_runner_would_record(env: Env) -> None:
    spec, run, _ = fake_run(env)
    keys = [t.key for t in expand(spec)]
    for key, value in zip(keys[-4:], ["0.5", True, 1e308, None]):
        p = run / "trials" / key / "result.json"
        rec = json.loads(p.read_text())
        rec["metrics"]["mc1"] = value
        p.write_text(json.dumps(rec))
    p = run / "trials" / keys[0] / "result.json"
    rec = json.loads(p.read_text())
    rec["finished"] = "yesterday"
    p.write_text(json.dumps(rec))
    (run / "ledger.sqlite").unlink()
    r = repair(run, expand(spec), {"spec": spec.to_json()})
    assert r["restored"] == len(keys) - 5 and r["pending"] == 5
    fn = Steps()
    run_study(spec, run, fn=fn, progress=False)
    assert sorted(fn.ran) == sorted(keys[-4:] + keys[:1])
    with Ledger(run) as led:
        assert all(isinstance(v, float) and abs(v) < 1e15 for r in led.rows() for v in r["metrics"].values())


@case
def strings_and_huge_metrics_fail_the_trial_as_nan_does(env: Env) -> None:
    from locaudit.study.ledger import nonfinite_metrics

    assert [k for k, _ in nonfinite_metrics({"a": "0.5", "b": True, "c": 1e308, "d": None, "e": 0.5, "f": 3})] == \
        ["a", "b", "c", "d"]
    t = expand(spec_of(env.tmp))[0]
    with Ledger(env.tmp / "run", writer=True) as led:
        led.sync([t])
        led.mark_running([t.key])
        with pytest.raises(ValueError, match="non-finite or invalid"):
            led.finish(t.key, "done", {"mc1": "0.5"})


@case
def a_valid_sqlite_file_of_another_schema_is_one_line_and_not_started_over(env: Env) -> None:
    spec, run, _ = fake_run(env)
    for suffix in ("", "-wal", "-shm"):
        Path(str(run / "ledger.sqlite") + suffix).unlink(missing_ok=True)
    with sqlite3.connect(str(run / "ledger.sqlite")) as con:
        con.execute("CREATE TABLE trials (key TEXT PRIMARY KEY, state TEXT)")
        con.execute("INSERT INTO trials VALUES ('x', 'done')")
    con.close()
    data = (run / "ledger.sqlite").read_bytes()
    one_line_error(*cli(env, "report", run), "ledger.sqlite", "not a locaudit ledger", "--repair")
    with pytest.raises(LedgerDamagedError, match=r"ledger\.sqlite is a valid SQLite file but not a locaudit ledger"):
        run_study(spec, run, fn=Steps(), progress=False)
    assert (run / "ledger.sqlite").read_bytes() == data  # no table added: the run did not start over in it
    fresh = env.tmp / "other"
    fresh.mkdir()
    with sqlite3.connect(str(fresh / "ledger.sqlite")) as con:
        con.execute("CREATE TABLE notes (t TEXT)")
    con.close()
    with pytest.raises(LedgerDamagedError, match=r"missing table\(s\) \['events', 'meta', 'trials'\]"):
        run_study(spec, fresh, fn=Steps(), progress=False)


@case
def iti_acting_outside_its_declared_heads_is_refused_everywhere(env: Env) -> None:
    from locaudit.models.precision import resolve_precision
    from locaudit.edit.base import load_edit
    from locaudit.evaluate.view import edited
    from locaudit.models.tiny import tiny_model

    lm = tiny_model("llama")
    bad = _iti(lm, outside=True)
    with pytest.raises(DataError, match=r"ITI theta is non-zero outside its declared heads L1H0"):
        with edited(lm, bad, precision=resolve_precision("fp32")):
            pass
    with pytest.raises(DataError, match="outside its declared heads"):
        bad.export(lm, env.tmp / "export", format="peft")
    assert not (env.tmp / "export").exists()
    good = _iti(lm).save(env.tmp / "iti")
    from safetensors.torch import save_file

    save_file({"theta": bad.theta}, str(good / "iti.safetensors"))  # a tampered file
    with pytest.raises(DataError, match=r"iti: ITI theta is non-zero outside its declared heads"):
        load_edit(good)


@case
def huge_iti_strength_is_refused_before_it_overflows(env: Env) -> None:
    from locaudit.models.precision import resolve_precision
    from locaudit.edit.base import load_edit
    from locaudit.evaluate.view import edited
    from locaudit.models.tiny import tiny_model

    lm = tiny_model("llama")
    d = _iti(lm).save(env.tmp / "iti")
    with pytest.raises(DataError, match=r"alpha \* theta \(alpha=1e\+308\).* above the bound"):
        load_edit(d, alpha=1e308)
    with pytest.raises(DataError, match="above the bound"):
        with edited(lm, _iti(lm).with_alpha(1e308), precision=resolve_precision("fp32")):
            pass


@case
def numeric_options_out_of_range_fail_at_parse_time(env: Env) -> None:
    d = env.tmp
    for args, needle in [
        (["eval", "--out", d / "o", "--data", "pairs:x", "--max-new-tokens", "-1"], "--max-new-tokens -1: must be an integer >= 1"),
        (["eval", "--out", d / "o", "--data", "pairs:x", "--batch-size", "0"], "--batch-size 0"),
        (["eval", "--out", d / "o", "--data", "pairs:x", "--judge-threshold", "2"], "--judge-threshold 2: must be a finite number in (0, 1)"),
        (["collect", "--out", d / "o", "--data", "pairs:x", "--max-length", "0"], "--max-length 0"),
        (["edit", "--out", d / "o", "--data", "pairs:x", "--max-pairs", "-1"], "--max-pairs -1"),
        (["localize", "--out", d / "o", "--data", "pairs:x", "--noise-scale", "inf"], "--noise-scale inf"),
        (["iti", "--activations", d / "a", "--heads", "L0H0", "--alpha", "1e308", "--out", d / "o"], "--alpha 1e308"),
        (["probe", "--activations", d / "a", "--out", d / "o", "--l2", "nan"], "--l2 nan"),
        (["run", d / "s.yaml", "--max-trials", "0"], "--max-trials 0"),
    ]:
        t0 = time.perf_counter()
        one_line_error(*cli(env, *args), needle)
        assert time.perf_counter() - t0 < 5  # refused before anything loads
    assert not (d / "o").exists()


@case
def non_ascii_study_names_get_distinct_folders(env: Env) -> None:
    names = ["研究", "исследование", "étude", "études", "a b", "a_b", "quickstart"]
    dirs = [spec_of(env.tmp, name=n).default_run_dir() for n in names]
    assert len(set(dirs)) == len(names) and Path("runs") / "study" not in dirs
    assert dirs[-1] == Path("runs") / "quickstart" and dirs[2].name.startswith("tude-")


@case
def an_api_secret_goes_only_over_https_or_to_localhost(env: Env) -> None:
    import urllib.request

    from locaudit.evaluate.judges.api import ApiJudge

    env.monkeypatch.setenv("LOCAUDIT_SECRET_TEST", "sk-secret")
    for url, ok in [("http://judge.example.com/v1", False), ("http://10.0.0.5:8000/v1", False),
                    ("https://judge.example.com/v1", True), ("http://localhost:8000/v1", True),
                    ("http://127.0.0.1:8000", True), ("http://[::1]:8000/v1", True)]:
        j = ApiJudge("m", url, key_env="LOCAUDIT_SECRET_TEST", max_retries=0)
        req = urllib.request.Request(j.url, data=b"{}", method="POST")
        if ok:
            j._authorize(req)
            assert req.unredirected_hdrs["Authorization"] == "Bearer sk-secret" and "Authorization" not in req.headers
        else:
            with pytest.raises(ConfigError, match=r"refusing to send the secret in \$LOCAUDIT_SECRET_TEST .* plain HTTP"):
                j._authorize(req)
    env.monkeypatch.delenv("LOCAUDIT_SECRET_TEST")
    j = ApiJudge("m", "http://judge.example.com/v1", key_env="LOCAUDIT_SECRET_TEST")
    j._authorize(urllib.request.Request(j.url))  # no secret, nothing to protect


@case
def a_failed_report_rebuild_keeps_the_previous_report_whole(env: Env) -> None:
    from locaudit.study import report as report_mod

    _, run, _ = fake_run(env)
    report_mod.build_report(run, n_resamples=99)
    before = {p.name: p.read_bytes() for p in (run / "report").iterdir()}

    def broken(*a, **k):
        raise OSError(28, "No space left on device", str(run / "report" / "index.html"))

    env.monkeypatch.setattr(report_mod, "_html", broken)
    with pytest.raises(OSError):
        report_mod.build_report(run, n_resamples=99)
    assert {p.name: p.read_bytes() for p in (run / "report").iterdir()} == before
    env.monkeypatch.undo()
    rep = report_mod.build_report(run, n_resamples=99)
    assert rep.index == run / "report" / "index.html" and rep.index.is_file()
    assert not [p for p in run.iterdir() if "locaudit-tmp" in p.name]


@case
def a_new_edit_kind_cannot_skip_verification(env: Env) -> None:
    from locaudit.edit.base import register_edit

    class Unverified:
        def applied(self, lm): ...
        def describe(self): return {}
        def save(self, path): ...
        @classmethod
        def load(cls, path): return cls()

    with pytest.raises(TypeError, match="no method verify"):
        register_edit("unverified_hostile")(Unverified)


@case
def a_full_disk_under_the_ledger_is_one_error_and_keeps_finished_trials(env: Env) -> None:
    spec, run, _ = fake_run(env)
    trials = expand(spec)

    class FullDisk:
        def __init__(self, conn):
            self._conn = conn

        def execute(self, sql, *args):
            if sql.startswith("UPDATE") or sql == "COMMIT":
                raise sqlite3.OperationalError("database or disk is full")
            return self._conn.execute(sql, *args)

        def __getattr__(self, name):
            return getattr(self._conn, name)

    with Ledger(run, writer=True) as led:
        done = led.counts()["done"]
        real = led.conn
        led.conn = FullDisk(real)
        with pytest.raises(ConfigError, match=r"ledger\.sqlite: cannot write the ledger \(database or disk is full\)"):
            led.invalidate(trials[0].key, "test")
        led.conn = real
        assert led.counts()["done"] == done  # the failed write left nothing behind


@case
def non_finite_results_are_never_bare_nan_in_json_or_csv(env: Env) -> None:
    from locaudit.evaluate.results import EvalResult

    r = EvalResult()
    r.mc1, r.kl = float("nan"), float("inf")
    r.save_json(env.tmp / "result.json")
    r.append_csv(env.tmp / "results.csv")
    for name in ("result.json", "results.csv"):
        text = (env.tmp / name).read_text().lower()
        assert "nan" not in text and "inf" not in text.replace("info", ""), (name, text[:300])
    json.loads((env.tmp / "result.json").read_text())  # strict JSON


@pytest.mark.parametrize("hostile", CASES, ids=[c.__name__ for c in CASES])
def test_hostile(hostile, tmp_path, monkeypatch, capsys, caplog) -> None:
    hostile(Env(tmp_path, monkeypatch, capsys, caplog))


def test_case_count() -> None:
    """The issues list these (issue 15: 66 cases; issue 27 added the classes of section 7); keep them all."""
    assert len(CASES) >= 84, len(CASES)
