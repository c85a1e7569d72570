"""Loaders take datasets-hub ids (`pairs:hf:OWNER/NAME[@CONFIG][:SPLIT]`); the hub itself is never touched:
`datasets.load_dataset` is replaced by a local Dataset."""

from __future__ import annotations

import pytest

datasets = pytest.importorskip("datasets")

from locaudit.data.behaviour import load_behaviour  # noqa: E402
from locaudit.errors import DataError  # noqa: E402

ROWS = [{"prompt": f"Question {i}?", "chosen": f"True answer {i}.", "rejected": f"False answer {i}.",
         "score": i} for i in range(10)]


@pytest.fixture
def hub(monkeypatch):
    calls = []

    def fake(name, config=None, split=None, **kw):
        calls.append((name, config, split))
        if name == "owner/missing":
            raise FileNotFoundError("Couldn't find a dataset script or data files for owner/missing")
        rows = ROWS if name == "owner/prefs" else [{"text": "a"}]
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    return calls


def test_pairs_from_a_hub_id_split_and_config(hub) -> None:
    data = load_behaviour("pairs:hf:owner/prefs@default:test", seed=0)
    assert hub == [("owner/prefs", "default", "test")]
    pairs = data.pairs()
    assert len(pairs) == 10 and {p.question for p in pairs} == {r["prompt"] for r in ROWS}
    assert sum(len(data.pairs(s)) for s in ("train", "val", "test")) == 10  # split by question, nothing lost
    load_behaviour("pairs:hf:owner/prefs", seed=0)
    assert hub[-1] == ("owner/prefs", None, "train")


def test_hub_errors_name_the_id_and_the_way_out(hub) -> None:
    with pytest.raises(DataError, match=r"'owner/missing'.*offline, pass a local file"):
        load_behaviour("pairs:hf:owner/missing", seed=0)
    with pytest.raises(DataError, match=r"no column\(s\) \['prompt', 'chosen', 'rejected'\]"):
        load_behaviour("pairs:hf:owner/other", seed=0)
    with pytest.raises(DataError, match="OWNER/NAME"):
        load_behaviour("pairs:hf:not-an-id", seed=0)
