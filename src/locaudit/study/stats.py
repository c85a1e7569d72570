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

The verdict (analysis.py, docs/verdict.md) uses the rank test as THE test, whatever the number of seeds;
the others are secondary columns. Also here: Holm / Benjamini-Hochberg adjustment with Tarone's rule for
discrete tests (adjust_family), equivalence tests (TOST: Welch, one-sample, bootstrap), paired bootstrap
weights over questions, and power: of the rank test (rank_power, detectable_shift, draws_for_power) and
of TOST (equivalence_power, se_for_equivalence).

Everything here is numpy plus scipy's distribution functions; tests check each test against scipy and
statsmodels.
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


# ---------------------------------------------------------------------------------------------- multiplicity
MULTIPLICITY = ("holm", "bh", "none")


def rank_floor(n: int) -> float:
    """The smallest p-value a rank test of one candidate against n random draws can give: 1 / (n + 1)."""
    return 1.0 / (n + 1) if n >= 0 else float("nan")


def draws_for_floor(alpha: float, m: int = 1) -> int:
    """The fewest draws n whose rank p-value floor 1/(n+1) is at most alpha / m (Bonferroni/Holm's
    first threshold in a family of m tests)."""
    if not 0 < alpha < 1 or m < 1:
        raise ValueError(f"need 0 < alpha < 1 and m >= 1, got alpha={alpha}, m={m}")
    n = max(0, math.ceil(m / alpha - 1 - 1e-9))
    while 1.0 / (n + 1) > alpha / m + 1e-15:
        n += 1
    return n


def tarone_family(floors: Sequence[float], alpha: float) -> np.ndarray:
    """Tarone (1990): which tests of a discrete family count for multiplicity. K is the smallest k with
    #{i: floor_i <= alpha / k} <= k; tests whose smallest reachable p-value exceeds alpha / K can never be
    rejected and are left out. The choice depends on the design only, so the family keeps its error rate."""
    f = np.asarray(floors, dtype=np.float64)
    f = np.where(np.isfinite(f), f, 0.0)  # unknown floor: always counted
    for k in range(1, f.size + 1):
        if (f <= alpha / k + 1e-15).sum() <= k:
            return f <= alpha / k + 1e-15
    return np.ones(f.size, dtype=bool)


def adjust_pvalues(p: Sequence[float], method: str = "holm") -> np.ndarray:
    """Holm (step-down, family-wise error) or Benjamini-Hochberg (false discovery rate) adjusted p-values,
    as statsmodels.stats.multitest.multipletests; NaN entries stay NaN and do not count."""
    if method not in MULTIPLICITY:
        raise ValueError(f"multiplicity method must be one of {MULTIPLICITY}, got {method!r}")
    p = np.asarray(p, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    q = p[ok]
    m = q.size
    if m == 0:
        return out
    if method == "none":
        out[ok] = q
        return out
    order = np.argsort(q, kind="stable")
    s = q[order]
    if method == "holm":
        adj = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * s))
    else:
        adj = np.minimum.accumulate((m / np.arange(1, m + 1) * s)[::-1])[::-1]
        adj = np.minimum(adj, 1.0)
    res = np.empty(m)
    res[order] = adj
    out[ok] = res
    return out


