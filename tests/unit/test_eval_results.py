"""EvalResult: SE formulas against numpy/bootstrap, JSON round trip, CSV append."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from locaudit.evaluate.preferences import clustered_mean_se
from locaudit.evaluate.results import EvalResult, mean_se, product_of_means_se


def test_mean_se_matches_numpy():
    x = [0.1, 0.5, 0.9, 0.3]
    m, se = mean_se(x)
    assert m == pytest.approx(np.mean(x)) and se == pytest.approx(np.std(x, ddof=1) / 2)
    assert mean_se([]) == (None, None) and mean_se([0.4]) == (0.4, None)


def test_product_of_means_delta_method_close_to_bootstrap():
    rng = np.random.default_rng(0)
    t = rng.uniform(0, 1, 300)
    i = np.clip(0.5 * t + rng.uniform(0, 0.5, 300), 0, 1)
    p, se = product_of_means_se(list(t), list(i))
    assert p == pytest.approx(t.mean() * i.mean())
    idx = rng.integers(0, 300, (4000, 300))
    boot = t[idx].mean(1) * i[idx].mean(1)
    assert se == pytest.approx(boot.std(), rel=0.1)


def test_clustered_se_equals_plain_se_with_singleton_clusters_and_widens_with_duplicates():
    x = [0.0, 1.0, 1.0, 0.0, 1.0]
    m, se = clustered_mean_se(x, [str(k) for k in range(5)])
    # singleton clusters: the HC-style SE sqrt(n/(n-1) sum r^2)/n equals std(ddof=1)/sqrt(n)
    assert m == pytest.approx(0.6) and se == pytest.approx(np.std(x, ddof=1) / np.sqrt(5))
    _, se_dup = clustered_mean_se(x + x, [str(k) for k in range(5)] * 2)
    assert se_dup == pytest.approx(se)  # duplicating every cluster's pairs adds no information


def test_set_judged_and_partial_judges():
    r = EvalResult()
    r.set_judged([1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 1.0], "j")
    assert r.true == 0.75 and r.info == 0.75 and r.true_info == pytest.approx(0.5625)
    assert r.true_info_per_q == pytest.approx(0.5) and r.judge == "j" and r.true_info_se > 0
    r2 = EvalResult()
    r2.set_judged([0.2, 0.4], [None, None], "truth-only")
    assert r2.true_prob == pytest.approx(0.3) and r2.true == 0.0 and r2.info is None and r2.true_info is None
    assert r2.info_prob is None and r2.true_info_prob is None


def test_thresholded_true_info_as_iti():
    """ITI: True = share with P(true) >= 0.5, Info likewise, True*Info = product of the shares; the mean
    probabilities stay beside them (and differ whenever the judge is not sure)."""
    r = EvalResult()
    truth, info = [0.9, 0.6, 0.5, 0.1], [0.49, 0.8, 0.7, 0.95]
    r.set_judged(truth, info, "j")
    assert r.true == 0.75 and r.info == 0.75 and r.true_info == pytest.approx(0.5625)
    assert r.true_info_per_q == pytest.approx(0.5)  # answers 2 and 3 are both true and informative
    assert r.true_prob == pytest.approx(0.525) and r.info_prob == pytest.approx(0.735)
    assert r.true_info_prob == pytest.approx(0.525 * 0.735) and r.judge_threshold == 0.5
    r.set_judged(truth, info, "j", threshold=0.7)
    assert r.true == 0.25 and r.info == 0.75 and r.judge_threshold == 0.7


def test_json_roundtrip_and_csv_append(tmp_path):
    a = EvalResult(edit={"kind": "iti", "heads": "top2", "alpha": 5.0}, split="test", mc1=0.25, metrics=["mc"])
    b = EvalResult(edit={"kind": "none"}, kl=0.0, metrics=["kl"])
    a.save_json(tmp_path / "r.json")
    assert EvalResult.load_json(tmp_path / "r.json") == a
    a.append_csv(tmp_path / "r.csv")
    b.append_csv(tmp_path / "r.csv")
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert len(rows) == 2
    assert rows[0]["edit_kind"] == "iti" and rows[0]["edit_alpha"] == "5.0" and rows[0]["mc1"] == "0.25"
    assert rows[1]["edit_kind"] == "none" and rows[1]["edit_alpha"] == "" and rows[1]["kl"] == "0.0"
    assert not list(tmp_path.glob(".*.tmp"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json"):
        EvalResult.load_json(tmp_path / "bad.json")
