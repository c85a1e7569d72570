"""A verdict fixed before the results (study/preregistration.py): recorded at run start with the resolved
judge, and every later difference named in the report's headline and verdict.json."""

from __future__ import annotations

import json
from pathlib import Path

from test_rejudge import STUDY, Contrarian, with_answers

from locaudit.study.ledger import Ledger
from locaudit.study.preregistration import judge_record
from locaudit.study.report import build_report
from locaudit.study.runner import run_study
from locaudit.study.spec import parse_study


def _run(tmp_path: Path, study: dict) -> Path:
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    spec = parse_study(study, tmp_path, "s.yaml")
    out = tmp_path / "run"
    run_study(spec, out, fn=with_answers, progress=False)
    return out


def test_run_start_records_the_resolved_judge_and_reports_name_every_change(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LOCAUDIT_TEST_JUDGE", "fake-resolved")
    study = {**STUDY, "evaluation": {"judge": "${LOCAUDIT_TEST_JUDGE:-fake}"}}
    run = _run(tmp_path, study)
    with Ledger(run) as led:
        pre = led.get_meta("preregistered")
    assert pre["judge"] == {"written": "${LOCAUDIT_TEST_JUDGE:-fake}", "resolved": "fake-resolved"}
    assert pre["alpha"] == 0.05 and pre["margin"] == 0.10 and pre["multiplicity"] == "holm"
    assert pre["primary_metric"] is None and pre["verdict"]["level"] == 0.95

    rep = build_report(run, n_resamples=99)
    v = json.loads((rep.out_dir / "verdict.json").read_text())
    assert v["judge"]["judge"] == "fake-resolved" and v["judge"]["written"] == "${LOCAUDIT_TEST_JUDGE:-fake}"
    assert v["deviations"] == [] and not v["headline"].startswith("Re-analysed")
    assert "judge <code>fake-resolved</code>" in rep.index.read_text()

    # another judge: the headline says so, verdict.json carries both records
    rep = build_report(run, n_resamples=99, judge=Contrarian())
    v = json.loads((rep.out_dir / "verdict.json").read_text())
    assert v["headline"].startswith("Re-analysed: judge contrarian instead of the pre-registered fake-resolved. ")
    assert v["preregistered"]["judge"]["resolved"] == "fake-resolved" and v["analysed"]["judge"] == "contrarian"

    # a changed verdict section and a later run: the first record stays, the report names the change
    monkeypatch.setenv("LOCAUDIT_TEST_JUDGE", "fake-later")
    run_study(parse_study({**study, "verdict": {"alpha": 0.1, "multiplicity": "bh"}}, tmp_path, "s.yaml"), run,
              fn=with_answers, progress=False)
    with Ledger(run) as led:
        assert led.get_meta("preregistered") == pre
    v = build_report(run, n_resamples=99).verdict
    assert v["deviations"] == ["judge fake-later instead of the pre-registered fake-resolved",
                               "alpha 0.1 instead of the pre-registered 0.05",
                               "multiplicity bh instead of the pre-registered holm"]
    assert v["headline"].startswith("Re-analysed: judge fake-later instead of the pre-registered fake-resolved; alpha")


def test_a_trained_judge_is_recorded_by_folder_and_content(tmp_path: Path) -> None:
    folder = tmp_path / "judge"
    folder.mkdir()
    (folder / "meta.json").write_text('{"a": 1}')
    spec = {"evaluation": {"judge": f"trained:{folder}"}}
    a = judge_record(spec)
    assert a["resolved"] == f"trained:{folder}" and a["folder"] == str(folder.resolve()) and len(a["hash"]) == 64
    (folder / "meta.json").write_text('{"a": 2}')
    assert judge_record(spec)["hash"] != a["hash"]
    assert judge_record({"evaluation": {}}) == {"written": None, "resolved": None}


def test_the_default_judge_is_recorded_by_its_cache_folder(tmp_path: Path, monkeypatch) -> None:
    from locaudit.evaluate.judges.registry import default_judge_dir

    (tmp_path / "tqa.csv").write_text("Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers\n")
    monkeypatch.setenv("LOCAUDIT_TEST_JUDGE", "default:small")
    monkeypatch.setenv("LOCAUDIT_CACHE", str(tmp_path / "cache"))
    study = {**STUDY, "data": {"spec": "truthfulqa:tqa.csv"}, "evaluation": {"judge": "${LOCAUDIT_TEST_JUDGE:-default}"}}
    spec = parse_study(study, tmp_path, "s.yaml")
    rec = judge_record(spec)
    want = Path(rec["folder"])
    assert rec["resolved"] == "default:small" and want.name.startswith("default-small-") and rec["hash"] is None
    assert want.parent == Path(default_judge_dir("truthfulqa:x", ("test",))).parent  # the judges' cache
    (tmp_path / "tqa.csv").write_text("Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers\nx\n")
    assert judge_record(spec)["folder"] != rec["folder"]  # keyed by the held-out file's content
    (tmp_path / "tqa.csv").write_text("Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers\n")
    want.mkdir(parents=True)
    (want / "judge.json").write_text("{}")
    assert len(judge_record(spec)["hash"]) == 64
