"""Generation of many edits in one batch (evaluate/shared_gen.py) gives each edit the answers it gets alone.

fp32: the same strings. bf16: the stacked batch rounds other matmul shapes, so a greedy choice can flip where two
tokens tie within bf16 rounding; at most one answer in ten may differ there, while the edits change most answers
(so agreement is not vacuous) and a wrong routing of the batch's blocks would change nearly all of them.
"""

from __future__ import annotations

import json

import pytest
import torch

from eval_fixtures import write_truthfulqa
from locaudit.data.behaviour import load_behaviour
from locaudit.data.prompts import PromptFormat
from locaudit.data.types import Question
from locaudit.edit.iti import ITIEdit
from locaudit.edit.lora import LoRAEdit, edit_masks
from locaudit.evaluate.generate import generate_answers
from locaudit.evaluate.klce import clear_memory_cache
from locaudit.evaluate.runner import EvalConfig, evaluate_edit
from locaudit.evaluate.shared import evaluate_edits
from locaudit.evaluate.shared_gen import generate_many, plan_groups, stack_for
from locaudit.heads import HeadSet
from locaudit.models.precision import resolve_precision
from locaudit.models.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = ["Hi?", "What is the tallest mountain on Earth?", "Why?", "Who wrote Hamlet, the play?",
             "Where do bees go in winter?", "Is tea older than coffee?"]


def questions() -> list[Question]:
    return [Question(f"q{i}", q, "b", ("b",), ("c",)) for i, q in enumerate(QUESTIONS)]


def lora(lm, heads, seed: int, rank: int = 1, scale: float = 1.0) -> LoRAEdit:
    hs = HeadSet.from_heads(heads)
    a_mask, b_mask = edit_masks(lm.sites, hs, reparam=True)
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(a_mask.shape[0], rank, a_mask.shape[-1], generator=g) * a_mask * scale
    b = torch.randn(b_mask.shape[0], rank, b_mask.shape[-1], generator=g) * b_mask * scale
    return LoRAEdit(a, b, hs)


def iti(lm, heads) -> ITIEdit:
    L, H, D = lm.sites.shape
    hs = HeadSet.from_heads(heads)
    theta = torch.randn(L, H * D, generator=torch.Generator().manual_seed(3)) * hs.dim_mask(L, H, D)
    return ITIEdit(theta, alpha=6.0, heads=hs)


def edits_for(lm) -> list:
    n = lm.sites.n_layers
    return [None, lora(lm, [(0, 1)], 1), lora(lm, [(n - 1, 2), (1, 0)], 2), iti(lm, [(1, 1)]),
            lora(lm, [(2, 2)], 4, rank=2), lora(lm, [(1, 3)], 5), None]


def test_plan_groups() -> None:
    lm = tiny_model("llama", n_layers=4)
    e = edits_for(lm)  # 0 none, 1 r1, 2 r1, 3 iti, 4 r2, 5 r1, 6 none
    assert plan_groups(e, 2) == [[1, 2], [0, 5], [4, 6], [3]]
    g3 = plan_groups(e, 3)
    assert g3 == [[1, 2, 5], [0, 4, 6], [3]]
    assert plan_groups(e, 1) == [[1], [2], [5], [4], [3], [0], [6]]
    assert plan_groups([None, None], 8) == [[0], [1]]
    assert sorted(i for g in plan_groups(e, 8) for i in g) == list(range(len(e)))
    with pytest.raises(ValueError):
        stack_for(lm, [e[1], e[3]])
    with pytest.raises(ValueError):
        stack_for(lm, [e[1], e[4]])


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("protocol", ["iti", "bare"])
def test_together_equals_one_at_a_time(family, precision, protocol) -> None:
    lm = tiny_model(family, n_layers=4)
    edits = edits_for(lm)
    prec = resolve_precision(precision, lm.device)
    fmt = PromptFormat("plain", protocol=protocol)
    alone = [generate_answers(lm, e, questions(), fmt, max_new_tokens=8, batch_size=4, progress=False,
                              precision=prec) for e in edits]
    together = generate_many(lm, edits, questions(), fmt, max_new_tokens=8, batch_size=4, precision=prec,
                             edits_together=3, progress=False)
    assert [[r.qid for r in recs] for recs in together] == [[r.qid for r in recs] for recs in alone]
    a = [[r.answer for r in recs] for recs in alone]
    t = [[r.answer for r in recs] for recs in together]
    n = sum(len(x) for x in a)
    differ = sum(x != y for xa, ta in zip(a, t) for x, y in zip(xa, ta))
    if precision == "fp32":
        assert t == a
    else:
        assert differ <= n // 10, (differ, n)
    changed = sum(x != y for xa in a[1:6] for x, y in zip(xa, a[0]))
    assert changed >= len(QUESTIONS) * 5 // 2, changed  # the edits act
    assert t[0] == t[6]  # the unedited model, in a stack and alone
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules()) == 0


class Judge:
    name = "text-judge"

    def score(self, questions, answers):
        return [{"truth": float(len(a) % 2), "info": float(len(set(a)) % 3 > 0)} for a in answers]


def test_evaluate_edits_generates_together(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LOCAUDIT_CACHE", str(tmp_path / "cache"))
    clear_memory_cache()
    data = load_behaviour(f"truthfulqa:{write_truthfulqa(tmp_path / 'tqa')}", fractions=(0.4, 0.2, 0.4))
    lm = tiny_model("llama", n_layers=4)
    edits = edits_for(lm)
    cfg = EvalConfig(progress=False, precision="fp32", max_new_tokens=6, kl_max_tokens=128, max_length=128,
                     gen_edits_together=3, gen_max_questions=3)
    metrics = ("mc", "gen")
    alone = [evaluate_edit(lm, e, data, "test", metrics, Judge(), tmp_path / f"a{i}", cfg) for i, e in enumerate(edits)]
    shared = evaluate_edits(lm, edits, data, "test", metrics, Judge(), [tmp_path / f"s{i}" for i in range(len(edits))],
                            cfg)
    for i, (a, s) in enumerate(zip(alone, shared)):
        assert s.n_generated == a.n_generated == 3
        assert (s.true, s.info, s.true_info) == (a.true, a.info, a.true_info), i
        assert s.seconds["gen"] > 0
        for name in ("generations.jsonl", "judgements.jsonl"):
            assert (tmp_path / f"s{i}" / name).read_text() == (tmp_path / f"a{i}" / name).read_text(), (i, name)
        got = json.loads((tmp_path / f"s{i}" / "result.json").read_text())
        assert got["n_generated"] == 3
