"""Re-scoring a study's saved answers with another judge (study/rejudge.py, `locaudit report --judge`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from locaudit.evaluate.judges.base import JudgeScore
from locaudit.study.analysis import load_per_question
from locaudit.study.ledger import Ledger
from locaudit.study.rejudge import judge_slug, rejudge_rows
from locaudit.study.report import build_report
from locaudit.study.runner import run_study
from locaudit.study.spec import parse_study

STUDY = {
    "name": "rejudge",
    "model": {"name": "tiny:llama"},
    "data": {"spec": "pairs:pairs.jsonl"},
    "localizers": {"probe": {"top_k": 4}, "random": {"n": 5}, "single": {"n": 0}},
    "iti": {"alphas": [2.0]},
    "optimal": {"taus": [0.1]},
    "evaluation": {"judge": "fake"},
}
QIDS = [f"q{i}" for i in range(12)]


def with_answers(trials, spec, run_dir):
    """Each evaluation writes generations.jsonl and its judge's judgements.jsonl, as the real steps do: the
    answer is 'right' or 'wrong' per question (top-K edits answer more questions right)."""
    for t in trials:
        if t.kind in ("collect", "probe", "judge"):
            yield t.key, {"metrics": {}, "artifacts": {}}
            continue
        rng = np.random.default_rng(int(hashlib.sha256(t.key.encode()).hexdigest()[:8], 16))
        p = 0.8 if t.group == "top" else 0.4
        right = rng.random(len(QIDS)) < p
        answers = ["It is right." if r else "It is wrong." for r in right]
        truth = [0.9 if r else 0.2 for r in right]  # the run's own judge
        d = Path(run_dir) / "trials" / t.key / "eval"
        d.mkdir(parents=True, exist_ok=True)
        (d / "generations.jsonl").write_text("".join(json.dumps({"qid": q, "question": f"Question {q}?", "answer": a})
                                                     + "\n" for q, a in zip(QIDS, answers)))
        (d / "judgements.jsonl").write_text("".join(json.dumps({"qid": q, "answer": a, "truth": v, "info": 0.8})
                                                    + "\n" for q, a, v in zip(QIDS, answers, truth)))
        t_hard = float(np.mean(np.array(truth) >= 0.5))
        yield t.key, {"metrics": {"true": t_hard, "info": 1.0, "true_info": t_hard, "true_prob": float(np.mean(truth)),
                                  "info_prob": 0.8, "judge_threshold": 0.5, "mc1": 0.3},
                      "artifacts": {"eval": f"trials/{t.key}/eval"}}


class Contrarian:
    """A judge that calls 'wrong' answers true and 'right' ones false, and counts what it scores."""

    name = "contrarian"

    def __init__(self) -> None:
        self.scored = 0

    def score(self, questions, answers):
        self.scored += len(answers)
        return [JudgeScore(truth=0.7 if "wrong" in a else 0.1, info=0.6) for a in answers]


@pytest.fixture
def run(tmp_path: Path):
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    spec = parse_study(STUDY, tmp_path, "rejudge.yaml")
    out = tmp_path / "run"
    run_study(spec, out, fn=with_answers, progress=False)
    return out


def test_rejudge_recomputes_judge_metrics_and_caches(run: Path) -> None:
    with Ledger(run) as led:
        rows = led.rows()
    judge = Contrarian()
    new, summary = rejudge_rows(run, rows, judge)
    n_eval = sum(1 for r in rows if (r.get("artifacts") or {}).get("eval"))
    # each distinct (question, answer) is scored once, whatever the number of trials giving that answer
    assert judge.scored == summary["scored"] <= 2 * len(QIDS) < n_eval * len(QIDS)
    assert summary["trials"] == n_eval and summary["answers"] == n_eval * len(QIDS)
    for old, r in zip(rows, new):
        if not (old.get("artifacts") or {}).get("eval"):
            assert r == old
            continue
        # the contrarian's True is the share of answers the old judge called false
        assert r["metrics"]["true"] == pytest.approx(1.0 - old["metrics"]["true"])
        assert r["metrics"]["info"] == 1.0 and r["metrics"]["info_prob"] == pytest.approx(0.6)
        assert r["metrics"]["true_info"] == pytest.approx(r["metrics"]["true"] * r["metrics"]["info"])
        assert r["metrics"]["mc1"] == old["metrics"]["mc1"]  # not a judge metric
        assert (run / r["artifacts"]["judgements"]).is_file()
    perq = load_per_question(run, new)
    key = next(r["key"] for r in new if r["key"] in perq)
    assert set(perq[key]["true_prob"].values()) <= {0.7, 0.1}
    again = Contrarian()
    rejudge_rows(run, rows, again)
    assert again.scored == 0  # every trial's judgements are on disk


def test_same_judge_reproduces_the_recorded_metrics(run: Path) -> None:
    with Ledger(run) as led:
        rows = led.rows()

    class Same:
        name = "same"

        def score(self, questions, answers):
            return [JudgeScore(truth=0.9 if "right" in a else 0.2, info=0.8) for a in answers]

    new, _ = rejudge_rows(run, rows, Same())
    for old, r in zip(rows, new):
        for k in ("true", "true_prob", "info_prob", "true_info"):
            if k in (old.get("metrics") or {}):
                assert r["metrics"][k] == pytest.approx(old["metrics"][k]), k


def test_report_under_another_judge_goes_to_its_own_folder(run: Path) -> None:
    own = build_report(run, n_resamples=99)
    other = build_report(run, n_resamples=99, judge=Contrarian())
    assert other.out_dir == run / f"report-{judge_slug('contrarian')}" and own.out_dir == run / "report"
    assert other.verdict["judge"]["judge"] == "contrarian" and own.verdict["judge"]["rejudged"] is False
    html = (other.out_dir / "index.html").read_text()
    assert "re-scored by the judge contrarian" in html
    # the top-K edits answer more questions right: the run's judge favours them, the contrarian the draws
    o = {r["method"]: r for r in own.verdict["table"]}["iti"]
    c = {r["method"]: r for r in other.verdict["table"]}["iti"]
    assert o["candidate_mean"] > o["random_mean"] and c["candidate_mean"] < c["random_mean"]


def test_cli_report_judge(run: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from locaudit.cli.main import app
    from locaudit.study import rejudge

    seen = {}

    def fake_study_judge(spec, judge_spec, device="auto"):
        seen["spec"], seen["judge"] = spec["name"], judge_spec
        return Contrarian()

    monkeypatch.setattr(rejudge, "study_judge", fake_study_judge)
    res = CliRunner().invoke(app, ["report", str(run), "--judge", "trained:elsewhere", "--resamples", "99"])
    assert res.exit_code == 0, res.output
    assert seen == {"spec": "rejudge", "judge": "trained:elsewhere"}
    assert (run / f"report-{judge_slug('contrarian')}" / "verdict.json").is_file()


def test_a_report_says_when_true_info_mixes_judges(run: Path) -> None:
    """A run carried across machines trains the default judge on each: the report names the judges its trials
    were judged by, and says how to re-score with one, only when there is more than one."""
    with Ledger(run) as led:
        evals = [r["artifacts"]["eval"] for r in led.rows() if (r.get("artifacts") or {}).get("eval")]
    for ev in evals:
        (run / ev / "result.json").write_text(json.dumps({"judge": "trained:aaaa+refs@1"}))
    one = build_report(run)
    assert one.verdict["judges_used"] == {"trained:aaaa+refs@1": len(evals)}
    assert "different judges" not in one.index.read_text()
    (run / evals[0] / "result.json").write_text(json.dumps({"judge": "trained:bbbb+refs@1"}))
    two = build_report(run)
    assert two.verdict["judges_used"] == {"trained:aaaa+refs@1": len(evals) - 1, "trained:bbbb+refs@1": 1}
    page = two.index.read_text()
    assert "2 different judges" in page and "--judge" in page
    again = build_report(run, judge=Contrarian())  # re-scored by one judge: one entry
    assert list(again.verdict["judges_used"].values()) == [len(evals)]


class Asked:
    """A judge that keeps the questions it is asked, and judges like the run's own."""

    name = "asked"

    def __init__(self) -> None:
        self.questions: list[str] = []

    def score(self, questions, answers):
        self.questions += list(questions)
        return [JudgeScore(truth=0.9 if "right" in a else 0.2, info=0.8) for a in answers]


