"""The packs under results/ (`locaudit pack`) are the data that docs/results.md is built from and that a long study
resumes from: each must still belong to its study file (the same trial keys, so that `locaudit run` goes on from
it rather than starting over), hold intact artifacts, stay small (no activations) and hold no copy of the
dataset's text (the data is read from ../shared/data, never copied into the repository)."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PACKS = sorted(p.parent for p in (ROOT / "results").glob("*/ledger.sqlite"))
MAX_PACK_BYTES = 50_000_000


def _study_file(name: str) -> Path:
    for f in sorted((ROOT / "studies").glob("*.yaml")):
        if (yaml.safe_load(f.read_text(encoding="utf-8")) or {}).get("name") == name:
            return f
    raise AssertionError(f"no study file in studies/ is named {name!r}")


def _ledger(pack: Path) -> tuple[dict, dict, set]:
    """(meta, in-spec trials by key, keys of the trials packed without their artifacts)."""
    from locaudit.study.ledger import PACKED_EVENT

    with sqlite3.connect(f"file:{pack / 'ledger.sqlite'}?mode=ro", uri=True) as c:
        c.row_factory = sqlite3.Row
        meta = {r["k"]: r["v"] for r in c.execute("SELECT k, v FROM meta")}
        trials = {r["key"]: dict(r) for r in c.execute("SELECT * FROM trials WHERE in_spec = 1")}
        packed = {r["key"] for r in c.execute("SELECT key FROM events WHERE event = ?", (PACKED_EVENT,))}
    return meta, trials, packed


def test_the_packs_are_found() -> None:
    if not (ROOT / "results").is_dir():
        pytest.skip("no results/ folder in this checkout: no pack to check")
    assert PACKS, "results/ exists but holds no pack (a folder with ledger.sqlite)"


@pytest.mark.parametrize("pack", PACKS, ids=[p.name for p in PACKS])
def test_a_pack_belongs_to_its_study_file(pack: Path, shared_data) -> None:
    from locaudit.study.spec import load_study
    from locaudit.study.trials import expand

    meta, trials, _ = _ledger(pack)
    name = json.loads(meta["study_name"]) if meta["study_name"].startswith('"') else meta["study_name"]
    keys = {t.key for t in expand(load_study(_study_file(name)))}
    assert set(trials) == keys, (f"{pack}: the study file's trials and the pack's differ ({len(keys - set(trials))} "
                                 f"new, {len(set(trials) - keys)} gone): `locaudit run` would not go on from it")


@pytest.mark.parametrize("pack", PACKS, ids=[p.name for p in PACKS])
def test_a_pack_is_intact_and_small(pack: Path) -> None:
    from locaudit.study.records import check_artifacts

    _, trials, packed = _ledger(pack)
    for key, r in trials.items():
        if r["status"] == "done" and key not in packed:  # packed ones: their activations were left out
            problem = check_artifacts(pack, json.loads(r["artifacts"] or "{}"))
            assert problem is None, f"{pack}: trial {key} ({r['name']}): {problem}"
    assert not list(pack.glob("shared/collect-*")), f"{pack} holds activations (`locaudit pack` leaves them out)"
    size = sum(f.stat().st_size for f in pack.rglob("*") if f.is_file())
    assert size < MAX_PACK_BYTES, f"{pack} is {size / 1e6:.1f} MB"


@pytest.mark.parametrize("pack", PACKS, ids=[p.name for p in PACKS])
def test_a_pack_holds_no_text_of_the_dataset(pack: Path) -> None:
    """Its evaluation files keep scores by qid (pack_text.py); with the data at hand, no question of TruthfulQA
    appears anywhere in the pack's text files."""
    from locaudit.io import read_jsonl

    for f in pack.rglob("generations.jsonl"):
        assert all("question" not in r for _, r in read_jsonl(f)), f"{f}: holds the questions (pack again)"
    for f in pack.rglob("mc_items.jsonl"):
        assert all("logprobs" not in r for _, r in read_jsonl(f)), f"{f}: holds the answers' text (pack again)"
    csv = Path(os.environ.get("LOCAUDIT_DATA", ROOT.parent / "shared" / "data")) / "truthfulqa/data/v1/TruthfulQA.csv"
    if not csv.is_file():
        pytest.skip(f"{csv} is missing: the structural checks passed, the text search needs the data")
    from locaudit.data.truthfulqa import load_truthfulqa

    def text_of(f: Path) -> str:  # the model's own answers may quote a question: they are its output, not data
        if f.suffix == ".jsonl":
            return "\n".join(json.dumps({k: v for k, v in r.items() if k != "answer"}, ensure_ascii=False)
                             for _, r in read_jsonl(f) if isinstance(r, dict))
        return f.read_text(encoding="utf-8", errors="replace")

    text = "\n".join(text_of(f) for f in pack.rglob("*")
                     if f.is_file() and f.suffix in (".json", ".jsonl", ".csv", ".txt", ".html"))
    found = [q.question for q in load_truthfulqa(csv) if q.question in text]
    assert not found, f"{pack} holds {len(found)} TruthfulQA question(s), e.g. {found[0]!r}"
