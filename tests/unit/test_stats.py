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


# ---------------------------------------------------------------------------------------------- multiplicity
@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("method, sm", [("holm", "holm"), ("bh", "fdr_bh")])
def test_adjusted_pvalues_match_statsmodels(seed: int, method: str, sm: str) -> None:
    from statsmodels.stats.multitest import multipletests

    rng = np.random.default_rng(seed)
    p = np.concatenate([rng.uniform(0, 0.06, 4), rng.uniform(0, 1, 6)])
    p[rng.integers(0, 10)] = p[rng.integers(0, 10)]  # a tie
    if seed >= 5:  # a p of 1, one of 0, several large ones (the cap at 1), a single test
        p = [np.array([1.0, 0.0, 0.9, 0.95, 0.5]), np.array([0.3]), rng.uniform(0.5, 1, 7)][seed - 5]
    ref = multipletests(p, alpha=0.05, method=sm)[1]
    assert S.adjust_pvalues(p, method) == pytest.approx(ref, rel=1e-12)
    with_nan = np.append(p, np.nan)
    out = S.adjust_pvalues(with_nan, method)
    assert math.isnan(out[-1]) and out[:-1] == pytest.approx(ref, rel=1e-12)
    assert S.adjust_pvalues(p, "none") == pytest.approx(p)
    with pytest.raises(ValueError, match="bonferroni"):
        S.adjust_pvalues(p, "bonferroni")


def test_rank_floor_and_draws_needed() -> None:
    assert S.rank_floor(16) == pytest.approx(1 / 17) and S.rank_floor(19) == pytest.approx(0.05)
    assert S.draws_for_floor(0.05) == 19 and S.draws_for_floor(0.05, 2) == 39 and S.draws_for_floor(0.03) == 33
    assert S.draws_for_floor(0.1) == 9
    for n in (8, 16, 19, 20):  # the floor is what the rank test gives a candidate better than every draw
        assert S.empirical_p(n + 1.0, np.arange(n), "greater") == pytest.approx(S.rank_floor(n))


def test_tarone_family_drops_tests_that_cannot_reject() -> None:
    # 8 draws (floor .11) can never reach .05: only the 19-draw test counts, at the full level
    assert S.tarone_family([1 / 9, 1 / 20], 0.05).tolist() == [False, True]
    # two tests with floor 1/20: Bonferroni over two needs .025, which neither can reach
    assert S.tarone_family([1 / 20, 1 / 20], 0.05).tolist() == [False, False]
    assert S.tarone_family([1 / 40, 1 / 40], 0.05).tolist() == [True, True]
    adj, member = S.adjust_family([0.05, 1 / 9], [1 / 20, 1 / 9], "holm", 0.05)
    assert member.tolist() == [True, False] and adj[0] == pytest.approx(0.05) and math.isnan(adj[1])


# ---------------------------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("seed", range(4))
def test_tost_matches_statsmodels(seed: int) -> None:
    from statsmodels.stats.weightstats import DescrStatsW, ttost_ind

    rng = np.random.default_rng(seed)
    a, b = rng.normal(0.02, 0.05, 6 + seed), rng.normal(0.0, 0.08, 20)
    for low, upp in ((-0.05, 0.05), (-0.01, 0.2), (-0.2, 0.0)):
        mine = S.tost_welch(a, b, low, upp)
        p, t1, t2 = ttost_ind(a, b, low, upp, usevar="unequal")
        assert mine.pvalue == pytest.approx(p, rel=1e-9)
        assert (mine.t_low, mine.p_low, mine.t_upp, mine.p_upp) == pytest.approx((t1[0], t1[1], t2[0], t2[1]), rel=1e-9)
        one = S.tost_one(b, low, upp)
        p1, u1, u2 = DescrStatsW(b).ttost_mean(low, upp)
        assert one.pvalue == pytest.approx(p1, rel=1e-9) and one.t_low == pytest.approx(u1[0], rel=1e-9)