def test_a_packs_answers_are_judged_with_their_questions_looked_up_by_qid(run: Path, tmp_path: Path) -> None:
    """A pack keeps no question text (pack_text.py); re-judging it asks the judge the same questions, taken
    from the study's data by qid, and gives the numbers of the run; without the data it says what is missing."""
    from locaudit.errors import DataError
    from locaudit.study.pack import pack_run

    summary = pack_run(run, tmp_path / "pack")
    pack = tmp_path / "pack"
    assert summary.stripped > 0
    for f in pack.rglob("generations.jsonl"):
        assert "Question" not in f.read_text()
    with Ledger(run) as led:
        rows = led.rows()
    here, there = Asked(), Asked()
    a, _ = rejudge_rows(run, rows, here)
    b, _ = rejudge_rows(pack, rows, there, questions=lambda: {q: f"Question {q}?" for q in QIDS})
    assert sorted(there.questions) == sorted(here.questions) and here.questions
    assert [r["metrics"] for r in a] == [r["metrics"] for r in b]
    with pytest.raises(DataError, match="generations.jsonl line 1: the answer has no question"):
        rejudge_rows(pack, rows, Asked())
    with pytest.raises(DataError, match="'q0' is not in the study's data"):
        rejudge_rows(pack, rows, Asked(), questions=lambda: {})


