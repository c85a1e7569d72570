"""SmolLM2's byte-level BPE already agrees: joint and separate tokenization give the same ids on every
TruthfulQA MC (question, answer), bare and after the ITI preamble, so MC1/MC2 cannot move (same ids, same
forward). Tokenizer only: a few seconds."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_smollm2_joint_equals_separate_on_truthfulqa_mc(smollm2, shared_data):
    from locaudit.data.prompts import PromptFormat
    from locaudit.data.truthfulqa import load_mc
    from locaudit.models.scoring import encode_completions, encode_separately

    items = load_mc(shared_data / "truthfulqa" / "data" / "mc_task.json")
    qs, ans = [], []
    for it in items:
        for a in dict.fromkeys((*it.mc1_answers, *it.mc2_answers)):
            qs.append(it.question)
            ans.append(a)
    tok = smollm2.tokenizer
    for fmt in (PromptFormat("plain"), PromptFormat("plain", protocol="iti")):
        prompts, comps = [fmt.prompt(q, tok) for q in qs], [fmt.completion(a) for a in ans]
        joint = encode_completions(tok, prompts, comps, max_length=4096)
        apart = encode_separately(tok, prompts, comps)
        differ = [i for i in range(len(joint)) if joint[i] != apart[i]]
        assert len(joint) > 5000 and not differ, [ans[i] for i in differ[:5]]
