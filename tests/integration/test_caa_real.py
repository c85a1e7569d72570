"""CAA behaviours end to end on the real data and SmolLM2: probe texts keep the answer whole (the issue's
failure: texts cut from the left at 512 tokens lost CAA answers, every probe scored 0.5 and ITI's direction
was zero), CAA's A/B metric, the judge/behaviour check, and the CAA study files validate."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from locaudit.models.precision import resolve_precision as _P  # resolved once, as entry points do

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _caa(shared_data, *parts):
    p = shared_data.joinpath("caa", "datasets", *parts)
    if not p.exists():
        pytest.skip(f"{p} is absent")
    return p


def test_long_caa_probe_texts_keep_the_answer(shared_data, smollm2):
    """Hallucination prompts reach 2.2k characters before the appended question: every text fits in 512
    tokens, and its answer letter is there, right after 'A:'."""
    from locaudit.data.behaviour import load_behaviour
    from locaudit.data.probing import probe_texts

    path = _caa(shared_data, "generate", "hallucination", "generate_dataset.json")
    data = load_behaviour(f"caa:{path}")
    exs = data.probe_examples()
    longest = sorted(exs, key=lambda e: -(len(e.question) + len(e.random_question)))[:60]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        texts = probe_texts(longest, "plain", smollm2.tokenizer, 512)
    assert any("answers kept whole" in str(x.message) for x in w)
    for ex, t in zip(longest, texts):
        assert len(smollm2.tokenizer(t)["input_ids"]) <= 512
        assert f"\nA: {ex.answer}\nQ: " in t


def test_caa_probe_signal_and_iti_direction(shared_data, smollm2):
    """Matching and non-matching answers give different activations, so ITI's direction is not zero."""
    from locaudit.data.behaviour import load_behaviour
    from locaudit.data.probing import probe_texts
    from locaudit.edit.iti import mass_mean_directions
    from locaudit.localize.activations import collect_activations

    path = _caa(shared_data, "generate", "sycophancy", "generate_dataset.json")
    data = load_behaviour(f"caa:{path}", max_questions=6)
    exs = data.probe_examples()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        texts = probe_texts(exs, "plain", smollm2.tokenizer, 512)
    X = collect_activations(smollm2, texts, batch_size=8, progress=False, precision=_P('fp32'))  # [N, L, H, D]
    y = torch.tensor([e.label for e in exs])
    u = mass_mean_directions(X.flatten(1, 2).double(), y)  # [L*H, D]
    assert (u.norm(dim=-1) > 0).all()


def test_ab_metric_on_the_sycophancy_test_set(shared_data, smollm2):
    from locaudit.data.caa import load_caa
    from locaudit.data.prompts import PromptFormat
    from locaudit.evaluate.ab import score_ab

    pairs = load_caa(_caa(shared_data, "test", "sycophancy", "test_dataset_ab.json"))
    assert len(pairs) == 50
    pairs = pairs[:4]  # bounded: the metric's cost grows with the items (long prompts), its correctness does not
    fmt = PromptFormat("plain")
    res = score_ab(smollm2, None, pairs, fmt, batch_size=4, precision=_P('fp32'))
    s = res.summary()
    assert 0 < s["ab"] < 1 and s["n_ab"] == 4 and s["ab_delta"] == 0.0
    # one item by hand: the letters' probabilities after the prompt, normalised over the two
    p = pairs[0]
    tok = smollm2.tokenizer
    lps = []
    for ans in (p.chosen, p.rejected):
        prompt_ids = tok(fmt.prompt(p.question))["input_ids"]
        ids = tok(fmt.prompt(p.question) + fmt.completion(ans))["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(smollm2.model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        lps.append(sum(float(logp[t - 1, ids[t]]) for t in range(len(prompt_ids), len(ids))))
    assert res.p[0] == pytest.approx(1 / (1 + math.exp(lps[1] - lps[0])), abs=1e-4)


def test_truthfulqa_judges_are_refused_for_caa():
    from locaudit.errors import ConfigError
    from locaudit.evaluate.judges.behaviours import check_judge

    with pytest.raises(ConfigError, match="caa:sycophancy"):
        check_judge("default", "caa:sycophancy")
    check_judge("api:m@http://127.0.0.1:9/v1|rubric=caa:sycophancy", "caa:sycophancy")


@pytest.mark.parametrize("study", ["caa_sycophancy.yaml", "caa_refusal.yaml"])
def test_caa_study_files_validate(study, shared_data, monkeypatch):
    from locaudit.study.spec import load_study
    from locaudit.study.trials import expand

    monkeypatch.setenv("LOCAUDIT_DATA", str(shared_data))
    spec = load_study(REPO / "studies" / study)
    assert spec.evaluation.metrics[0] == "ab" and spec.verdict.primary_metric == "ab"
    trials = expand(spec)
    assert sum(t.kind == "optimal" for t in trials) == 12 and sum(t.kind == "iti" for t in trials) == 6
