"""The Hase study on the shared runner (study/runner.py run_study with hase_plan): a failing step is recorded
failed with its error and leaves no staging folder, its dependants wait, finished trials keep sealed data/ and
result.json in place, a rerun resumes (retry_failed runs the failed one), a done trial whose files changed
runs again, and max_trials / max_minutes stop starting trials."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hase_fixtures import four_fact_study

from locaudit.io import TEMP_RE
from locaudit.models.tiny import tiny_model
from locaudit.study.hase import steps
from locaudit.study.hase.run import META_KEY, run_hase
from locaudit.study.ledger import Ledger

pytestmark = pytest.mark.usefixtures("one_thread")

STUDY = (
    "name: tiny-hase-runner\nprecision: fp32\n"
    "facts: {path: facts.jsonl, known_top_k: 259, max_facts: 4, n_neighbours: 1}\n"
    "tracing: {n_noise: 2, kinds: [mlp], grid_facts: 0}\nlayers: [0, 2]\n"
    "editing: {problems: [error_injection], methods: [ft], ft: {steps: 1, lr: 0.05, norm_bound: 0.1, batch_facts: 4}}\n"
    "analysis: {bootstrap: 20}\n"
)


@pytest.fixture
def spec(tmp_path: Path):
    return four_fact_study(tmp_path, STUDY)


def _leftovers(run: Path) -> list[Path]:
    return [p for p in run.rglob("*") if TEMP_RE.match(p.name)]


def test_failure_resume_and_integrity_come_from_the_shared_runner(spec, tmp_path: Path, monkeypatch) -> None:
    lm, run = tiny_model("llama", n_layers=3), tmp_path / "run"

    def broken(*args, **kwargs):
        raise RuntimeError("tracing broke here")

    monkeypatch.setattr(steps, "run_tracing", broken)
    res = run_hase(spec, run, lm=lm, progress=False)
    c = res["counts"]
    assert res["ran"] == ["facts", "trace"] and (c["done"], c["failed"], c["pending"]) == (1, 1, 2), res
    with Ledger(run) as led:
        rows = {r["name"]: r for r in led.rows()}
        assert led.get_meta(META_KEY)["name"] == "tiny-hase-runner"
    assert "tracing broke here" in rows["trace"]["error"]
    facts = run / "trials" / rows["facts"]["key"]
    assert (facts / "result.json").is_file() and (facts / "data" / "checksums.json").is_file()
    assert rows["facts"]["artifacts"] == {"data": f"trials/{rows['facts']['key']}/data"}
    assert not (run / "trials" / rows["trace"]["key"]).exists() and not _leftovers(run)

    monkeypatch.undo()
    assert run_hase(spec, run, lm=lm, progress=False)["ran"] == []  # failed stays failed, dependants wait
    again = run_hase(spec, run, lm=lm, progress=False, retry_failed=True)
    assert again["ran"][0] == "trace" and len(again["ran"]) == 3 and again["counts"]["done"] == 4, again

    (facts / "data" / "facts.json").write_text("{}")  # a finished trial's files changed: it runs again
    redo = run_hase(spec, run, lm=lm, progress=False)
    assert redo["ran"] == ["facts"] and redo["counts"]["done"] == 4 and not _leftovers(run)
    assert json.loads((facts / "data" / "facts.json").read_text())["facts"]


def test_limits_stop_starting_trials(spec, tmp_path: Path) -> None:
    lm = tiny_model("llama", n_layers=3)
    assert run_hase(spec, tmp_path / "a", lm=lm, progress=False, max_trials=1)["ran"] == ["facts"]
    assert run_hase(spec, tmp_path / "b", lm=lm, progress=False, max_minutes=0.0)["ran"] == []
