"""Trained judges on a tiny random backbone: training holds out the evaluation questions, the saved
judge reloads to the same scores, broken judge folders get clear errors, and the logistic head agrees
with scikit-learn."""

from __future__ import annotations

import json
import random

import pytest
import torch

from locaudit.data import load_behaviour
from locaudit.errors import DataError
from locaudit.evaluate.judges import References, get_judge
from locaudit.evaluate.judges.features import PairEncoder
from locaudit.evaluate.judges.heads import fit_logistic, fit_mlp
from locaudit.evaluate.judges.train import JudgeTrainConfig, train_judge
from locaudit.evaluate.judges.trained import load_trained_judge
from locaudit.models.precision import resolve_precision as _P  # resolved once, as entry points do
from locaudit.models.tiny import tiny_model

from eval_fixtures import JUDGE_TOPICS as TOPICS, write_judge_data




@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("judge")
    write_judge_data(d, TOPICS)
    return d


@pytest.fixture(scope="module")
def trained(setup, tmp_path_factory):
    import os

    old = os.environ.get("LOCAUDIT_CACHE")
    os.environ["LOCAUDIT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    lm = tiny_model("llama", seed=0)
    cfg = JudgeTrainConfig(kinds=["truth", "info"], model="tiny", truth_data=setup / "truth.jsonl",
                           info_data=setup / "info.jsonl", holdout=f"truthfulqa:{setup / 'TruthfulQA.csv'}",
                           seed=1, layers=[0, 2], batch_size=8, l2_grid=[1e-2, 1e-1], heads=["logistic"],
                           precision="fp32")
    report = train_judge(cfg, setup / "out", lm=lm)
    yield lm, cfg, report
    if old is None:
        os.environ.pop("LOCAUDIT_CACHE", None)
    else:
        os.environ["LOCAUDIT_CACHE"] = old


def test_training_holds_out_the_test_questions(setup, trained):
    lm, cfg, report = trained
    test_q = load_behaviour(cfg.holdout, seed=1).questions("test")
    assert report["holdout"]["n_held_out_questions"] == len(test_q) == 4
    for kind in ("truth", "info"):
        r = report["kinds"][kind]
        assert r["n_heldout_questions"] == 4
        assert r["n_train_questions"] == len(TOPICS) - 4
        assert r["held_out"]["n"] == 4 * 5
    # reference features carry truth to unseen questions: correct/incorrect references are told apart
    assert report["kinds"]["truth"]["held_out"]["accuracy"] >= 0.8
    saved = json.loads((setup / "out" / "judge.json").read_text())
    assert saved["report"]["kinds"]["truth"]["held_out"]["n"] == 20
    assert set(saved["heads"]) == {"truth.ref", "truth.noref", "info.ref", "info.noref"}


def test_hard_negatives_calibration_and_audit_in_the_report(setup, trained):
    """Two hard negatives per question: the 16 training questions' go into training, the 4 held-out
    questions' are scored apart; ECE and a reliability diagram; the shipped audit set is scored."""
    lm, cfg, report = trained
    assert report["hard_negatives"] == {"train": 2 * (len(TOPICS) - 4), "held_out": 2 * 4}
    info = report["kinds"]["info"]
    assert info["held_out_hard"]["n"] == 8  # every category has an info label
    assert report["kinds"]["truth"]["held_out_hard"]["n"] <= 8  # copied questions carry no truth label
    assert set(info["held_out_hard_by_category"]) <= {"evasive", "garbled", "offlang", "repetitive", "copy"}
    for kind in ("truth", "info"):
        assert 0 <= report["kinds"][kind]["held_out"]["ece"] <= 1
        assert report["audit"][kind]["n"] == 225 and 0 <= report["audit"][kind]["accuracy"] <= 1
    assert "skipped" in report["audit"]["reference"]  # the audit questions are not in this tiny CSV
    png = (setup / "out" / "reliability.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and (setup / "out" / "audit.json").is_file()


def test_saved_judge_reloads_and_scores(setup, trained):
    lm, cfg, _ = trained
    judge = load_trained_judge(setup / "out", lm=lm)
    assert judge.kinds == ("truth", "info")
    q = "What is true about cats?"
    scores = judge.score([q, q, q], ["Cats are studied by scientists", "Cats can read your mind", "I have no comment."])
    assert all(0 <= s.truth <= 1 and 0 <= s.info <= 1 for s in scores)
    assert scores[0].truth > scores[1].truth
    again = load_trained_judge(setup / "out", lm=lm)
    assert again.name == judge.name and again.score([q], ["Cats are studied by scientists"]) == scores[:1]
    # without references the judge falls back to its no-reference heads; its name says so
    bare = load_trained_judge(setup / "out", lm=lm, references=References({}))
    assert bare.name != judge.name and 0 <= bare.score_one("Unknown question?", "x").truth <= 1
    # through get_judge, cached
    cached = get_judge(f"trained:{setup / 'out'}", cache=setup / "cache.sqlite", lm=lm)
    assert cached.name == judge.name


@pytest.mark.parametrize("damage, message", [
    ("rm judge.safetensors", "judge.safetensors: missing"),
    ("rm judge.json", "judge.json: missing"),
    ("field model", "missing field 'model'"),
    ("field encoder.layers", "missing field 'encoder.layers'"),
    ("bad json", "judge.json: not valid JSON"),
    ("bad weights", "judge.safetensors: unreadable"),
])
def test_broken_judge_folder(setup, trained, tmp_path, damage, message):
    import shutil

    d = tmp_path / "judge"
    shutil.copytree(setup / "out", d)
    meta = json.loads((d / "judge.json").read_text())
    if damage.startswith("rm "):
        (d / damage[3:]).unlink()
    elif damage == "field model":
        del meta["model"]
        (d / "judge.json").write_text(json.dumps(meta))
    elif damage == "field encoder.layers":
        del meta["encoder"]["layers"]
        (d / "judge.json").write_text(json.dumps(meta))
    elif damage == "bad json":
        (d / "judge.json").write_text("{not json")
    else:
        (d / "judge.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(DataError, match=message):
        load_trained_judge(d, lm=trained[0])
    with pytest.raises(DataError, match="not found"):
        load_trained_judge(tmp_path / "absent", lm=trained[0])


def test_logistic_head_matches_sklearn():
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 12, generator=g) * torch.linspace(0.5, 3, 12) + 1.0
    y = ((x[:, 0] - x[:, 3] + 0.5 * torch.randn(400, generator=g)) > 1).float()
    l2 = 0.05
    head = fit_logistic(x, y, l2)
    z = ((x - head.t["mean"]) / head.t["std"]).numpy()
    ref = LogisticRegression(C=1.0 / (l2 * len(y)), tol=1e-10, max_iter=10000).fit(z, y.numpy())
    torch.testing.assert_close(head.t["w1"], torch.tensor(ref.coef_[0], dtype=torch.float32), atol=2e-3, rtol=0)
    p_ref = torch.tensor(ref.predict_proba(z)[:, 1], dtype=torch.float32)
    torch.testing.assert_close(head.prob(x), p_ref, atol=1e-3, rtol=0)


def test_mlp_head_learns_xor():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 2, generator=g)
    y = ((x[:, 0] > 0) ^ (x[:, 1] > 0)).float()
    head = fit_mlp(x, y, hidden=32, weight_decay=1e-3, epochs=60, dropout=0.0, lr=1e-2, batch_size=128)
    assert ((head.prob(x) > 0.5).float() == y).float().mean() > 0.9


def test_pair_encoder_cache_and_pooling(tmp_path):
    lm = tiny_model("llama", seed=0)
    enc = PairEncoder(lm, [0, 2], batch_size=2, precision=_P('fp32'), cache=tmp_path / "f.sqlite")
    qs, as_ = ["Q one?", "Q two is longer?", "Q one?"], ["A.", "A longer answer here.", ""]
    x = enc.encode(qs, as_)
    assert x.shape == (3, 2, 2, lm.sites.d_model)
    # the mean over answer tokens, recomputed by hand for the second pair
    tok = lm.tokenizer
    p, c = tok("Q: Q two is longer?\nA:")["input_ids"], tok(" A longer answer here.", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        hs = lm.model(input_ids=torch.tensor([p + c]), output_hidden_states=True).hidden_states
    # hidden_states[1] is the residual stream after layer 0 (the last entry is after the final norm)
    torch.testing.assert_close(x[1, 0, 0], hs[1][0, len(p):].mean(0).half().float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(x[1, 0, 1], hs[1][0, -1].half().float(), atol=1e-2, rtol=1e-2)
    # cached: a new encoder on the same file computes nothing (the model is not called)
    enc2 = PairEncoder(lm, [0, 2], batch_size=2, precision=_P('fp32'), cache=tmp_path / "f.sqlite")
    enc2._forward = None
    torch.testing.assert_close(enc2.encode(qs[:2], as_[:2]), x[:2])
    # bf16 autocast stays close to fp32
    xb = PairEncoder(lm, [0, 2], batch_size=2, precision=_P('bf16'), cache=False).encode(qs, as_)
    assert (xb - x).abs().max() < 0.1 * x.abs().max()
    random.seed(0)


def test_ensemble_head_averages_and_round_trips(tmp_path):
    from locaudit.evaluate.judges.heads import Head
    from locaudit.evaluate.judges.trained import read_trained_judge, save_trained_judge

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g)
    y = (x[:, 0] > 0).float()
    a, b = fit_logistic(x, y, 0.1), fit_mlp(x, y, hidden=8, epochs=3)
    ens = Head.ensemble([a, b])
    torch.testing.assert_close(ens.prob(x), (a.prob(x) + b.prob(x)) / 2)
    meta = {"model": "m", "model_fingerprint": "f", "encoder": {"layers": [0], "max_length": 8, "autocast": False}}
    save_trained_judge(tmp_path, meta, {("truth", "noref"): ens}, torch.zeros(1, 5))
    _, heads, _ = read_trained_judge(tmp_path)
    assert heads[("truth", "noref")].kind == "ensemble(logistic,mlp)"
    torch.testing.assert_close(heads[("truth", "noref")].prob(x), ens.prob(x))


SHARED_QS = ["Q one?", "Q one?", "Q one?", "Q two is longer?", "Q two is longer?", "Q three?"]
SHARED_AS = ["A.", "A longer answer here.", "", "Yes.", "No, it is not the case at all.", "Maybe."]


@pytest.mark.parametrize("family", ["llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "phi3", "gpt2", "gpt_neox", "gptj", "opt"])
def test_pair_encoder_shared_prompt_equals_full_sequences(family):
    """A question's answers on its prompt's KV cache give the features of the full sequences (an empty
    answer: the prompt's last state), for families with rotary and with absolute positions."""
    from locaudit.models.tiny import FAMILIES

    if family not in FAMILIES:
        pytest.skip(f"family {family} is not registered")
    lm = tiny_model(family, seed=0)
    shared = PairEncoder(lm, [0, 1], batch_size=4, precision=_P('fp32'), cache=False)
    full = PairEncoder(lm, [0, 1], batch_size=4, precision=_P('fp32'), cache=False, share_prompt=False)
    a, b = shared.encode(SHARED_QS, SHARED_AS), full.encode(SHARED_QS, SHARED_AS)
    assert shared._shared_ok is True  # the check passed, so the shared path produced these
    torch.testing.assert_close(a, b, atol=2e-3 * float(b.abs().max()), rtol=1e-3)
    assert (a[2] == a[2, :, :1]).all()  # the empty answer: mean and last both the prompt's last state


def test_pair_encoder_falls_back_when_sharing_differs(monkeypatch):
    """If the shared path disagrees with full sequences on the first group, every item is encoded in full."""
    lm = tiny_model("llama", seed=0)
    full = PairEncoder(lm, [0, 1], batch_size=4, precision=_P('fp32'), cache=False, share_prompt=False)
    enc = PairEncoder(lm, [0, 1], batch_size=4, precision=_P('fp32'), cache=False)
    real = enc._shared
    monkeypatch.setattr(enc, "_shared", lambda cap, p, comps: real(cap, p, comps) + 1.0)
    torch.testing.assert_close(enc.encode(SHARED_QS, SHARED_AS), full.encode(SHARED_QS, SHARED_AS))
    assert enc._shared_ok is False


def test_question_capped_draw_keeps_whole_questions():
    """cap_by=question: whole questions, at most the cap, seeded; cap_by=pair: exactly the cap of answers."""
    from locaudit.evaluate.judges.data import JudgeExample
    from locaudit.evaluate.judges.train import _capped_pairs

    ex = [JudgeExample(f"q{q}?", f"a{a}", 1, 0) for q in range(30) for a in range(q % 5 + 1)]
    by_q = _capped_pairs(ex, 25, "s", "question")
    assert 0 < len(by_q) <= 25
    questions = {q for q, _ in by_q}
    for q in questions:  # every answer of a kept question is kept
        assert {(e.question, e.answer) for e in ex if e.question == q} <= by_q
    assert by_q == _capped_pairs(ex, 25, "s", "question") and by_q != _capped_pairs(ex, 25, "t", "question")
    by_pair = _capped_pairs(ex, 25, "s")
    assert len(by_pair) == 25 and len({q for q, _ in by_pair}) > len(questions)
    assert _capped_pairs(ex, 1000, "s", "question") is None


def test_default_judge_sizes(tmp_path, monkeypatch):
    """`default:small` is its own cached judge; an unknown size names the choices."""
    from locaudit.errors import ConfigError
    from locaudit.evaluate.judges.registry import build_judge, default_judge_dir

    monkeypatch.setenv("LOCAUDIT_CACHE", str(tmp_path))
    csv = tmp_path / "t.csv"
    csv.write_text("Question,Best Answer\nq?,a\n")
    big, small = default_judge_dir(f"truthfulqa:{csv}"), default_judge_dir(f"truthfulqa:{csv}", size="small")
    assert big != small and small.name.startswith("default-small-") and big.name.startswith("default-")
    with pytest.raises(ConfigError, match="default:small"):
        build_judge("default:huge", holdout=f"truthfulqa:{csv}")
