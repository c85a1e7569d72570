"""`locaudit.compare`: the candidate location's edit against random locations, decided as a study decides."""

from __future__ import annotations

import numpy as np
import pytest

from locaudit.errors import ConfigError


def test_null_is_not_evidence_for_and_a_strong_signal_is():
    from locaudit import compare

    rng = np.random.default_rng(0)
    draws = list(rng.normal(0.5, 0.05, 39))
    null = compare(float(np.median(draws)), random=draws, full=0.8, unedited=0.3, k=8, n_resamples=499)
    assert null.outcome != "evidence for" and not null.headline.startswith("Edit-based evidence for localization: yes")
    strong = compare(0.9, random=draws, full=0.95, unedited=0.3, k=8, n_resamples=499)
    assert strong.outcome == "evidence for" and "top-8" in strong.headline
    row = strong.table[0]
    assert row["p_rank"] == pytest.approx(1 / 40) and row["n_random"] == 39 and row["metric"] == "score"


def test_per_question_scores_carry_question_noise_and_a_null_draws_no_claim():
    from locaudit import compare

    rng = np.random.default_rng(1)
    Q = 60
    base = rng.uniform(0, 1, Q)
    draws = [base + rng.normal(0.05, 0.05, Q) for _ in range(39)]
    full = base + 0.45
    strong = compare(base + 0.4, random=draws, full=full, unedited=base, k=8, n_resamples=499)
    assert strong.outcome == "evidence for" and strong.table[0]["question_noise"].startswith("paired")
    null = compare(draws[0], random=draws[1:], full=full, unedited=base, k=8, n_resamples=499)
    assert null.outcome in ("evidence against", "inconclusive")


def test_lower_is_better_metrics_and_eval_results():
    from locaudit import compare
    from locaudit.evaluate.results import EvalResult

    v = compare(0.05, random=[0.3, 0.2, 0.25, 0.4, 0.35], metric="kl", n_resamples=199)
    assert v.table[0]["diff"] < 0 and v.table[0]["percentile"] == pytest.approx(100)
    res = [EvalResult(mc2=x, mc2_se=0.01) for x in (0.4, 0.41, 0.42)]
    v = compare(EvalResult(mc2=0.6, mc2_se=0.01), random=res, metric="mc2", n_resamples=199)
    assert v.table[0]["candidate_mean"] == pytest.approx(0.6) and v.table[0]["question_noise"].startswith("per-trial")


def test_compare_names_what_is_wrong():
    from locaudit import compare
    from locaudit.evaluate.results import EvalResult

    with pytest.raises(ConfigError, match="at least 2 random draws"):
        compare(0.5, random=[0.4])
    with pytest.raises(ConfigError, match=r"random\[1\].*finite"):
        compare(0.5, random=[0.4, float("nan"), 0.3])
    with pytest.raises(ConfigError, match="same questions"):
        compare([0.5, 0.6], random=[[0.4, 0.3], [0.4, 0.3, 0.1]])
    with pytest.raises(ConfigError, match="plain numbers for"):
        compare([0.5, 0.6], random=[[0.4, 0.3], 0.2])
    with pytest.raises(ConfigError, match="EvalResult without a finite 'true'"):
        compare(EvalResult(mc2=0.5), random=[0.4, 0.3], metric="true")
    with pytest.raises(ConfigError, match="metric='seed'"):
        compare(0.5, random=[0.4, 0.3], metric="seed")
