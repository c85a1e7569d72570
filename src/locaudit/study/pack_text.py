"""Keep the dataset's own text out of a pack: a pack is meant to be committed or carried, the dataset is not.

A trial's evaluation folder holds, beside its scores, text of the dataset it was scored on: each generated
answer's question (`generations.jsonl`) and, per multiple-choice question, the log-prob of every reference
answer keyed by the answer's text (`mc_items.jsonl`). A run folder keeps them (they make the files readable);
a pack of a TruthfulQA study would otherwise hold a copy of the test split's questions and answers once per
trial. `strip_dataset_text` rewrites a pack's copies:

  generations.jsonl   {"qid", "answer"}: the question is dropped (the model's answer is the run's own output);
                      `locaudit report --judge` looks it up by qid in the study's data (rejudge.py)
  mc_items.jsonl      {"qid", "mc1", "mc2", "mc0", "logprobs_in_order"}: the log-probs as a list, in the order
                      of the item's distinct answers (mc1 answers, then mc2, then mc0: evaluate/mc.mc_result),
                      instead of a dict keyed by the answers' text

and re-seals each folder whose checksum manifest covered a rewritten file, if, and only if, that manifest
matched its files before (a damaged folder stays damaged, and is found so when the run starts from the pack).
Every score the report reads (mc1, mc2, mc0 per question; judgements) is unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from locaudit.io import CHECKSUM_FILE, read_jsonl, verify_checksums, write_checksums, write_text_atomic


def _generation(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k != "question"}


def _mc_item(rec: dict) -> dict:
    out = {k: v for k, v in rec.items() if k != "logprobs"}
    lp = rec.get("logprobs")
    if isinstance(lp, dict):
        out["logprobs_in_order"] = list(lp.values())
    return out


STRIPPERS: dict[str, Callable[[dict], dict]] = {"generations.jsonl": _generation, "mc_items.jsonl": _mc_item}


def _sealing(path: Path, root: Path) -> Path | None:
    """The folder (at or below `root`) whose checksum manifest lists `path`, if any."""
    for d in path.parents:
        if d != root and root not in d.parents:
            return None
        m = d / CHECKSUM_FILE
        if m.is_file():
            try:
                listed = json.loads(m.read_text(encoding="utf-8")).get("files", {})
            except (OSError, ValueError, AttributeError):
                return d
            if str(path.relative_to(d)) in listed:
                return d
    return None


def strip_dataset_text(root: str | Path) -> int:
    """Rewrite every generations.jsonl and mc_items.jsonl under `root` without the dataset's text (see the
    module docstring); returns the number of files rewritten. A file that is not JSON lines is left as it is."""
    root = Path(root)
    files = sorted(f for name in STRIPPERS for f in root.rglob(name) if f.is_file() and not f.is_symlink())
    intact: dict[Path, bool] = {}  # a sealing folder -> whether its manifest matched, checked before its first rewrite
    changed, resealed = 0, set()
    for f in files:
        try:
            recs = [rec for _, rec in read_jsonl(f)]
        except Exception:
            continue
        new = [STRIPPERS[f.name](r) if isinstance(r, dict) else r for r in recs]
        if new == recs:
            continue
        seal = _sealing(f, root)
        if seal is not None and seal not in intact:
            intact[seal] = verify_checksums(seal) is None
        write_text_atomic(f, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in new))  # as written
        changed += 1
        if seal is not None and intact[seal]:
            resealed.add(seal)
    for d in sorted(resealed):
        write_checksums(d)
    return changed


__all__ = ["strip_dataset_text", "STRIPPERS"]
