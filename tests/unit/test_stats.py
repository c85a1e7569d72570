"""locaudit.study.stats against scipy on synthetic data."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from locaudit.study import stats as S

ALTS = S.ALTERNATIVES


def _samples(seed: int, n1: int, n2: int, ties: bool):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(0.4, 1.0, n1), rng.normal(0.0, 1.3, n2)
    if ties:
        a, b = np.round(a, 1), np.round(b, 1)
    return a, b


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("alt", ALTS)
def test_welch_matches_scipy(seed: int, alt: str) -> None:
    a, b = _samples(seed, 3 + seed, 16, False)
    mine = S.welch_t(a, b, alt)
    ref = sps.ttest_ind(a, b, equal_var=False, alternative=alt)
    assert mine.statistic == pytest.approx(ref.statistic, rel=1e-10)
    assert mine.pvalue == pytest.approx(ref.pvalue, rel=1e-9)
    assert mine.df == pytest.approx(ref.df, rel=1e-10)


@pytest.mark.parametrize("n1, n2, ties", [(1, 16, False), (3, 8, False), (5, 16, False), (12, 15, False),
                                          (4, 10, True), (16, 16, True), (1, 24, True)])
@pytest.mark.parametrize("alt", ALTS)
def test_mann_whitney_matches_scipy(n1: int, n2: int, ties: bool, alt: str) -> None:
    for seed in range(4):
        a, b = _samples(100 + seed, n1, n2, ties)
        ref = sps.mannwhitneyu(a, b, alternative=alt)
        mine = S.mann_whitney_u(a, b, alt)
        assert mine.statistic == pytest.approx(ref.statistic)
        assert mine.pvalue == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-14)
        for method in ("asymptotic",) + (() if ties else ("exact",)):
            ref = sps.mannwhitneyu(a, b, alternative=alt, method=method)
            assert S.mann_whitney_u(a, b, alt, method=method).pvalue == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-14)


@pytest.mark.parametrize("n1, n2", [(2, 6), (3, 7), (4, 5)])
@pytest.mark.parametrize("alt", ALTS)
def test_exact_permutation_matches_scipy(n1: int, n2: int, alt: str) -> None:
    a, b = _samples(n1 * 10 + n2, n1, n2, False)
    ref = sps.permutation_test((a, b), lambda x, y, axis: x.mean(axis) - y.mean(axis), permutation_type="independent",
                               alternative=alt, n_resamples=np.inf, vectorized=True)
    mine = S.permutation_test(a, b, alt)
    assert mine.statistic == pytest.approx(a.mean() - b.mean())
    assert mine.pvalue == pytest.approx(ref.pvalue, rel=1e-12)
    assert "exact" in mine.method


def test_random_permutation_close_to_exact() -> None:
    a, b = _samples(3, 6, 12, False)  # C(18, 6) = 18564 splits > n_resamples: Monte Carlo
    exact = sps.permutation_test((a, b), lambda x, y, axis: x.mean(axis) - y.mean(axis), permutation_type="independent",
                                 alternative="greater", n_resamples=np.inf, vectorized=True).pvalue
    mc = S.permutation_test(a, b, "greater", n_resamples=10000, seed=1)
    assert "exact" not in mc.method
    assert mc.pvalue == pytest.approx(exact, abs=4 * math.sqrt(exact * (1 - exact) / 10000) + 1e-4)


def test_one_candidate_tests_reduce_to_rank_test() -> None:
    rng = np.random.default_rng(0)
    draws = rng.normal(size=16)
    for x in (-3.0, 0.1, 0.5, 3.0):
        ep = S.empirical_p(x, draws, "greater")
        assert ep == pytest.approx((1 + (draws >= x).sum()) / 17)
        assert S.mann_whitney_u([x], draws, "greater").pvalue == pytest.approx(ep)
        assert S.permutation_test([x], draws, "greater").pvalue == pytest.approx(ep)
        assert S.percentile_rank(x, draws) == pytest.approx(sps.percentileofscore(draws, x, kind="mean"))


def test_crawford_howell_is_the_prediction_interval_t() -> None:
    rng = np.random.default_rng(4)
    ref = rng.normal(2.0, 0.5, 16)
    x = 3.1
    n, m, s = ref.size, ref.mean(), ref.std(ddof=1)
    t = (x - m) / (s * math.sqrt(1 + 1 / n))
    res = S.crawford_howell(x, ref, "greater")
    assert res.statistic == pytest.approx(t) and res.df == n - 1
    assert res.pvalue == pytest.approx(sps.t.sf(t, n - 1))
    # by simulation: under the null, a new draw's p-value is uniform (P(p < .05) ~ .05)
    r = rng.normal(size=(4000, 17))
    tt = (r[:, 0] - r[:, 1:].mean(1)) / (r[:, 1:].std(1, ddof=1) * math.sqrt(1 + 1 / 16))
    assert S.crawford_howell(r[0, 0], r[0, 1:]).statistic == pytest.approx(tt[0])
    assert (sps.t.sf(tt, 15) < 0.05).mean() == pytest.approx(0.05, abs=0.015)
    assert S.zscore(x, ref) == pytest.approx((x - m) / s)


def test_bootstrap_ci_matches_scipy() -> None:
    a, b = _samples(9, 6, 15, False)
    lo, hi = S.bootstrap_diff_ci(a, b, 0.95, 9999, seed=0)
    ref = sps.bootstrap((a, b), lambda x, y, axis: x.mean(axis) - y.mean(axis), method="percentile",
                        n_resamples=9999, rng=np.random.default_rng(0)).confidence_interval
    se = np.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size)
    assert lo == pytest.approx(ref.low, abs=0.05 * se) and hi == pytest.approx(ref.high, abs=0.05 * se)
    # one candidate value stays fixed: the CI is x minus the bootstrap CI of the draws' mean
    lo1, hi1 = S.bootstrap_diff_ci([1.0], b, 0.95, 9999, seed=0)
    m = sps.bootstrap((b,), np.mean, method="percentile", n_resamples=9999, rng=np.random.default_rng(0)).confidence_interval
    assert lo1 == pytest.approx(1.0 - m.high, abs=0.05 * b.std()) and hi1 == pytest.approx(1.0 - m.low, abs=0.05 * b.std())


def test_compare_direction_and_degenerate_inputs() -> None:
    rng = np.random.default_rng(2)
    draws = rng.normal(1.0, 0.1, 16)
    good = S.compare([2.0], draws, higher_is_better=True)
    assert good.percentile == 100 and good.t_p < 1e-6 and good.z > 5 and good.ci_low > 0
    assert good.t_test == "crawford-howell"
    # lower is better (KL): a large value is bad, its "goodness" percentile is 0
    bad = S.compare([2.0], draws, higher_is_better=False)
    assert bad.percentile == 0 and bad.t_p > 0.99
    cand = rng.normal(1.5, 0.1, 3)
    grp = S.compare(cand, draws)
    assert grp.t_test == "welch" and grp.n_candidate == 3
    assert grp.t_p == pytest.approx(sps.ttest_ind(cand, draws, equal_var=False, alternative="greater").pvalue)
    assert grp.mwu_p == pytest.approx(sps.mannwhitneyu(cand, draws, alternative="greater").pvalue)
    empty = S.compare([], draws)
    assert math.isnan(empty.candidate_mean) and math.isnan(empty.t_p)
    one = S.compare([1.0], [0.5])
    assert math.isnan(one.t_p) and math.isnan(one.z)
