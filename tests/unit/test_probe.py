"""All-head probes: agreement with scikit-learn, ranking, files, and clear errors on bad input."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from locaudit.errors import DataError
from locaudit.heads import HeadSet
from locaudit.localize.activations import ActivationSet
from locaudit.localize.probe import ProbeResult, probe_activations, read_accuracy_csv, train_probes
from locaudit.models.precision import resolve_precision as _P  # resolved once, as entry points do

PLANTED = {(1, 2): 1.5, (3, 0): 0.8, (4, 3): 0.4}


def _synthetic(N=500, L=5, H=4, D=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, L, H, D, generator=g) * 2.0 + 0.5
    y = torch.randint(0, 2, (N,), generator=g)
    for (l, h), s in PLANTED.items():
        if l < L and h < H:
            X[:, l, h, :3] += s * (2 * y[:, None] - 1)
    return X, y


def _sklearn_val_acc(X, y, tr, va, C=1.0, standardize=False):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    N, L, H, D = X.shape
    acc = np.zeros((L, H))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for l in range(L):
            for h in range(H):
                a, b = X[tr, l, h].double().numpy(), X[va, l, h].double().numpy()
                if standardize:
                    sc = StandardScaler().fit(a)
                    a, b = sc.transform(a), sc.transform(b)
                m = LogisticRegression(C=C, max_iter=2000).fit(a, y[tr].numpy())
                acc[l, h] = m.score(b, y[va].numpy())
    return acc


@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize("l2", [1.0, 0.05])
def test_agrees_with_sklearn_on_planted_signal(standardize, l2):
    pytest.importorskip("sklearn")
    X, y = _synthetic()
    tr, va = torch.arange(350), torch.arange(350, 500)
    res = train_probes(X, y, tr, va, l2=l2, standardize=standardize)
    ref = _sklearn_val_acc(X, y, tr, va, C=1.0 / l2, standardize=standardize)
    assert np.abs(res.val_acc.numpy() - ref).mean() < 0.02
    assert set(res.ranking()[:3]) == set(PLANTED)  # planted heads come first
    assert res.val_acc[1, 2] > 0.9 and res.val_acc[0, 0] < 0.7
    assert res.weight.shape == (5, 4, 12) and res.bias.shape == (5, 4)


def test_weights_match_sklearn_coefficients():
    from sklearn.linear_model import LogisticRegression

    X, y = _synthetic(N=300, L=2, H=2, D=6)
    tr, va = torch.arange(200), torch.arange(200, 300)
    res = train_probes(X, y, tr, va, l2=2.0, dtype=torch.float64)
    for l in range(2):
        for h in range(2):
            m = LogisticRegression(C=0.5, tol=1e-10, max_iter=5000).fit(X[tr, l, h].double().numpy(), y[tr].numpy())
            assert np.abs(m.coef_[0] - res.weight[l, h].numpy()).max() < 1e-4
            assert abs(m.intercept_[0] - res.bias[l, h].item()) < 1e-4
    # train accuracy is what the weights give
    logits = torch.einsum("nlhd,lhd->nlh", X[tr], res.weight) + res.bias
    assert torch.allclose(((logits > 0).long() == y[tr, None, None]).float().mean(0), res.train_acc)


def test_agrees_with_sklearn_on_tiny_model_activations():
    from locaudit.localize.activations import collect_activations
    from locaudit.models.tiny import tiny_model

    lm = tiny_model("qwen2", with_bias=True)
    rng = np.random.default_rng(0)
    words = ["apple", "river", "stone", "cloud", "green", "quiet", "seven", "lamp"]
    texts, labels = [], []
    for i in range(240):
        label = int(rng.integers(2))
        body = " ".join(rng.choice(words, size=int(rng.integers(2, 6))))
        texts.append(f"{body} is {'true' if label else 'false'}{'.' * int(rng.integers(1, 3))}")
        labels.append(label)
    X = collect_activations(lm, texts, batch_size=32, progress=False, precision=_P('fp32'))
    y = torch.tensor(labels)
    tr, va = torch.arange(160), torch.arange(160, 240)
    res = train_probes(X, y, tr, va)
    ref = _sklearn_val_acc(X, y, tr, va)
    assert np.abs(res.val_acc.numpy() - ref).mean() < 0.02
    assert res.val_acc.max() > 0.8  # the label is readable from some head


def test_ranking_ties_and_top():
    L, H, D = 3, 2, 2
    val = torch.tensor([[0.5, 0.9], [0.9, 0.6], [0.7, 0.9]])
    res = ProbeResult(torch.zeros(L, H), val, torch.zeros(L, H, D), torch.zeros(L, H))
    assert res.ranking() == [(0, 1), (1, 0), (2, 1), (2, 0), (1, 1), (0, 0)]
    top = res.top(3)
    assert isinstance(top, HeadSet) and top.name == "top3" and set(top) == {(0, 1), (1, 0), (2, 1)}
    assert HeadSet.parse("top2", ranking=res.ranking()).heads == ((0, 1), (1, 0))


def test_save_load_files(tmp_path):
    X, y = _synthetic(N=200, L=3, H=4, D=5)
    res = train_probes(X, y, torch.arange(150), torch.arange(150, 200))
    res.save(tmp_path / "p")
    rows = read_accuracy_csv(tmp_path / "p" / "probe_accuracy.csv")
    assert len(rows) == 12 and rows[5] == {"layer": 1, "head": 1, "train_acc": pytest.approx(float(res.train_acc[1, 1]), abs=1e-6),
                                           "val_acc": pytest.approx(float(res.val_acc[1, 1]), abs=1e-6)}
    ranking = json.loads((tmp_path / "p" / "ranking.json").read_text())
    assert [(r["layer"], r["head"]) for r in ranking] == res.ranking()
    png = (tmp_path / "p" / "probe_heatmap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    back = ProbeResult.load(tmp_path / "p")
    assert torch.equal(back.weight, res.weight) and torch.equal(back.val_acc, res.val_acc)
    assert back.ranking() == res.ranking() and back.meta["l2"] == 1.0
    (tmp_path / "p" / "probes.safetensors").unlink()
    with pytest.raises(DataError, match="missing probes.safetensors"):
        ProbeResult.load(tmp_path / "p")


def test_malformed_inputs():
    X, y = _synthetic(N=40, L=2, H=2, D=3)
    tr, va = torch.arange(30), torch.arange(30, 40)
    with pytest.raises(DataError, match=r"labels have shape \[39\] but there are 40"):
        train_probes(X, y[:39], tr, va)
    with pytest.raises(DataError, match="the val split is empty"):
        train_probes(X, y, tr, [])
    with pytest.raises(DataError, match="the train split is empty"):
        train_probes(X, y, [], va)
    with pytest.raises(DataError, match=r"\[N, L, H, D\]"):
        train_probes(X[:, 0], y, tr, va)
    with pytest.raises(DataError, match=r"labels\[0\] = 2"):
        train_probes(X, torch.full((40,), 2), tr, va)
    with pytest.raises(DataError, match="single label"):
        train_probes(X, torch.zeros(40, dtype=torch.long), tr, va)
    with pytest.raises(DataError, match="outside 0..39"):
        train_probes(X, y, torch.arange(30, 41), va)
    with pytest.raises(DataError, match="l2=0"):
        train_probes(X, y, tr, va, l2=0)


def test_probe_activations_uses_question_splits(tmp_path):
    X, y = _synthetic(N=60, L=2, H=2, D=3)
    splits = ["train"] * 40 + ["val"] * 20
    examples = [{"qid": f"q{i // 4}", "text": "", "label": int(y[i]), "split": splits[i]} for i in range(60)]
    acts = ActivationSet(X, examples, {"model": "m"})
    res = probe_activations(acts)
    assert res.meta["n_train"] == 40 and res.meta["n_val"] == 20 and res.meta["model"] == "m"
    straddle = [dict(e) for e in examples]
    straddle[40]["qid"] = "q0"  # a question in both splits
    with pytest.raises(DataError, match="straddle"):
        probe_activations(ActivationSet(X, straddle))
    no_val = [dict(e, split="train") for e in examples]
    with pytest.raises(DataError, match="no examples have split 'val'"):
        probe_activations(ActivationSet(X, no_val))


def test_cli_probe_prints_best_heads(tmp_path):
    from typer.testing import CliRunner

    from locaudit.cli.main import app

    X, y = _synthetic(N=200)
    examples = [{"qid": f"q{i // 2}", "text": "", "label": int(y[i]), "split": "train" if i < 140 else "val"}
                for i in range(200)]
    ActivationSet(X, examples, {"model": "m"}).save(tmp_path / "acts")
    r = CliRunner().invoke(app, ["probe", "--activations", str(tmp_path / "acts"), "--out", str(tmp_path / "p"),
                                 "--top-k", "3"])
    assert r.exit_code == 0, r.output
    assert "L1H2" in r.output.splitlines()[2]  # the strongest planted head is printed first
    assert (tmp_path / "p" / "probe_heatmap.png").exists()
    r = CliRunner().invoke(app, ["probe", "--activations", str(tmp_path / "nope"), "--out", str(tmp_path / "p")])
    assert r.exit_code != 0 and "does not exist" in str(r.exception)