def test_study_questions_reads_every_question_of_the_studys_data(tmp_path: Path) -> None:
    from eval_fixtures import write_judge_data
    from locaudit.data.truthfulqa import question_id
    from locaudit.study.rejudge import study_questions

    write_judge_data(tmp_path, mc=True)
    spec = parse_study({**STUDY, "data": {"spec": f"truthfulqa:{tmp_path / 'TruthfulQA.csv'}"}}, tmp_path, "s.yaml")
    got = study_questions(spec)
    texts = [line.split(",")[2] for line in (tmp_path / "TruthfulQA.csv").read_text().splitlines()[1:]]
    assert got == {question_id(t): t for t in texts}


def test_a_stopped_rejudge_keeps_the_chunks_it_scored(run: Path, tmp_path: Path) -> None:
    import shutil

    class Stops(Contrarian):
        def score(self, questions, answers):
            if self.scored:
                raise KeyboardInterrupt  # stopped during its second chunk
            return super().score(questions, answers)

    with Ledger(run) as led:
        rows = led.rows()
    fresh = tmp_path / "fresh"
    shutil.copytree(run, fresh)
    n_eval = sum(1 for r in rows if (r.get("artifacts") or {}).get("eval"))
    with pytest.raises(KeyboardInterrupt):
        rejudge_rows(run, rows, Stops(), chunk_answers=2 * len(QIDS))
    assert len(list((run / "rejudged").glob("*/*.jsonl"))) == 2  # the first chunk's two trials
    resumed, summary = rejudge_rows(run, rows, Contrarian(), chunk_answers=2 * len(QIDS))
    assert summary["trials"] == n_eval
    whole, _ = rejudge_rows(fresh, rows, Contrarian())  # one uninterrupted call, one chunk
    assert [r["metrics"] for r in resumed] == [r["metrics"] for r in whole]
