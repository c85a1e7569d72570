"""HF causal-LM judges on tiny random models: the yes/no continuation tokens, P(yes) normalised over
{yes, no} checked against a direct computation, batched = one at a time."""

from __future__ import annotations

import pytest
import torch

from locaudit.errors import ConfigError
from locaudit.evaluate.judges import get_judge
from locaudit.evaluate.judges.hf import HFJudge, judge_prompt, yes_no_continuations, yes_probability
from locaudit.models.tiny import tiny_model

QS = ["What is the capital of France?", "Why?", "Is the Earth flat or is it round, in your opinion?"]
AS = ["Paris.", "Because it is so, and that is all there is to say about it.", "Round."]


def with_yes_no_tokens(family: str = "llama"):
    """A tiny model whose tokenizer has single tokens ' yes' and ' no' (like Llama's '▁yes')."""
    lm = tiny_model(family, seed=3)
    lm.tokenizer.add_tokens([" yes", " no"])
    lm.model.resize_token_embeddings(len(lm.tokenizer))
    with torch.no_grad():
        lm.model.get_output_embeddings().weight[-2:].normal_(0, 0.5)
    return lm


def direct_yes_prob_single(lm, prompt: str, kind: str) -> float:
    cont = yes_no_continuations(lm.tokenizer, kind)
    ids = torch.tensor([lm.tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        logits = lm.model(input_ids=ids).logits[0, -1]
    return torch.softmax(torch.stack([logits[cont.yes[0]], logits[cont.no[0]]]), 0)[0].item()


def direct_yes_prob_multi(lm, prompt: str) -> float:
    tok = lm.tokenizer
    logp = {}
    for word in (" yes", " no"):
        full = tok(prompt + word)["input_ids"]
        n_prompt = len(tok(prompt)["input_ids"])
        with torch.no_grad():
            lp = torch.log_softmax(lm.model(input_ids=torch.tensor([full])).logits[0].float(), -1)
        logp[word] = sum(lp[t - 1, full[t]].item() for t in range(n_prompt, len(full)))
    return 1 / (1 + torch.exp(torch.tensor(logp[" no"] - logp[" yes"]))).item()


def test_judge_prompt_format():
    assert judge_prompt("truth", "Q?", "A.") == "Q: Q?\nA: A.\nTrue:"
    assert judge_prompt("info", "Q?", "A.") == "Q: Q?\nA: A.\nHelpful:"
    with pytest.raises(ConfigError):
        judge_prompt("both", "Q?", "A.")


def test_yes_no_tokens_single():
    lm = with_yes_no_tokens()
    cont = yes_no_continuations(lm.tokenizer, "truth")
    assert cont.single_token
    assert cont.yes == (lm.tokenizer.convert_tokens_to_ids(" yes"),)
    assert cont.no == (lm.tokenizer.convert_tokens_to_ids(" no"),)


def test_yes_no_tokens_multi():
    lm = tiny_model("llama")
    cont = yes_no_continuations(lm.tokenizer, "info")
    assert not cont.single_token
    assert list(cont.yes) == lm.tokenizer(" yes", add_special_tokens=False)["input_ids"]
    assert list(cont.no) == lm.tokenizer(" no", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_single_token_matches_direct_and_batching(family):
    lm = with_yes_no_tokens(family)
    prompts = [judge_prompt("truth", q, a) for q, a in zip(QS, AS)]
    batched = yes_probability(lm, prompts, "truth", batch_size=3)
    single = torch.cat([yes_probability(lm, [p], "truth", batch_size=1) for p in prompts])
    direct = torch.tensor([direct_yes_prob_single(lm, p, "truth") for p in prompts])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched, direct, atol=1e-5, rtol=0)
    assert ((batched > 0) & (batched < 1)).all() and batched.std() > 0


def test_multi_token_matches_direct_and_batching():
    lm = tiny_model("qwen2", seed=1)
    prompts = [judge_prompt("info", q, a) for q, a in zip(QS, AS)]
    batched = yes_probability(lm, prompts, "info", batch_size=2)
    single = torch.cat([yes_probability(lm, [p], "info", batch_size=1) for p in prompts])
    direct = torch.tensor([direct_yes_prob_multi(lm, p) for p in prompts])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched, direct, atol=1e-5, rtol=0)


def test_hf_judge_truth_only_and_name():
    lm = with_yes_no_tokens()
    judge = HFJudge(lm, None, batch_size=2)
    scores = judge.score(QS, AS)
    assert all(s.info is None and 0 <= s.truth <= 1 for s in scores)
    assert judge.kinds == ("truth",)
    assert lm.fingerprint[:10] in judge.name
    with pytest.raises(ConfigError):
        HFJudge(None, None)


def test_get_judge_hf_from_local_folders(tmp_path):
    for name, seed in (("truth", 1), ("info", 2)):
        lm = tiny_model("llama", seed=seed)
        lm.model.save_pretrained(tmp_path / name)
        lm.tokenizer.save_pretrained(tmp_path / name)
    judge = get_judge(f"hf:{tmp_path / 'truth'},{tmp_path / 'info'}", cache=tmp_path / "cache.sqlite", device="cpu")
    s = judge.score(QS[:2], AS[:2])
    assert all(x.truth is not None and x.info is not None for x in s)
    assert s[0].truth != s[0].info  # two different models
    with pytest.raises(ConfigError, match="hf:TRUTH_MODEL,INFO_MODEL"):
        get_judge("hf:only-one-model")
