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


def save_tiny_model(lm, folder: Path) -> Path:
    """A tiny model as a HF folder, loadable by locaudit's load_model (for CLI tests)."""
    lm.model.save_pretrained(str(folder))
    lm.tokenizer.save_pretrained(str(folder))
    return folder
