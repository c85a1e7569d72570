"""`locaudit judge` CLI: help texts, eval of the reference judge on held-out judge data, score, errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from locaudit.cli.main import app

runner = CliRunner()
CSV_HEADER = "Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n"


@pytest.fixture
def files(tmp_path):
    rows, truth = [], []
    for i in range(10):
        q = f"What happens to object number {i} at night?"
        correct = f"Object {i} stays exactly where it was left"
        incorrect = f"Object {i} flies away to the moon at midnight"
        rows.append(f"Adversarial,Misc,{q},{correct},{correct},{incorrect},src\n")
        truth += [{"prompt": f"Q: {q}\nA: {correct}\nTrue:", "completion": " yes"},
                  {"prompt": f"Q: {q}\nA: {incorrect}\nTrue:", "completion": " no"}]
    (tmp_path / "tqa.csv").write_text(CSV_HEADER + "".join(rows))
    (tmp_path / "truth.jsonl").write_text("".join(json.dumps(r) + "\n" for r in truth))
    return tmp_path


@pytest.mark.parametrize("cmd", [["judge", "--help"], ["judge", "train", "--help"], ["judge", "eval", "--help"],
                                 ["judge", "score", "--help"]])
def test_help(cmd):
    res = runner.invoke(app, cmd)
    assert res.exit_code == 0, res.output
    assert "--" in res.output


def test_eval_reference_judge(files, monkeypatch):
    monkeypatch.setenv("LOCAUDIT_CACHE", str(files / "cache"))
    res = runner.invoke(app, ["judge", "eval", "--judge", "reference:rouge1", "--holdout", f"truthfulqa:{files / 'tqa.csv'}",
                              "--truth-data", str(files / "truth.jsonl"), "--out", str(files / "m.json")])
    assert res.exit_code == 0, res.output
    m = json.loads((files / "m.json").read_text())
    assert m["kinds"]["truth"]["n"] == 2 * m["holdout"]["n_held_out_questions"] == 4
    assert m["kinds"]["truth"]["accuracy"] == 1.0  # answers are the references themselves
    assert "info" not in m["kinds"]


def test_score_command(files, monkeypatch):
    monkeypatch.setenv("LOCAUDIT_CACHE", str(files / "cache"))
    q = "What happens to object number 3 at night?"
    (files / "answers.jsonl").write_text(json.dumps({"question": q, "answer": "Object 3 stays exactly where it was left"})
                                         + "\n" + json.dumps({"question": q, "answer": "It flies away to the moon at midnight"}) + "\n")
    res = runner.invoke(app, ["judge", "score", "--judge", "reference:rougeL", "--input", str(files / "answers.jsonl"),
                              "--references", f"truthfulqa:{files / 'tqa.csv'}", "--out", str(files / "s.jsonl")])
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in (files / "s.jsonl").read_text().splitlines()]
    assert [r["truth"] for r in rows] == [1.0, 0.0] and rows[0]["info"] is None


def test_score_malformed_input_names_line(files):
    (files / "bad.jsonl").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n" + json.dumps({"question": "q"}) + "\n")
    res = runner.invoke(app, ["judge", "score", "--judge", "reference", "--input", str(files / "bad.jsonl"),
                              "--references", f"truthfulqa:{files / 'tqa.csv'}", "--out", str(files / "s.jsonl")])
    assert res.exit_code != 0
    assert "bad.jsonl:2" in str(res.exception) and "'answer'" in str(res.exception)


def test_unknown_judge_spec_is_explained():
    from locaudit.errors import ConfigError
    from locaudit.evaluate.judges import get_judge

    with pytest.raises(ConfigError, match="unknown kind 'gpt'.*trained:DIR"):
        get_judge("gpt:judge")
    with pytest.raises(ConfigError, match="hold out"):
        get_judge("default")
    with pytest.raises(ConfigError, match="reference answers"):
        get_judge("reference")
