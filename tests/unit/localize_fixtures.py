"""Inputs of a `locaudit localize` run on a tiny model: a saved tiny GPT-2 and a pairs file."""

from __future__ import annotations

import json
from pathlib import Path

from locaudit.models.tiny import tiny_model


def saved_model_and_pairs(tmp_path: Path, n_pairs: int) -> tuple[Path, Path]:
    """(model folder, pairs.jsonl) under tmp_path: tiny GPT-2 saved as HF files, n_pairs preference pairs."""
    lm = tiny_model("gpt2")
    model = tmp_path / "model"
    lm.model.save_pretrained(str(model))
    lm.tokenizer.save_pretrained(str(model))
    data = tmp_path / "pairs.jsonl"
    with data.open("w") as f:
        for i in range(n_pairs):
            f.write(json.dumps({"prompt": f"What is item {i}?", "chosen": f"Good {i % 4}.",
                                "rejected": f"Bad bad {i % 3}!"}) + "\n")
    return model, data
