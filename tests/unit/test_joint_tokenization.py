"""Joint tokenization: a completion's ids are those of `prompt + completion` after the prompt's ids.

A SentencePiece-style legacy tokenizer (Llama/Alpaca: a "▁" prepended to every text, spaces as "▁",
pieces split at "▁") is trained offline here; with it " yes" alone is ['▁', '▁yes'] but after "A:" it is
['▁yes']. MC, IPO pair encoding and preference scoring must all score the joint ids.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from locaudit.data.prompts import PromptFormat
from locaudit.data.types import PreferencePair
from locaudit.models.scoring import encode_completions, encode_separately, joint_split, score_completions
from locaudit.models.precision import resolve_precision as _P  # resolved once, as entry points do

CORPUS = ["Q: Is the sky blue?\nA: yes it is.", "Q: Is fire cold?\nA: no it is not.",
          "yes yes yes no no answer answer the answer", "A: yes", "A: no", "Q: Can fish swim?\nA: yes they can."] * 3


def legacy_sp_tokenizer(eos_after: bool = False):
    """A SentencePiece-legacy-style BPE tokenizer trained on CORPUS (no network, no sentencepiece)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=120, show_progress=False,
                                                       special_tokens=["<unk>", "<s>", "</s>", "<pad>"]))
    single = "<s> $A </s>" if eos_after else "<s> $A"
    tk.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[("<s>", tk.token_to_id("<s>")), ("</s>", tk.token_to_id("</s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def tok():
    return legacy_sp_tokenizer()


@pytest.fixture(scope="module")
def lm(tok):
    """A tiny random llama whose vocabulary is the legacy tokenizer's."""
    from transformers import AutoModelForCausalLM

    from locaudit.models.loading import wrap_model
    from locaudit.models.tiny import tiny_config

    cfg = tiny_config("llama", vocab=len(tok))
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    return wrap_model(model, tok, name="tiny-llama-sp")


def pieces(tok, ids):
    return tok.convert_ids_to_tokens(list(ids))


def test_the_tokenizer_has_the_legacy_quirk(tok):
    assert pieces(tok, tok(" yes", add_special_tokens=False)["input_ids"]) == ["▁", "▁yes"]
    assert pieces(tok, tok("A: yes")["input_ids"])[-1] == "▁yes"


def test_joint_split_clean_and_fallback():
    assert joint_split([1, 2, 3], [1, 2, 3, 4, 5]) == ([1, 2, 3], [4, 5], True)
    assert joint_split([1, 2, 3], [1, 2, 9, 5]) == ([1, 2], [9, 5], False)  # 3 merged with the completion
    assert joint_split([1, 2], [1, 2]) == ([1, 2], [], True)  # empty completion


def test_encode_completions_uses_the_joint_ids(tok):
    prompts, comps = ["Q: Is fire cold?\nA:"] * 2, [" yes", " no it is not."]
    joint = encode_completions(tok, prompts, comps)
    apart = encode_separately(tok, prompts, comps)
    for (p, c), prompt, comp in zip(joint, prompts, comps):
        full = tok(prompt + comp)["input_ids"]
        assert p + c == full and p == tok(prompt)["input_ids"]
    assert pieces(tok, joint[0][1]) == ["▁yes"] and pieces(tok, apart[0][1]) == ["▁", "▁yes"]


def test_boundary_merge_fallback_is_counted_and_keeps_the_joint_text(tok, caplog):
    # "A: " alone ends in a lone '▁' piece; in "A: yes" that space belongs to '▁yes'
    with caplog.at_level(logging.WARNING, logger="locaudit.models.scoring"):
        [(p, c)] = encode_completions(tok, ["A: "], ["yes"])
    assert tok(["A: "])["input_ids"][0][-1] not in p  # the straddling '▁' is not a prompt token
    assert p + c == tok("A: yes")["input_ids"] and pieces(tok, c) == ["▁yes"]
    assert "merging the prompt's end" in caplog.text


def test_a_trailing_eos_is_not_scored():
    tok = legacy_sp_tokenizer(eos_after=True)
    [(p, c)] = encode_completions(tok, ["A:"], [" yes"])
    assert p == tok("A:")["input_ids"][:-1] and pieces(tok, p)[0] == "<s>"  # the prompt without its EOS
    assert "</s>" not in pieces(tok, p + c) and pieces(tok, c) == ["▁yes"]


def direct_logprob(lm, ids, n_prompt):
    """Summed log-prob of ids[n_prompt:] by one plain forward (independent of scoring.py)."""
    x = torch.tensor([ids])
    with torch.no_grad():
        logp = F.log_softmax(lm.model(input_ids=x).logits[0].float(), -1)
    return float(sum(logp[t - 1, ids[t]] for t in range(n_prompt, len(ids))))


def test_mc_scores_the_joint_ids(lm, tok):
    from locaudit.evaluate.mc import score_answers

    qs, ans = ["Is fire cold?", "Is fire cold?", "Can fish swim?"], ["yes", "no it is not.", "yes they can."]
    fmt = PromptFormat("plain")
    for share in (True, False):
        got = score_answers(lm, None, qs, ans, fmt, share_prompt=share, precision=_P('fp32'))
        for q, a, g in zip(qs, ans, got):
            prompt = fmt.prompt(q)
            n = len(tok(prompt)["input_ids"])
            assert g == pytest.approx(direct_logprob(lm, tok(prompt + fmt.completion(a))["input_ids"], n), abs=1e-4)
    # the separate tokenization gives another number (so the test can tell them apart)
    prompt = fmt.prompt(qs[0])
    p_ids = tok(prompt)["input_ids"]
    sep = p_ids + tok(" yes", add_special_tokens=False)["input_ids"]
    assert abs(direct_logprob(lm, sep, len(p_ids)) - got[0]) > 1e-3


def test_ipo_pairs_and_preferences_use_the_joint_ids(lm, tok):
    from locaudit.edit.encoded import encode_pairs
    from locaudit.evaluate.preferences import score_preferences

    fmt = PromptFormat("plain")
    pairs = [PreferencePair("q1", "Is fire cold?", "no it is not.", "yes"),
             PreferencePair("q2", "Can fish swim?", "yes they can.", "no")]
    enc = encode_pairs(tok, pairs, fmt)
    for pr, (cp, cc), (rp, rc) in zip(pairs, enc.chosen, enc.rejected):
        prompt = fmt.prompt(pr.question)
        assert cp + cc == tok(prompt + fmt.completion(pr.chosen))["input_ids"]
        assert rp + rc == tok(prompt + fmt.completion(pr.rejected))["input_ids"]
    assert pieces(tok, enc.rejected[0][1]) == ["▁yes"]
    res = score_preferences(lm, None, pairs, fmt, precision=_P('fp32'))
    for pr, c, r in zip(pairs, res.chosen, res.rejected):
        prompt = fmt.prompt(pr.question)
        n = len(tok(prompt)["input_ids"])
        for ans, got in ((pr.chosen, c), (pr.rejected, r)):
            ids = tok(prompt + fmt.completion(ans))["input_ids"]
            assert got == pytest.approx(direct_logprob(lm, ids, n) / (len(ids) - n), abs=1e-4)


def test_score_completions_matches_direct_forward(lm, tok):
    prompts, comps = ["Q: Is the sky blue?\nA:", "A:"], [" yes it is.", " no"]
    sums, counts = score_completions(lm.model, tok, prompts, comps)
    for p, c, s, n in zip(prompts, comps, sums, counts):
        ids, k = tok(p + c)["input_ids"], len(tok(p)["input_ids"])
        assert int(n) == len(ids) - k
        assert float(s) == pytest.approx(direct_logprob(lm, ids, k), abs=1e-4)
