"""The run folder's layout lives in study/rundir.py: the steps, the ledger and trial contents use it."""

from __future__ import annotations

from pathlib import Path

import pytest

from locaudit.study.rundir import LEDGER_FILE, RunDir, shared_rel, trial_rel


def test_layout_absolute_and_relative_agree(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert run.collect("k1") == tmp_path / "shared" / "collect-k1" == tmp_path / shared_rel("collect", "k1")
    assert run.probe("k2") == tmp_path / "shared" / "probe-k2"
    assert run.localize("k3") == tmp_path / "shared" / "localize-k3"
    assert run.optimal("t4") == tmp_path / "shared" / "optimal-t4"
    assert run.trial("k5") == tmp_path / "trials" / "k5" and trial_rel("k5", "edit") == "trials/k5/edit"
    assert run.record("k5") == tmp_path / "trials" / "k5" / "result.json"
    assert run.ledger == tmp_path / LEDGER_FILE
    with pytest.raises(ValueError, match="shared results"):
        shared_rel("judge", "k")


def test_has_results_and_is_run(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    assert not run.has_results() and not run.is_run()
    run.trials.mkdir(parents=True)
    assert run.is_run() and not run.has_results()  # an empty trials/ holds nothing yet
    run.collect("k").mkdir(parents=True)
    assert run.has_results()


def test_recorded_keys_are_the_trials_with_a_record(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert run.recorded_keys() == []  # no trials/ yet
    for key in ("k2", "k1", "k3"):
        run.trial(key).mkdir(parents=True)
    run.record("k2").write_text("{}")
    run.record("k1").write_text("{}")
    run.record("k3").mkdir()  # not a file: not a record
    assert run.recorded_keys() == ["k1", "k2"]


def test_select_trials_name_the_edit_folders_the_steps_write(tmp_path: Path) -> None:
    """A 'select' trial's edit_dir is where the ITI step saves its edit (trials/KEY/edit) or the optimal step its
    trained edit (shared/optimal-TKEY), both spelled by RunDir."""
    from locaudit.study.payloads import OptimalTrial
    from locaudit.study.spec import parse_study
    from locaudit.study.trials import expand

    (tmp_path / "tqa.csv").write_text("Type,Category,Question\n")
    spec = parse_study({"name": "s", "model": {"name": "tiny:llama"}, "data": {"spec": "truthfulqa:tqa.csv"},
                        "localizers": {"probe": {"top_k": 2}, "random": {"n": 1}},
                        "iti": {"alphas": [1.0, 2.0]}, "optimal": {"taus": [0.1, 0.2]},
                        "evaluation": {"metrics": ["mc"], "selection": "validation"}}, tmp_path, "s.yaml")
    trials = {t.key: t for t in expand(spec)}
    run = RunDir(tmp_path / "run")
    selects = [t for t in trials.values() if t.kind == "select"]
    assert {t.content["of_kind"] for t in selects} == {"iti", "optimal"}
    for s in selects:
        of = trials[s.content["of"]]
        want = (run.trial(of.key) / "edit" if of.kind == "iti"
                else run.optimal(of.as_(OptimalTrial).training_key()))
        assert run.root / s.content["edit_dir"] == want
