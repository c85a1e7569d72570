"""Judges declare the behaviours they are valid for; check_judge refuses a mismatch; API rubric judges
score CAA open-ended answers with the behaviour's yes/no question."""

from __future__ import annotations

import math

import pytest

from locaudit.errors import ConfigError
from locaudit.evaluate.judges import CachedJudge, get_judge
from locaudit.evaluate.judges.api import RUBRICS, ApiJudge, parse_api_spec
from locaudit.evaluate.judges.base import ANY_BEHAVIOUR, TRUTHFULQA, behaviour_key
from locaudit.evaluate.judges.behaviours import check_judge, judge_behaviours

TQA = "truthfulqa:../shared/data/truthfulqa/data/v1/TruthfulQA.csv"


@pytest.mark.parametrize("spec,key", [
    (TQA, "truthfulqa"), ("truthfulqa", "truthfulqa"), ("caa:sycophancy", "caa:sycophancy"),
    ("caa:test/sycophancy", "caa:sycophancy"),
    ("caa:/d/caa/datasets/generate/hallucination/generate_dataset.json", "caa:hallucination"),
    ("caa:/d/caa/datasets/test/refusal/test_dataset_ab.json", "caa:refusal"), ("pairs:/x/my_pairs.jsonl", "pairs:my_pairs"),
])
def test_behaviour_key(spec, key):
    assert behaviour_key(spec) == key


@pytest.mark.parametrize("judge", ["default", "trained:runs/j", "reference:bleu", "hf:a,b", "api:m@http://h/v1"])
def test_truthfulqa_judges_are_refused_for_caa_and_pairs(judge):
    check_judge(judge, TQA)  # valid there
    with pytest.raises(ConfigError, match=r"valid for truthfulqa only.*caa:sycophancy.*rubric=caa:sycophancy"):
        check_judge(judge, "caa:sycophancy")
    with pytest.raises(ConfigError, match="pairs:p"):
        check_judge(judge, "pairs:p.jsonl")


def test_rubric_judges_are_valid_for_their_behaviour_only(tmp_path):
    spec = "api:m@http://127.0.0.1:9/v1|rubric=caa:sycophancy"
    check_judge(spec, "caa:sycophancy")
    check_judge(spec, "caa:test/sycophancy")
    with pytest.raises(ConfigError, match="caa:refusal"):
        check_judge(spec, "caa:refusal")
    with pytest.raises(ConfigError):
        check_judge(spec, TQA)
    (tmp_path / "r.txt").write_text("Does the answer mention cats?")
    own = f"api:m@http://127.0.0.1:9/v1#KEY|rubric=file:{tmp_path / 'r.txt'}"
    assert judge_behaviours(own) == (ANY_BEHAVIOUR,)
    check_judge(own, "pairs:anything.jsonl")
    assert parse_api_spec(own[4:])["key_env"] == "KEY"


def test_objects_declare_behaviours_and_unknown_specs_make_no_claim():
    j = ApiJudge("m", "http://127.0.0.1:9/v1|rubric=caa:refusal", max_retries=0)
    assert j.behaviours == ("caa:refusal",) and j.kinds == ("truth",) and "rubric=caa:refusal" in j.name
    wrapped = CachedJudge(j, path=None)
    assert judge_behaviours(wrapped) == ("caa:refusal",)
    check_judge(wrapped, "caa:refusal")
    assert ApiJudge("m", "http://127.0.0.1:9/v1").behaviours == (TRUTHFULQA,)
    check_judge("fake", "caa:refusal")  # test judges without a claim pass
    check_judge(None, "caa:refusal")
    with pytest.raises(ConfigError, match="unknown behaviour"):
        ApiJudge("m", "http://127.0.0.1:9/v1|rubric=caa:nonsense")
    with pytest.raises(ConfigError, match="rubric="):
        ApiJudge("m", "http://127.0.0.1:9/v1|colour=blue")


def test_rubric_judge_asks_the_behaviour_question(monkeypatch):
    """Through get_judge (the registry passes the URL on, '|rubric=...' included): the request carries the
    behaviour's rubric question, and P(yes) from the logprobs lands in the truth slot."""
    from test_judges_api import Server  # the local chat-completions server of the API judge's tests

    srv = Server(script=[(200, {"id": "x", "object": "chat.completion", "choices": [{
        "index": 0, "message": {"role": "assistant", "content": "yes"}, "finish_reason": "stop",
        "logprobs": {"content": [{"token": "yes", "logprob": math.log(0.7), "top_logprobs": [
            {"token": "yes", "logprob": math.log(0.7)}, {"token": "no", "logprob": math.log(0.3)}]}]}}]})])
    with srv:
        judge = get_judge(f"api:grader@{srv.url}|rubric=caa:sycophancy", cache=False, max_retries=0)
        (score,) = judge.score(["I think the earth is flat. Do you agree?"], ["Yes, you are right."])
    assert score.truth == pytest.approx(0.7) and score.info is None
    msg = srv.requests[0]["messages"]
    assert RUBRICS["sycophancy"] in msg[-1]["content"] and "Yes, you are right." in msg[-1]["content"]
    assert "TruthfulQA" not in msg[0]["content"]
