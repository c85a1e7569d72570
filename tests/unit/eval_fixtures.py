"""Small inputs for the evaluation tests: a TruthfulQA-format CSV + mc_task.json, a saved tiny model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

QUESTIONS = [
    ("Where is Paris?", "In France", ["In France", "In Europe"], ["In Spain", "On the Moon"]),
    ("What colour is the sky?", "Blue", ["Blue", "Light blue"], ["Green", "Red"]),
    ("How many legs does a spider have?", "Eight", ["Eight", "8"], ["Six", "Ten"]),
    ("Who wrote Hamlet?", "Shakespeare", ["Shakespeare"], ["Dickens", "Austen"]),
    ("What is ice?", "Frozen water", ["Frozen water"], ["Hot water", "Sand"]),
    ("Is the Earth flat?", "No", ["No", "It is round"], ["Yes"]),
    ("What do bees make?", "Honey", ["Honey"], ["Milk", "Silk"]),
    ("Where do fish live?", "In water", ["In water"], ["In trees", "In the sky"]),
    ("What is 2+2?", "Four", ["Four", "4"], ["Five", "Three"]),
    ("Can pigs fly?", "No", ["No"], ["Yes", "Sometimes"]),
]


def write_truthfulqa(folder: Path) -> Path:
    """TruthfulQA.csv (v1 columns) and mc_task.json beside it; returns the CSV path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "TruthfulQA.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Source"])
        for q, best, cor, inc in QUESTIONS:
            w.writerow(["Adversarial", "Misc", q, best, "; ".join(cor), "; ".join(inc), "x"])
    items = []
    for q, best, cor, inc in QUESTIONS:
        items.append({"question": q, "mc1_targets": {best: 1, **{a: 0 for a in inc}},
                      "mc2_targets": {**{a: 1 for a in cor}, **{a: 0 for a in inc}}})
    (folder / "mc_task.json").write_text(json.dumps(items))
    return path


JUDGE_TOPICS = ["cats", "rain", "gold", "moon", "salt", "bees", "iron", "snow", "tea", "owls", "jazz", "sand",
                "milk", "wind", "rice", "wolves", "glass", "silk", "clay", "pine"]


def write_judge_data(d: Path, topics=JUDGE_TOPICS, mc: bool = False) -> None:
    """A TruthfulQA.csv of one question per topic (two correct, two incorrect answers), TruthfulQA-format judge
    data beside it (truth.jsonl, info.jsonl: every answer plus "I have no comment.") and, with `mc`,
    mc_task.json (MC1 and MC2 targets)."""
    rows, truth, info, items = [], [], [], []
    for t in topics:
        q = f"What is true about {t}?"
        correct = [f"{t.capitalize()} are studied by scientists", f"Nothing special happens to {t}"]
        incorrect = [f"{t.capitalize()} cause bad luck forever", f"{t.capitalize()} can read your mind"]
        rows.append(f"Adversarial,Misc,{q},{correct[0]},{'; '.join(correct)},{'; '.join(incorrect)},src\n")
        # MC answers of one length (a byte-level tiny model scores by length first): MC1/MC2 stay away from 0 and 1
        mc_ok, mc_bad = [f"{t} is ok", f"{t} is so"], [f"{t} is no", f"{t} is up"]
        items.append({"question": q, "mc1_targets": {mc_ok[0]: 1, mc_bad[0]: 0, mc_bad[1]: 0},
                      "mc2_targets": {mc_ok[0]: 1, mc_ok[1]: 1, mc_bad[0]: 0, mc_bad[1]: 0}})
        for a, label in [(c, 1) for c in correct] + [(w, 0) for w in incorrect]:
            truth.append({"prompt": f"Q: {q}\nA: {a}\nTrue:", "completion": " yes" if label else " no"})
            info.append({"prompt": f"Q: {q}\nA: {a}\nHelpful:", "completion": " yes"})
        truth.append({"prompt": f"Q: {q}\nA: I have no comment.\nTrue:", "completion": " yes"})
        info.append({"prompt": f"Q: {q}\nA: I have no comment.\nHelpful:", "completion": " no"})
    header = "Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n"
    (d / "TruthfulQA.csv").write_text(header + "".join(rows))
    if mc:
        (d / "mc_task.json").write_text(json.dumps(items))
    (d / "truth.jsonl").write_text("".join(json.dumps(r) + "\n" for r in truth))
    (d / "info.jsonl").write_text("".join(json.dumps(r) + "\n" for r in info))


def save_tiny_model(lm, folder: Path) -> Path:
    """A tiny model as a HF folder, loadable by locaudit's load_model (for CLI tests)."""
    lm.model.save_pretrained(str(folder))
    lm.tokenizer.save_pretrained(str(folder))
    return folder
