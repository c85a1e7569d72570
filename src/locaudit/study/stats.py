"""Statistics for "is the candidate localization better than random localizations?".

The candidate (the probe's top-K heads) is usually ONE value per metric, the control a distribution of
values over random K-head draws. What is proper then:
  - its percentile among the draws and the empirical p-value (1 + #draws at least as good) / (n + 1),
    whose floor 1/(n+1) says how many draws a claim needs;
  - the Crawford-Howell t-test, the t-test for one case against a small control sample
    (t = (x - mean) / (sd * sqrt(1 + 1/n)), n - 1 degrees of freedom): Welch's test with one case;
  - the Mann-Whitney U test (with one case it equals the empirical rank test), a permutation test of
    the difference of means (with one case, again the rank test), the z-score (x - mean) / sd, and a
    bootstrap confidence interval of the difference (candidate fixed, draws resampled).
With several candidate values (training seeds), the two groups are compared with Welch's t-test,
Mann-Whitney U, a permutation test and a two-sample bootstrap.

Everything here is numpy plus scipy's distribution functions; tests check each test against scipy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from itertools import combinations
from typing import Sequence

import numpy as np
from scipy import special
from scipy import stats as sps

ALTERNATIVES = ("greater", "less", "two-sided")


@dataclass(frozen=True)
class TestResult:
    statistic: float
    pvalue: float
    df: float | None = None
    method: str = ""


def _arr(x: Sequence[float]) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    return a[np.isfinite(a)]


def _check_alt(alternative: str) -> None:
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")


def _t_pvalue(t: float, df: float, alternative: str) -> float:
    if alternative == "greater":
        return float(sps.t.sf(t, df))
    if alternative == "less":
        return float(sps.t.cdf(t, df))
    return float(min(1.0, 2 * sps.t.sf(abs(t), df)))


# ---------------------------------------------------------------------------------------------- one vs many
def percentile_rank(x: float, ref: Sequence[float]) -> float:
    """Percent of `ref` below x, ties counting half (scipy.stats.percentileofscore kind='mean')."""
    r = _arr(ref)
    if r.size == 0:
        return float("nan")
    return float(100.0 * ((r < x).sum() + 0.5 * (r == x).sum()) / r.size)


def empirical_p(x: float, ref: Sequence[float], alternative: str = "greater") -> float:
    """(1 + #ref at least as extreme as x) / (n + 1): exact under exchangeability, never 0."""
    _check_alt(alternative)
    r = _arr(ref)
    if r.size == 0:
        return float("nan")
    ge = (1 + (r >= x).sum()) / (r.size + 1)
    le = (1 + (r <= x).sum()) / (r.size + 1)
    if alternative == "greater":
        return float(ge)
    if alternative == "less":
        return float(le)
    return float(min(1.0, 2 * min(ge, le)))


def zscore(x: float, ref: Sequence[float]) -> float:
    """(x - mean(ref)) / sd(ref, ddof=1); nan with fewer than 2 reference values or sd 0."""
    r = _arr(ref)
    if r.size < 2:
        return float("nan")
    sd = r.std(ddof=1)
    return float((x - r.mean()) / sd) if sd > 0 else float("nan")


def crawford_howell(x: float, ref: Sequence[float], alternative: str = "greater") -> TestResult:
    """Crawford & Howell (1998): one case vs a control sample; t with n - 1 df."""
    _check_alt(alternative)
    r = _arr(ref)
    n = r.size
    if n < 2 or r.std(ddof=1) == 0:
        return TestResult(float("nan"), float("nan"), None, "crawford-howell")
    t = (x - r.mean()) / (r.std(ddof=1) * math.sqrt((n + 1) / n))
    return TestResult(float(t), _t_pvalue(t, n - 1, alternative), float(n - 1), "crawford-howell")


# ---------------------------------------------------------------------------------------------- two groups
def welch_t(a: Sequence[float], b: Sequence[float], alternative: str = "greater") -> TestResult:
    """Welch's unequal-variance t-test of mean(a) - mean(b) (= scipy.stats.ttest_ind(equal_var=False))."""
    _check_alt(alternative)
    a, b = _arr(a), _arr(b)
    if a.size < 2 or b.size < 2:
        return TestResult(float("nan"), float("nan"), None, "welch")
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se2 = va + vb
    if se2 == 0:
        return TestResult(float("nan"), float("nan"), None, "welch")
    t = (a.mean() - b.mean()) / math.sqrt(se2)
    df = se2**2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    return TestResult(float(t), _t_pvalue(t, df, alternative), float(df), "welch")


def _mwu_counts(n1: int, n2: int) -> np.ndarray:
    """Number of orderings of n1 + n2 values for each U = 0..n1*n2 (no ties): c(u; m, n) =
    c(u - n; m - 1, n) + c(u; m, n - 1)."""
    # table[m] holds counts for (m, n) as n grows; start with n = 0: only U = 0.
    prev_n = [np.zeros(1) + 1.0 for _ in range(n1 + 1)]  # (m, 0) for m = 0..n1
    for n in range(1, n2 + 1):
        cur = [np.ones(1)]  # (0, n)
        for m in range(1, n1 + 1):
            c = np.zeros(m * n + 1)
            left = cur[m - 1]  # (m - 1, n), shifted by n
            c[n:n + left.size] += left
            up = prev_n[m]  # (m, n - 1)
            c[:up.size] += up
            cur.append(c)
        prev_n = cur
    return prev_n[n1]


def mann_whitney_u(a: Sequence[float], b: Sequence[float], alternative: str = "greater",
                   method: str = "auto", continuity: bool = True) -> TestResult:
    """Mann-Whitney U of a vs b (statistic: U of a), as scipy.stats.mannwhitneyu: exact null
    distribution when both groups are <= 8 or either is small and there are no ties ('auto' follows
    scipy: exact unless both > 8 or ties), else the normal approximation with tie and continuity
    corrections."""
    _check_alt(alternative)
    a, b = _arr(a), _arr(b)
    n1, n2 = a.size, b.size
    if n1 == 0 or n2 == 0:
        return TestResult(float("nan"), float("nan"), None, "mann-whitney")
    xy = np.concatenate([a, b])
    ranks = sps.rankdata(xy)
    _, t = np.unique(xy, return_counts=True)
    u1 = float(ranks[:n1].sum() - n1 * (n1 + 1) / 2)
    u2 = n1 * n2 - u1
    if alternative == "greater":
        u, f = u1, 1
    elif alternative == "less":
        u, f = u2, 1
    else:
        u, f = max(u1, u2), 2
    ties = bool((t > 1).any())
    if method == "auto":
        method = "asymptotic" if (n1 > 8 and n2 > 8) or ties else "exact"
    if method == "exact":
        counts = _mwu_counts(min(n1, n2), max(n1, n2))
        k = int(math.ceil(u - 1e-9))
        p = float(counts[k:].sum() / counts.sum()) if k < counts.size else 0.0
    elif method == "asymptotic":
        n = n1 + n2
        tie_term = float((t.astype(np.float64) ** 3 - t).sum())
        s = math.sqrt(n1 * n2 / 12 * ((n + 1) - tie_term / (n * (n - 1)))) if n > 1 else 0.0
        num = u - n1 * n2 / 2 - (0.5 if continuity else 0.0)
        p = float(special.ndtr(-num / s)) if s > 0 else float("nan")
    else:
        raise ValueError(f"method must be auto, exact or asymptotic, got {method!r}")
    return TestResult(u1, float(np.clip(p * f, 0, 1)), None, f"mann-whitney ({method})")


def permutation_test(a: Sequence[float], b: Sequence[float], alternative: str = "greater",
                     n_resamples: int = 9999, seed: int = 0) -> TestResult:
    """Permutation test of mean(a) - mean(b): exact (every split of the pooled values) when there are
    at most n_resamples splits, else n_resamples random ones with the +1 correction (as scipy)."""
    _check_alt(alternative)
    a, b = _arr(a), _arr(b)
    if a.size == 0 or b.size == 0:
        return TestResult(float("nan"), float("nan"), None, "permutation")
    pooled = np.concatenate([a, b])
    n, na = pooled.size, a.size
    obs = a.mean() - b.mean()
    total = pooled.sum()
    n_splits = math.comb(n, na)
    if n_splits <= n_resamples:
        idx = np.array(list(combinations(range(n), na)), dtype=np.int64)
        exact, adj = True, 0
    else:
        rng = np.random.default_rng(seed)
        idx = np.argsort(rng.random((n_resamples, n)), axis=1)[:, :na]
        exact, adj = False, 1
    sa = pooled[idx].sum(axis=1)
    null = sa / na - (total - sa) / (n - na)
    gamma = abs(np.finfo(np.float64).eps * 100 * obs)
    p_ge = ((null >= obs - gamma).sum() + adj) / (null.size + adj)
    p_le = ((null <= obs + gamma).sum() + adj) / (null.size + adj)
    p = {"greater": p_ge, "less": p_le, "two-sided": min(1.0, 2 * min(p_ge, p_le))}[alternative]
    return TestResult(float(obs), float(np.clip(p, 0, 1)), None, "permutation (exact)" if exact else "permutation")


def bootstrap_diff_ci(a: Sequence[float], b: Sequence[float], level: float = 0.95, n_resamples: int = 9999,
                      seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of mean(a) - mean(b), each group resampled on its own (a group of one value
    stays fixed: the candidate is given, the random draws are the sample)."""
    a, b = _arr(a), _arr(b)
    if a.size == 0 or b.size < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    ma = a[rng.integers(0, a.size, (n_resamples, a.size))].mean(axis=1) if a.size > 1 else np.full(n_resamples, a[0])
    mb = b[rng.integers(0, b.size, (n_resamples, b.size))].mean(axis=1)
    d = ma - mb
    lo, hi = np.quantile(d, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


# ---------------------------------------------------------------------------------------------- the comparison
@dataclass
class Comparison:
    """Candidate vs random draws on one metric; `alternative` is the direction "candidate is better"."""

    n_candidate: int
    n_random: int
    candidate_mean: float
    random_mean: float
    random_sd: float
    diff: float
    percentile: float
    empirical_p: float
    z: float
    t_test: str
    t: float
    t_df: float | None
    t_p: float
    mwu_u: float
    mwu_p: float
    perm_p: float
    ci_low: float
    ci_high: float
    alternative: str

    @property
    def p(self) -> float:
        """The headline p-value: the t-test (Crawford-Howell for one candidate value, Welch otherwise)."""
        return self.t_p

    def to_dict(self) -> dict:
        return asdict(self)


def compare(candidate: Sequence[float], random: Sequence[float], higher_is_better: bool = True,
            level: float = 0.95, n_resamples: int = 9999, seed: int = 0) -> Comparison:
    """Every statistic of the candidate value(s) against the random draws, one-sided toward "better"."""
    c, r = _arr(candidate), _arr(random)
    alt = "greater" if higher_is_better else "less"
    nan = float("nan")
    cm = float(c.mean()) if c.size else nan
    rm = float(r.mean()) if r.size else nan
    rsd = float(r.std(ddof=1)) if r.size > 1 else nan
    if c.size == 1:
        tt = crawford_howell(c[0], r, alt)
        pct = percentile_rank(c[0], r)
        ep = empirical_p(c[0], r, alt)
    else:
        tt = welch_t(c, r, alt)
        pct = percentile_rank(cm, r)
        ep = empirical_p(cm, r, alt) if c.size else nan
    if not higher_is_better and np.isfinite(pct):
        pct = 100.0 - pct  # percentile of "goodness": 100 = better than every draw
    mw = mann_whitney_u(c, r, alt) if c.size and r.size else TestResult(nan, nan)
    pm = permutation_test(c, r, alt, n_resamples, seed) if c.size and r.size else TestResult(nan, nan)
    lo, hi = bootstrap_diff_ci(c, r, level, n_resamples, seed)
    z = (cm - rm) / rsd if r.size > 1 and rsd > 0 else nan
    return Comparison(int(c.size), int(r.size), cm, rm, rsd, cm - rm, pct, ep, float(z), tt.method, tt.statistic,
                      tt.df, tt.pvalue, mw.statistic, mw.pvalue, pm.pvalue, lo, hi, alt)
