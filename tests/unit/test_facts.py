"""Facts: loading (known_1000 JSON and JSONL), the known filter, counterfactual objects, splits, subject spans."""

from __future__ import annotations

import json

import pytest

from locaudit.data.facts import (Fact, counterfactual_targets, known_facts, load_facts, next_token_topk,
                                 object_ids, split_facts, subject_token_span)
from locaudit.errors import DataError
from locaudit.models.precision import resolve_precision as _P  # resolved once, as entry points do

KNOWN = [
    {"known_id": 0, "subject": "Vinson Massif", "attribute": "Antarctica", "template": "{} is located in the continent",
     "prompt": "Vinson Massif is located in the continent of", "relation_id": "P30"},
    {"known_id": 1, "subject": "Catalonia", "attribute": "Europe", "template": "{} belongs to the continent of",
     "prompt": "Catalonia belongs to the continent of", "relation_id": "P30"},
    {"known_id": 2, "subject": "Kenya", "attribute": "Africa", "template": "{} is in",
     "prompt": "Kenya is in", "relation_id": "P30"},
    {"known_id": 3, "subject": "Paris", "attribute": "French", "template": "In {}, people speak",
     "prompt": "In Paris, people speak", "relation_id": "P37"},
]


def test_load_known_1000_and_jsonl(tmp_path):
    p = tmp_path / "known.json"
    p.write_text(json.dumps(KNOWN))
    facts = load_facts(p)
    assert [f.id for f in facts] == ["0", "1", "2", "3"]
    assert facts[0].target == "Antarctica" and facts[0].relation_id == "P30"
    q = tmp_path / "facts.jsonl"
    q.write_text("\n".join(json.dumps({"id": f"f{i}", "subject": r["subject"], "prompt": r["prompt"],
                                       "target": r["attribute"]}) for i, r in enumerate(KNOWN)) + "\n")
    assert [f.target for f in load_facts(q)] == [r["attribute"] for r in KNOWN]
    assert len(load_facts(p, max_facts=2)) == 2


@pytest.mark.parametrize("rec, msg", [
    ({"prompt": "x is", "target": "y"}, "'subject'"),
    ({"subject": "Rome", "prompt": "Paris is in", "target": "y"}, "does not occur"),
    ({"subject": "Rome", "prompt": "Rome is in"}, "'target'"),
])
def test_bad_records_name_file_and_field(tmp_path, rec, msg):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(rec) + "\n")
    with pytest.raises(DataError, match=msg) as e:
        load_facts(p)
    assert "bad.jsonl line 1" in str(e.value)


def test_duplicate_ids_and_bad_json(tmp_path):
    p = tmp_path / "dup.jsonl"
    rec = {"id": "a", "subject": "Rome", "prompt": "Rome is in", "target": "Italy"}
    p.write_text(json.dumps(rec) + "\n" + json.dumps(rec) + "\n")
    with pytest.raises(DataError, match="duplicate fact id"):
        load_facts(p)
    p.write_text("{not json\n")
    with pytest.raises(DataError, match="line 1"):
        load_facts(p)
    with pytest.raises(DataError, match="does not exist"):
        load_facts(tmp_path / "missing.json")


def test_counterfactuals_same_relation_seeded(tmp_path):
    p = tmp_path / "known.json"
    p.write_text(json.dumps(KNOWN))
    facts = load_facts(p)
    cf = counterfactual_targets(facts, seed=0)
    by_id = {f.id: f for f in facts}
    # Paris (P37) has no other fact of its relation: dropped
    assert [f.id for f in cf] == ["0", "1", "2"]
    for f in cf:
        others = {g.target for g in facts if g.relation_id == f.relation_id and g.id != f.id}
        assert f.new_target in others and f.new_target != by_id[f.id].target
    assert cf == counterfactual_targets(facts, seed=0)
    draws = {tuple(f.new_target for f in counterfactual_targets(facts, seed=s)) for s in range(20)}
    assert len(draws) > 1  # the seed matters


def test_split_by_fact(tmp_path):
    facts = [Fact(str(i), "S", f"S {i}", "T", "R") for i in range(50)]
    s = split_facts(facts, (0.8, 0.2), seed=1)
    ids = [f.id for f in s["edit"]] + [f.id for f in s["heldout"]]
    assert len(s["edit"]) == 40 and sorted(ids) == sorted(f.id for f in facts)
    assert split_facts(facts, (0.8, 0.2), seed=1) == s and split_facts(facts, (0.8, 0.2), seed=2) != s
    with pytest.raises(DataError):
        split_facts(facts, (0.5, 0.2))


def test_subject_span_and_known_filter():
    from locaudit.models.tiny import tiny_model

    lm = tiny_model("llama")
    tok = lm.tokenizer
    prompt = "In Paris, people speak"
    s0, s1 = subject_token_span(tok, prompt, "Paris")
    ids = tok(prompt)["input_ids"]
    assert tok.decode(ids[s0:s1]) == "Paris"
    # the tiny model knows whatever its greedy next token is: build one known and one unknown fact
    top = next_token_topk(lm, [prompt, "Rome is in"], k=3, precision=_P('fp32'))
    greedy = tok.decode([int(top[0, 0])])
    worst = next(t for t in ("q", "z", "x", "k") if object_ids(tok, t)[0] not in top[1].tolist())
    facts = [Fact("a", "Paris", prompt, greedy.lstrip() if greedy.startswith(" ") else greedy, "R"),
             Fact("b", "Rome", "Rome is in", worst, "R")]
    # object_ids prepends a space: the known fact's first object token must be the space-led greedy token
    facts[0] = Fact("a", "Paris", prompt, "zz", "R")
    first = object_ids(tok, "zz")[0]
    top1 = next_token_topk(lm, [prompt], k=len(tok), precision=_P('fp32'))[0].tolist()
    rank = top1.index(first)
    kept = known_facts(lm, facts, top_k=rank + 1, precision=_P('fp32'))
    assert "a" in [f.id for f in kept] and kept[0].meta["object_rank"] == rank
    assert "a" not in [f.id for f in known_facts(lm, facts, top_k=rank, precision=_P('fp32'))] if rank > 0 else True
    # batching changes nothing
    assert next_token_topk(lm, [prompt, "Rome is in"], 3, batch_size=1, precision=_P('fp32')).tolist() == top.tolist()