def test_bootstrap_tost_is_the_interval_inclusion_rule() -> None:
    rng = np.random.default_rng(0)
    for centre, sd in ((0.0, 0.02), (0.05, 0.03), (0.09, 0.01), (0.0, 0.2)):
        s = rng.normal(centre, sd, 4000)
        t = S.boot_tost(s, -0.1, 0.1, 0.05)
        inside = -0.1 < t["lo"] and t["hi"] < 0.1
        assert (t["p"] < 0.05) == inside or abs(t["p"] - 0.05) < 2e-3
        assert t["lo"] == pytest.approx(np.quantile(s, 0.05)) and t["hi"] == pytest.approx(np.quantile(s, 0.95))
    assert S.boot_p_above(np.array([1.0, 2.0, 3.0]), 0.0) == pytest.approx(1 / 4)
    assert S.boot_p_above(np.array([1.0, 2.0, 3.0]), 2.5) == pytest.approx(3 / 4)


def test_bootstrap_weights_are_paired_resamples() -> None:
    rng = np.random.default_rng(1)
    w = S.bootstrap_weights(10, 500, rng)
    assert w.shape == (501, 10) and np.allclose(w.sum(1), 1) and np.allclose(w[0], 0.1)
    assert np.allclose(w * 10, np.round(w * 10))  # counts of a resample with replacement
    half = np.arange(10) < 4
    wh = S.bootstrap_weights(10, 50, rng, half)
    assert np.all(wh[:, ~half] == 0) and np.allclose(wh.sum(1), 1) and np.allclose(wh[0, half], 0.25)
    # a weighted mean over a resample is the mean of the resampled values (the paired bootstrap of a mean)
    x = rng.normal(size=10)
    assert np.std(w[1:] @ x) == pytest.approx(x.std(ddof=0) / math.sqrt(10), rel=0.15)


# ---------------------------------------------------------------------------------------------- issue 25
def test_mann_whitney_is_scipy_and_exact_with_ties_is_the_rank_test() -> None:
    tied = [1.0] * 19
    assert S.mann_whitney_u([1.0], tied).pvalue == pytest.approx(1.0)  # all ties: scipy gives 1, not nan
    draws = [1.0] * 10 + [0.5] * 9
    exact = S.mann_whitney_u([2.0], draws, "greater", "exact").pvalue
    assert exact == pytest.approx(S.empirical_p(2.0, draws)) == pytest.approx(0.05)
    assert S.mann_whitney_u([2.0], draws).pvalue < 0.05  # the normal approximation goes below the floor
    for x in (0.5, 1.0, 1.5):  # ties with the candidate: the exact permutation p is the rank test (scipy's
        # "exact" assumes no ties and gives less); the rank test is 1 - the strict percentile of x among all values
        for alt in ("greater", "less"):
            p = S.mann_whitney_u([x], draws, alt, "exact").pvalue
            assert p == pytest.approx(S.empirical_p(x, draws, alt))
            assert S.mann_whitney_u(draws, [x], {"greater": "less", "less": "greater"}[alt], "exact").pvalue == pytest.approx(p)
        strict = sps.percentileofscore(draws + [x], x, kind="strict") / 100
        assert S.mann_whitney_u([x], draws, "greater", "exact").pvalue == pytest.approx(1 - strict)
    no_ties = [0.1, 0.4, 0.7, 0.9]
    for x in (0.0, 0.5, 1.0):
        assert S.mann_whitney_u([x], no_ties, "greater", "exact").pvalue == pytest.approx(
            sps.mannwhitneyu([x], no_ties, alternative="greater", method="exact").pvalue)
    assert S.compare([2.0], draws).mwu_p == pytest.approx(0.05)


def test_permutation_with_one_value_is_the_rank_test() -> None:
    r = [0.1, 0.5, 0.3, 0.5, 0.2]
    for x in (0.5, 0.6, 0.0):
        assert S.permutation_test([x], r).pvalue == pytest.approx(S.empirical_p(x, r))
        assert S.permutation_test(r, [x], "less").pvalue == pytest.approx(S.empirical_p(x, r))
    assert math.isnan(S.mann_whitney_u([], r).pvalue) and math.isnan(S.permutation_test([1.0], []).pvalue)