def adjust_family(p: Sequence[float], floors: Sequence[float] | None = None, method: str = "holm",
                  alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Adjusted p-values over a family and which tests are in it. With `floors` (the smallest p-value each
    test can reach), tests that can never be rejected are left out (tarone_family) and get NaN."""
    p = np.asarray(p, dtype=np.float64)
    member = np.isfinite(p)
    if floors is not None:
        member &= tarone_family(floors, alpha)
    adj = np.full(p.shape, np.nan)
    if member.any():
        adj[member] = adjust_pvalues(p[member], method)
    return adj, member


# ---------------------------------------------------------------------------------------------- equivalence
@dataclass(frozen=True)
class TostResult:
    """Two one-sided tests of low < effect < upp: p = max(p_low, p_upp)."""

    pvalue: float
    p_low: float
    p_upp: float
    t_low: float
    t_upp: float
    df: float | None
    method: str


def tost_welch(a: Sequence[float], b: Sequence[float], low: float, upp: float) -> TostResult:
    """TOST of mean(a) - mean(b) in (low, upp) with Welch's t (statsmodels ttost_ind(usevar='unequal'))."""
    a, b = _arr(a), _arr(b)
    if a.size < 2 or b.size < 2:
        return TostResult(*(float("nan"),) * 5, None, "tost-welch")
    t1 = welch_t(a + 0.0, b + low, "greater")
    t2 = welch_t(a + 0.0, b + upp, "less")
    return TostResult(max(t1.pvalue, t2.pvalue), t1.pvalue, t2.pvalue, t1.statistic, t2.statistic, t1.df, "tost-welch")


def tost_one(x: Sequence[float], low: float, upp: float) -> TostResult:
    """TOST of mean(x) in (low, upp), one-sample t (statsmodels DescrStatsW(x).ttost_mean(low, upp))."""
    x = _arr(x)
    n = x.size
    if n < 2 or x.std(ddof=1) == 0:
        return TostResult(*(float("nan"),) * 5, None, "tost-one-sample")
    se = x.std(ddof=1) / math.sqrt(n)
    t1, t2 = (x.mean() - low) / se, (x.mean() - upp) / se
    p1, p2 = float(sps.t.sf(t1, n - 1)), float(sps.t.cdf(t2, n - 1))
    return TostResult(max(p1, p2), p1, p2, float(t1), float(t2), float(n - 1), "tost-one-sample")


def boot_p_above(samples: np.ndarray, threshold: float) -> float:
    """Bootstrap p-value of H0: theta <= threshold (alternative theta > threshold):
    (1 + #{samples <= threshold}) / (B + 1); small when the bootstrap distribution lies above it."""
    s = np.asarray(samples, dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return float("nan")
    return float((1 + (s <= threshold).sum()) / (s.size + 1))


def boot_tost(samples: np.ndarray, low: float, upp: float, alpha: float = 0.05) -> dict:
    """Bootstrap TOST of low < theta < upp: p = max of the two one-sided bootstrap p-values, and the
    (1 - 2 alpha) percentile interval, which lies inside (low, upp) exactly when p < alpha (up to the +1)."""
    s = np.asarray(samples, dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return {"p": float("nan"), "p_low": float("nan"), "p_upp": float("nan"), "lo": float("nan"), "hi": float("nan")}
    p_low = boot_p_above(s, low)
    p_upp = boot_p_above(-s, -upp)
    lo, hi = np.quantile(s, [alpha, 1 - alpha])
    return {"p": max(p_low, p_upp), "p_low": p_low, "p_upp": p_upp, "lo": float(lo), "hi": float(hi)}


def bootstrap_weights(n: int, n_resamples: int, rng: np.random.Generator, subset: np.ndarray | None = None
                      ) -> np.ndarray:
    """[n_resamples + 1, n] question weights for a paired bootstrap (row 0: the data as observed); each row
    sums to 1. With `subset` (a boolean mask), only those questions are resampled and the others weigh 0."""
    mask = np.ones(n, dtype=bool) if subset is None else np.asarray(subset, dtype=bool)
    idx = np.flatnonzero(mask)
    w = np.zeros((n_resamples + 1, n))
    if idx.size == 0:
        return w
    w[0, idx] = 1.0 / idx.size
    if n_resamples:
        counts = rng.multinomial(idx.size, np.full(idx.size, 1.0 / idx.size), size=n_resamples)
        w[1:, idx] = counts / idx.size
    return w


# ---------------------------------------------------------------------------------------------- power
def rank_power(shift: float, n: int, alpha: float) -> float:
    """Power of the one-sided rank test (reject when (1 + #draws >= x) / (n + 1) <= alpha) for a candidate
    `shift` standard deviations above normally distributed random locations."""
    k = math.floor(alpha * (n + 1) + 1e-9) - 1  # largest count of draws at least as good that still rejects
    if k < 0 or n < 1:
        return 0.0
    q = float(sps.norm.sf(shift))
    return float(sps.binom.cdf(k, n, q))


def detectable_shift(n: int, alpha: float, power: float = 0.8) -> float:
    """The shift (in standard deviations of the random locations) the rank test detects with `power`;
    inf when the design cannot reject at all."""
    if rank_power(40.0, n, alpha) < power:
        return float("inf")
    lo, hi = -10.0, 40.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if rank_power(mid, n, alpha) >= power else (mid, hi)
    return hi


def draws_for_power(shift: float, alpha: float, power: float = 0.8, max_n: int = 100000) -> int | None:
    """The fewest draws with which the rank test detects `shift` (sd units) with `power`; None if > max_n."""
    if not math.isfinite(shift) or shift <= 0:
        return None
    n = draws_for_floor(alpha)
    while n <= max_n:
        if rank_power(shift, n, alpha) >= power:
            return n
        n = n + 1 if n < 200 else int(n * 1.05)
    return None


def equivalence_power(margin: float, se: float, alpha: float, true_diff: float = 0.0) -> float:
    """Normal-approximation power of TOST (margin +-`margin`, estimate with standard error `se`)."""
    if not (margin > 0 and se > 0):
        return float("nan") if not se > 0 else 0.0
    z = sps.norm.ppf(1 - alpha)
    p = sps.norm.cdf((margin - true_diff) / se - z) + sps.norm.cdf((margin + true_diff) / se - z) - 1
    return float(max(0.0, p))


def se_for_equivalence(margin: float, alpha: float, power: float = 0.8) -> float:
    """The standard error at which TOST shows equivalence of a true difference 0 with `power`."""
    return float(margin / (sps.norm.ppf(1 - alpha) + sps.norm.ppf((1 + power) / 2)))
