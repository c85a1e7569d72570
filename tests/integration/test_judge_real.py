"""The trained judge on the real SmolLM2 backbone scores TruthfulQA reference answers of held-out
questions: correct references mostly judged truthful, incorrect ones mostly not.

Uses a judge trained earlier if one is found ($LOCAUDIT_TEST_JUDGE, else runs/judge-smollm2 in the
repository, if it was trained on the same TruthfulQA file and split), else (or with
LOCAUDIT_TEST_JUDGE=train) trains a small one on a subset (bounded to ~2 minutes on 2 CPU cores)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from locaudit.data import load_behaviour
from locaudit.evaluate.judges.train import JudgeTrainConfig, train_judge
from locaudit.evaluate.judges.trained import load_trained_judge

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _existing_judge(csv: Path) -> Path | None:
    if os.environ.get("LOCAUDIT_TEST_JUDGE") == "train":
        return None
    for cand in (os.environ.get("LOCAUDIT_TEST_JUDGE"), REPO / "runs" / "judge-smollm2"):
        if cand and (Path(cand) / "judge.json").is_file():
            meta = json.loads((Path(cand) / "judge.json").read_text())
            cfg = meta.get("config", {})
            if Path(meta.get("references", {}).get("source", "")).resolve() == csv.resolve() and cfg.get("seed") == 0 \
                    and "test" in cfg.get("holdout_splits", []) and cfg.get("max_questions") is None:
                return Path(cand)
    return None


def test_trained_judge_on_reference_answers(shared_data, smollm2, tmp_path):
    csv = shared_data / "truthfulqa" / "TruthfulQA.csv"
    spec = f"truthfulqa:{csv}"
    judge_dir = _existing_judge(csv)
    if judge_dir is None:
        cfg = JudgeTrainConfig(kinds=["truth", "info"], model="smollm2-135m-instruct",
                               truth_data=shared_data / "truthfulqa" / "data" / "finetune_truth.jsonl",
                               info_data=shared_data / "truthfulqa" / "data" / "finetune_info.jsonl",
                               holdout=spec, seed=0, layers=[3], heads=["logistic"], l2_grid=[0.03, 0.3],
                               max_train_examples=400, max_heldout_examples=60)
        report = train_judge(cfg, tmp_path / "judge", lm=smollm2)
        # the caps count distinct (question, answer) pairs, one subset shared by both kinds; the judge files
        # label some pairs more than once, so a kind holds at least as many examples as pairs
        n_truth, n_info = (report["kinds"][k]["held_out"]["n"] for k in ("truth", "info"))
        assert 60 <= n_truth <= 2 * 60 and 60 <= n_info <= 2 * 60
        judge_dir = tmp_path / "judge"
    judge = load_trained_judge(judge_dir, lm=smollm2)
    test_qs = load_behaviour(spec, seed=0).questions("test")
    qs = random.Random(0).sample(test_qs, 12)
    pairs = [(q.question, q.correct[0], 1) for q in qs] + [(q.question, q.incorrect[0], 0) for q in qs]
    scores = judge.score([p[0] for p in pairs], [p[1] for p in pairs])
    truth = [s.truth for s in scores]
    correct_ok = sum(t > 0.5 for t, p in zip(truth, pairs) if p[2] == 1) / len(qs)
    incorrect_ok = sum(t <= 0.5 for t, p in zip(truth, pairs) if p[2] == 0) / len(qs)
    assert correct_ok >= 0.7, truth
    assert incorrect_ok >= 0.7, truth
    assert all(s.info is not None and 0 <= s.info <= 1 for s in scores)