@pytest.mark.parametrize("alt", ["greater", "less", "two-sided"])
def test_hierarchical_t_reduces_to_one_sample_and_welch(alt: str) -> None:
    rng = np.random.default_rng(5)
    r, a = rng.normal(0, 1, 14), rng.normal(0.6, 2, 9)
    c = 0.9  # locations only: the one-sample t of c - r_j
    h = S.hierarchical_t(c - r.mean(), r, alternative=alt)
    ref = sps.ttest_1samp(c - r, 0.0, alternative=alt)
    assert h["p"] == pytest.approx(ref.pvalue) and h["df"] == pytest.approx(13)
    lo, hi = ref.confidence_interval(0.95) if alt == "two-sided" else sps.ttest_1samp(c - r, 0.0).confidence_interval(0.95)
    assert (h["ci_low"], h["ci_high"]) == pytest.approx((lo, hi))
    # a question part var(a) / n_a with n_a - 1 df: Welch's test of a against the draws
    h = S.hierarchical_t(a.mean() - r.mean(), r, a.var(ddof=1) / a.size, a.size, alternative=alt)
    w = sps.ttest_ind(a, r, equal_var=False, alternative=alt)
    assert h["p"] == pytest.approx(w.pvalue) and h["df"] == pytest.approx(w.df)
    # training seeds add their own part; one seed adds nothing
    one = S.hierarchical_t(0.5, r, 0.01, 12, [0.3])
    two = S.hierarchical_t(0.5, r, 0.01, 12, [0.3, 0.5])
    assert math.isnan(one["se_seeds"]) and two["se"] > one["se"] and two["p"] > one["p"]
    assert math.isnan(S.hierarchical_t(0.5, [1.0])["p"]) and math.isnan(S.hierarchical_t(0.0, [1.0, 1.0])["p"])


def test_bh_family_keeps_what_bh_could_reject_and_gatekeeping_controls_the_rest() -> None:
    floors = [0.05, 0.05]
    assert not S.tarone_family(floors, 0.05).any()  # the FWER rule drops both ...
    assert S.bh_family(floors, 0.05).all()  # ... plain BH would reject both: BH keeps them
    adj, member = S.adjust_family([0.05, 0.05], floors, "bh", 0.05)
    assert member.all() and adj == pytest.approx([0.05, 0.05])
    assert not S.bh_family([0.1, 0.01], 0.05)[0]
    # gatekeeping: the primary's tests open the gate only when all reject
    gate, adj, member = S.gatekeeping([0.01, np.nan], [0.01, 0.02], [0.01, 0.01])
    assert gate and adj == pytest.approx([0.02, 0.02])
    gate, adj, _ = S.gatekeeping([0.01, 0.2], [0.001, 0.001], [0.001, 0.001])
    assert not gate and np.isnan(adj).all()


def test_t_tost_is_statsmodels_ttost_mean() -> None:
    from statsmodels.stats.weightstats import DescrStatsW

    rng = np.random.default_rng(9)
    for n in (5, 12, 40):
        x = rng.normal(0.02, 0.1, n)
        se = x.std(ddof=1) / math.sqrt(n)
        t = S.t_tost(float(x.mean()), se, n - 1, -0.1, 0.1)
        ref = DescrStatsW(x).ttost_mean(-0.1, 0.1)
        assert t["p"] == pytest.approx(ref[0]) and t["p_low"] == pytest.approx(ref[1][1])
        lo, hi = DescrStatsW(x).tconfint_mean(alpha=0.1)
        assert (t["lo"], t["hi"]) == pytest.approx((lo, hi))
        assert (t["p"] < 0.05) == (-0.1 < t["lo"] and t["hi"] < 0.1)
    assert math.isnan(S.t_tost(0.0, 0.0, 5, -1, 1)["p"])
