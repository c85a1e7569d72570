"""BehaviourData / load_behaviour: spec forms, splits, pairs, probe examples, MC, fingerprint, subsampling."""

from __future__ import annotations

import csv
import io
import json

import pytest

from locaudit.data import SPLITS, BehaviourData, load_behaviour, preference_pairs
from locaudit.errors import ConfigError, DataError

COLS = ["Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Source"]


def tqa_rows(n):
    return [{"Type": "A", "Category": "C", "Question": f"Question number {i}?", "Best Answer": f"right {i}",
             "Correct Answers": "; ".join(f"right {i}.{j}" for j in range(1 + i % 3)) + f"; right {i}",
             "Incorrect Answers": "; ".join(f"wrong {i}.{j}" for j in range(1 + i % 2)), "Source": ""}
            for i in range(n)]


def write_tqa(folder, n=20, mc=True):
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLS)
    w.writeheader()
    w.writerows(tqa_rows(n))
    (folder / "TruthfulQA.csv").write_text("\ufeff" + buf.getvalue(), encoding="utf-8")
    if mc:
        items = [{"question": r["Question"],
                  "mc1_targets": {r["Best Answer"]: 1, "wrong": 0},
                  "mc2_targets": {r["Best Answer"]: 1, "wrong": 0}} for r in tqa_rows(n)]
        (folder / "mc_task.json").write_text(json.dumps(items))
    return folder / "TruthfulQA.csv"


def test_truthfulqa_spec(tmp_path):
    path = write_tqa(tmp_path / "data" / "v1", n=20)
    d = load_behaviour(f"truthfulqa:{path}")
    assert isinstance(d, BehaviourData) and d.name == "truthfulqa-v1"
    sizes = [len(d.questions(s)) for s in SPLITS]
    assert sizes == [12, 4, 4]
    for s in SPLITS:
        qs = d.questions(s)
        assert all(d.split_of[q.qid] == s for q in qs)
        assert d.pairs(s) == preference_pairs(qs)
        assert {m.qid for m in d.mc_items(s)} == {q.qid for q in qs}  # mc_task.json auto-detected
        assert all(e.split == s and d.split_of[e.qid] == s for e in d.probe_examples(s))
    assert len(d.pairs()) == sum(len(q.correct) * len(q.incorrect) for q in d.questions())
    assert len(d.probe_examples()) == sum(len(q.correct) + len(q.incorrect) for q in d.questions())
    assert d.summary()["train"]["questions"] == 12


def test_jan2025_layout_finds_data_mc(tmp_path):
    path = write_tqa(tmp_path, n=10, mc=False)
    write_tqa(tmp_path / "data", n=10, mc=True)
    (tmp_path / "data" / "TruthfulQA.csv").unlink()
    d = load_behaviour(f"truthfulqa:{path}")
    assert len(d.mc_items()) == 10 and d.source["mc"].endswith("data/mc_task.json")


def test_no_mc_file_gives_empty_mc(tmp_path):
    d = load_behaviour(f"truthfulqa:{write_tqa(tmp_path / 'x', n=10, mc=False)}")
    assert d.mc_items("train") == [] and d.mc_items() == []


def test_mismatched_mc_warns(tmp_path):
    path = write_tqa(tmp_path / "a", n=10, mc=False)
    other = write_tqa(tmp_path / "b", n=12).parent / "mc_task.json"
    json.dump(json.load(open(other)) + [{"question": "Unrelated?", "mc1_targets": {"x": 1, "y": 0},
                                         "mc2_targets": {"x": 1, "y": 0}}], open(other, "w"))
    with pytest.warns(UserWarning, match="3 of 13 MC items match no question"):
        d = load_behaviour(f"truthfulqa:{path}", mc_path=other)
    assert len(d.mc_items()) == 10


def test_fingerprint_and_seed(tmp_path):
    path = write_tqa(tmp_path / "v1", n=30)
    a, b, c = (load_behaviour(f"truthfulqa:{path}", seed=s) for s in (0, 0, 1))
    assert a.fingerprint == b.fingerprint and a.split_of == b.split_of
    assert c.fingerprint != a.fingerprint and c.split_of != a.split_of
    d = load_behaviour(f"truthfulqa:{path}", fractions=(0.8, 0.1, 0.1))
    assert d.fingerprint != a.fingerprint
    assert len(a.fingerprint) == 16


def test_max_questions_before_split(tmp_path):
    path = write_tqa(tmp_path / "v1", n=40)
    d = load_behaviour(f"truthfulqa:{path}", max_questions=10, seed=2)
    assert [len(d.questions(s)) for s in SPLITS] == [6, 2, 2]
    assert len(d.mc_items()) == 10
    assert d.split_of == load_behaviour(f"truthfulqa:{path}", max_questions=10, seed=2).split_of
    with pytest.raises(ConfigError, match="max_questions=0"):
        load_behaviour(f"truthfulqa:{path}", max_questions=0)


def test_pairs_spec_builds_questions(tmp_path):
    rows = [{"prompt": f"P{i // 2}?", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(20)]
    p = tmp_path / "prefs.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    d = load_behaviour(f"pairs:{p}")
    assert d.name == "pairs-prefs" and len(d.questions()) == 10 and len(d.pairs()) == 20
    assert sum(len(d.pairs(s)) for s in SPLITS) == 20
    for s in SPLITS:
        qids = {q.qid for q in d.questions(s)}
        assert {pp.qid for pp in d.pairs(s)} == qids  # both pairs of a prompt in one split
    q = d.questions()[0]
    assert q.correct == ("good 0", "good 1") and q.incorrect == ("bad 0", "bad 1") and q.best_answer == "good 0"
    labels = {(e.answer, e.label) for e in d.probe_examples()}
    assert ("good 0", 1) in labels and ("bad 0", 0) in labels
    assert d.mc_items("train") == []


def test_caa_spec(tmp_path, monkeypatch):
    folder = tmp_path / "caa" / "datasets" / "generate" / "sycophancy"
    folder.mkdir(parents=True)
    items = [{"question": f"Q{i}\n (A) x\n (B) y", "answer_matching_behavior": "(A)",
              "answer_not_matching_behavior": "(B)"} for i in range(10)]
    (folder / "generate_dataset.json").write_text(json.dumps(items))
    monkeypatch.setenv("LOCAUDIT_DATA", str(tmp_path))
    d = load_behaviour("caa:sycophancy")
    assert d.name == "caa-sycophancy" and [len(d.pairs(s)) for s in SPLITS] == [6, 2, 2]
    assert all(p.chosen == "(A)" for p in d.pairs())


@pytest.mark.parametrize(
    "spec, kw, err, match",
    [
        ("squad:x", {}, ConfigError, r"unknown kind 'squad'"),
        ("caa:", {}, ConfigError, r"give a name or path after 'caa:'"),
        ("truthfulqa:/no/such.csv", {}, DataError, r"/no/such\.csv: file not found"),
        ("pairs:x.jsonl", {"fractions": (0.5, 0.5, 0.5)}, ConfigError, r"sum to 1\.5"),
    ],
)
def test_bad_specs(spec, kw, err, match):
    with pytest.raises(err, match=match):
        load_behaviour(spec, **kw)


def test_bad_split_name(tmp_path):
    d = load_behaviour(f"truthfulqa:{write_tqa(tmp_path / 'v1', n=10)}")
    with pytest.raises(ConfigError, match="split 'dev' is not one of"):
        d.questions("dev")
