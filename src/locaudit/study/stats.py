"""Statistics for "is the candidate localization better than random localizations?".

The candidate (the probe's top-K heads) is usually ONE value per metric, the control a distribution of
values over random K-head draws. What is proper then:
  - its percentile among the draws and the empirical p-value (1 + #draws at least as good) / (n + 1),
    whose floor 1/(n+1) says how many draws a claim needs (exact with ties: a tie counts as at least as
    good);
  - a hierarchical t-test of E[candidate - mean of random locations] > 0 (hierarchical_t): the variance
    of the difference has a location part (the draws' spread / n), a question part (the paired question
    bootstrap) and, with several training seeds, a training part; Satterthwaite degrees of freedom
    calibrate it at small samples. "Evidence for" needs both this test and the rank test (an
    intersection-union test: p = max of the two, no correction for the pair);
  - the Crawford-Howell t-test, the t-test for one case against a small control sample
    (t = (x - mean) / (sd * sqrt(1 + 1/n)), n - 1 degrees of freedom);
  - descriptive two-group tests (Mann-Whitney U, permutation, bootstrap CI) for pooled views.

Where a library computes the same thing, it does: scipy (Welch, Mann-Whitney with its exact null, the
permutation test, the bootstrap, percentiles) and statsmodels (Holm / Benjamini-Hochberg, the t TOSTs).
Hand-written here, each tested against a library on ties and edge cases: the rank test with its floor,
Crawford-Howell, the hierarchical t-test (= Welch / one-sample t in its special cases), Tarone's and
Gilbert's restrictions of discrete families, the bootstrap TOST, paired bootstrap weights, and power
(rank_power integrates over the candidate's own noise; combined_power simulates the whole rule).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
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
    return float(sps.percentileofscore(r, x, kind="mean"))


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
    """Welch's unequal-variance t-test of mean(a) - mean(b) (scipy.stats.ttest_ind(equal_var=False))."""
    _check_alt(alternative)
    a, b = _arr(a), _arr(b)
    if a.size < 2 or b.size < 2 or a.var(ddof=1) / a.size + b.var(ddof=1) / b.size == 0:
        return TestResult(float("nan"), float("nan"), None, "welch")
    with warnings.catch_warnings():  # nearly constant groups: scipy warns of precision loss, the numbers stand
        warnings.simplefilter("ignore", RuntimeWarning)
        r = sps.ttest_ind(a, b, equal_var=False, alternative=alternative)
    return TestResult(float(r.statistic), float(r.pvalue), float(r.df), "welch")


def mann_whitney_u(a: Sequence[float], b: Sequence[float], alternative: str = "greater",
                   method: str = "auto") -> TestResult:
    """Mann-Whitney U of a vs b (statistic: U of a): scipy.stats.mannwhitneyu. scipy's "exact" null assumes
    no ties; with one value on a side and ties, the exact permutation p-value (ties counted as at least as
    extreme) is the rank test, computed here instead (equal to scipy's where there are no ties)."""
    _check_alt(alternative)
    a, b = _arr(a), _arr(b)
    if a.size == 0 or b.size == 0:
        return TestResult(float("nan"), float("nan"), None, "mann-whitney")
    xy = np.concatenate([a, b])
    if method == "exact" and min(a.size, b.size) == 1 and np.unique(xy).size < xy.size:
        u = float(sps.rankdata(xy)[:a.size].sum() - a.size * (a.size + 1) / 2)
        x, ref, alt = (a[0], b, alternative) if a.size == 1 else (b[0], a, {"greater": "less", "less": "greater"}.get(
            alternative, alternative))
        return TestResult(u, empirical_p(x, ref, alt), None, "mann-whitney (exact, ties)")
    r = sps.mannwhitneyu(a, b, alternative=alternative, method=method)
    return TestResult(float(r.statistic), float(r.pvalue), None, f"mann-whitney ({method})")


def _rng(seed: int) -> dict:
    """scipy's keyword for a random generator: `rng` from scipy 1.15, `random_state` before."""
    from scipy import __version__

    major, minor = (int(x) for x in __version__.split(".")[:2])
    return {"rng" if (major, minor) >= (1, 15) else "random_state": np.random.default_rng(seed)}


def _mean_diff(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis) - np.mean(y, axis=axis)


def permutation_test(a: Sequence[float], b: Sequence[float], alternative: str = "greater",
                     n_resamples: int = 9999, seed: int = 0) -> TestResult:
    """Permutation test of mean(a) - mean(b) (scipy.stats.permutation_test, independent samples): exact
    when there are at most n_resamples splits, else n_resamples random ones with the +1 correction."""
    _check_alt(alternative)
    a, b = _arr(a), _arr(b)
    if a.size == 0 or b.size == 0:
        return TestResult(float("nan"), float("nan"), None, "permutation")
    if min(a.size, b.size) == 1:  # scipy needs two values per group; one value: every split is exact and cheap
        pooled = np.concatenate([a, b])
        one_a = a.size == 1
        idx = np.eye(pooled.size, dtype=bool)  # split i: value i alone in the one-value group
        sa = np.where(idx, pooled, 0.0).sum(1) if one_a else pooled.sum() - np.where(idx, pooled, 0.0).sum(1)
        na = a.size
        null = sa / na - (pooled.sum() - sa) / (pooled.size - na)
        obs = a.mean() - b.mean()
        gamma = abs(np.finfo(np.float64).eps * 100 * obs)
        ge, le = (null >= obs - gamma).mean(), (null <= obs + gamma).mean()
        p = {"greater": ge, "less": le, "two-sided": min(1.0, 2 * min(ge, le))}[alternative]
        return TestResult(float(obs), float(p), None, "permutation (exact)")
    exact = math.comb(a.size + b.size, a.size) <= n_resamples
    r = sps.permutation_test((a, b), _mean_diff, permutation_type="independent", vectorized=True,
                             alternative=alternative, n_resamples=n_resamples, **_rng(seed))
    return TestResult(float(r.statistic), float(r.pvalue), None, "permutation (exact)" if exact else "permutation")


def bootstrap_diff_ci(a: Sequence[float], b: Sequence[float], level: float = 0.95, n_resamples: int = 9999,
                      seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of mean(a) - mean(b) (scipy.stats.bootstrap), each group resampled on its
    own; a group of one value stays fixed (the candidate is given, the random draws are the sample)."""
    a, b = _arr(a), _arr(b)
    if a.size == 0 or b.size < 2 or (np.ptp(b) == 0 and (a.size == 1 or np.ptp(a) == 0)):
        return (float("nan"), float("nan")) if a.size == 0 or b.size < 2 else (float(a.mean() - b[0]),) * 2
    if a.size == 1:
        r = sps.bootstrap((b,), lambda y, axis=-1: a[0] - np.mean(y, axis=axis), confidence_level=level,
                          n_resamples=n_resamples, method="percentile", vectorized=True, **_rng(seed))
    else:
        r = sps.bootstrap((a, b), _mean_diff, confidence_level=level, n_resamples=n_resamples,
                          method="percentile", vectorized=True, **_rng(seed))
    return float(r.confidence_interval.low), float(r.confidence_interval.high)


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
    mw = (mann_whitney_u(c, r, alt, "exact" if c.size == 1 else "auto") if c.size and r.size
          else TestResult(nan, nan))
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
    rejected and are left out. The choice depends on the design only, so the family keeps its error rate.
    A family-wise (Holm) rule; under Benjamini-Hochberg use bh_family."""
    f = np.asarray(floors, dtype=np.float64)
    f = np.where(np.isfinite(f), f, 0.0)  # unknown floor: always counted
    for k in range(1, f.size + 1):
        if (f <= alpha / k + 1e-15).sum() <= k:
            return f <= alpha / k + 1e-15
    return np.ones(f.size, dtype=bool)


def bh_family(floors: Sequence[float], alpha: float) -> np.ndarray:
    """The discrete-test restriction for Benjamini-Hochberg, after Gilbert (2005): a test whose smallest
    reachable p-value exceeds the largest threshold BH can apply, alpha, can never be rejected and is left
    out; the others all count. Chosen by the design only, so BH keeps its false discovery rate on the rest.
    (Tarone's alpha / K cut is a family-wise rule: under BH it drops two tests at floor 0.05 that plain
    BH would reject together; Gilbert's own K-step variant drops them too, so this milder cut is used.)"""
    f = np.asarray(floors, dtype=np.float64)
    f = np.where(np.isfinite(f), f, 0.0)
    return f <= alpha + 1e-15


def discrete_family(floors: Sequence[float], alpha: float, method: str = "holm") -> np.ndarray:
    """Which tests of a discrete family count: bh_family under "bh", tarone_family otherwise."""
    return bh_family(floors, alpha) if method == "bh" else tarone_family(floors, alpha)


def _holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values of finite p (m,): max over j <= i of (m - j + 1) p_(j), capped at 1."""
    order = np.argsort(p, kind="stable")
    m = p.size
    adj = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adj
    return out


def _bh(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values of finite p (m,): min over j >= i of m p_(j) / j, capped at 1."""
    order = np.argsort(p, kind="stable")
    m = p.size
    adj = np.minimum(1.0, np.minimum.accumulate((m * p[order] / np.arange(1, m + 1))[::-1])[::-1])
    out = np.empty(m)
    out[order] = adj
    return out


def adjust_pvalues(p: Sequence[float], method: str = "holm") -> np.ndarray:
    """Holm (step-down, family-wise error) or Benjamini-Hochberg (false discovery rate) adjusted p-values;
    NaN entries stay NaN and do not count. Computed here, checked against statsmodels' multipletests
    (tests/unit/test_stats.py), which runs a full gc.collect() on every Holm call: 0.26 s each in a process
    holding torch, 60 calls in one report."""
    if method not in MULTIPLICITY:
        raise ValueError(f"multiplicity method must be one of {MULTIPLICITY}, got {method!r}")
    p = np.asarray(p, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if not ok.any():
        return out
    out[ok] = p[ok] if method == "none" else (_holm if method == "holm" else _bh)(p[ok])
    return out


def adjust_family(p: Sequence[float], floors: Sequence[float] | None = None, method: str = "holm",
                  alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Adjusted p-values over a family and which tests are in it. With `floors` (the smallest p-value each
    test can reach), tests that can never be rejected are left out (tarone_family under holm, bh_family
    under bh) and get NaN."""
    p = np.asarray(p, dtype=np.float64)
    member = np.isfinite(p)
    if floors is not None:
        member &= discrete_family(floors, alpha, method)
    adj = np.full(p.shape, np.nan)
    if member.any():
        adj[member] = adjust_pvalues(p[member], method)
    return adj, member


def gatekeeping(primary: Sequence[float], others: Sequence[float], other_floors: Sequence[float] | None = None,
                method: str = "holm", alpha: float = 0.05) -> tuple[bool, np.ndarray, np.ndarray]:
    """Serial gatekeeping over localizers: the pre-declared primary localizer's tests (already adjusted
    within their own family; NaN = not in it) open the gate only when every one of them rejects at
    `alpha`; then the other localizers' tests form one family (Holm or BH with the discrete restriction)
    at `alpha`. Returns (gate open, the others' adjusted p-values (NaN when the gate is closed or a test
    is out of the family), their family membership). Family-wise error over all tests stays <= alpha: if
    a primary null is true the others are reached only after a false rejection among the primary's."""
    pr = np.asarray(primary, dtype=np.float64)
    pr = pr[np.isfinite(pr)]
    gate = bool(pr.size and (pr <= alpha).all())
    adj, member = adjust_family(others, other_floors, method, alpha)
    if not gate:
        adj = np.full(adj.shape, np.nan)
    return gate, adj, member


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
    """TOST of mean(a) - mean(b) in (low, upp) with Welch's t: statsmodels ttost_ind(usevar='unequal')."""
    from statsmodels.stats.weightstats import ttost_ind

    a, b = _arr(a), _arr(b)
    if a.size < 2 or b.size < 2 or a.var(ddof=1) / a.size + b.var(ddof=1) / b.size == 0:
        return TostResult(*(float("nan"),) * 5, None, "tost-welch")
    p, (t1, p1, df), (t2, p2, _) = ttost_ind(a, b, low, upp, usevar="unequal")
    return TostResult(float(p), float(p1), float(p2), float(t1), float(t2), float(df), "tost-welch")


def tost_one(x: Sequence[float], low: float, upp: float) -> TostResult:
    """TOST of mean(x) in (low, upp), one-sample t: statsmodels DescrStatsW(x).ttost_mean(low, upp)."""
    from statsmodels.stats.weightstats import DescrStatsW

    x = _arr(x)
    if x.size < 2 or x.std(ddof=1) == 0:
        return TostResult(*(float("nan"),) * 5, None, "tost-one-sample")
    p, (t1, p1, df), (t2, p2, _) = DescrStatsW(x).ttost_mean(low, upp)
    return TostResult(float(p), float(p1), float(p2), float(t1), float(t2), float(df), "tost-one-sample")


# ---------------------------------------------------------------------------------------------- hierarchical
def hierarchical_t(diff: float, random_values: Sequence[float], var_questions: float = 0.0,
                   n_questions: int | None = None, seed_values: Sequence[float] | None = None,
                   alternative: str = "greater", level: float = 0.95) -> dict:
    """One-sided t-test of E[candidate - mean of random locations] > 0 (or < 0) and its t-interval.

    The variance of `diff` adds three parts: locations (the draws' variance / n, n - 1 df), questions
    (`var_questions`: the paired question bootstrap's variance of the difference, unbiased, with
    n_questions - 1 df; 0 without per-question scores) and training (the candidate's seed values'
    variance / seeds, seeds - 1 df; left out with one seed). Satterthwaite's degrees of freedom calibrate
    the t at small samples. With only the location part it is the one-sample t-test of candidate - draws;
    with a question part var(a) / n_a it is Welch's test of a against the draws (tests check both)."""
    _check_alt(alternative)
    r = _arr(random_values)
    nan = float("nan")
    out = {"t": nan, "df": nan, "p": nan, "se": nan, "se_locations": nan, "se_questions": nan, "se_seeds": nan,
           "ci_low": nan, "ci_high": nan}
    if r.size < 2 or not math.isfinite(diff):
        return out
    parts = [(r.var(ddof=1) / r.size, r.size - 1.0)]
    vq = float(var_questions) if var_questions is not None and math.isfinite(var_questions) else 0.0
    parts.append((max(vq, 0.0), (n_questions - 1.0) if n_questions and n_questions > 1 else math.inf))
    s = _arr(seed_values) if seed_values is not None else np.zeros(0)
    if s.size > 1:
        parts.append((s.var(ddof=1) / s.size, s.size - 1.0))
    var = sum(v for v, _ in parts)
    out.update(se_locations=math.sqrt(parts[0][0]), se_questions=math.sqrt(parts[1][0]),
               se_seeds=math.sqrt(parts[2][0]) if len(parts) > 2 else nan)
    if not var > 0:
        return out
    den = sum(v * v / d for v, d in parts if math.isfinite(d) and v > 0)
    df = var * var / den if den > 0 else math.inf
    se = math.sqrt(var)
    t = diff / se
    h = float(sps.t.ppf((1 + level) / 2, df)) * se
    out.update(t=float(t), df=float(df), p=_t_pvalue(t, df, alternative), se=se, ci_low=diff - h, ci_high=diff + h)
    return out


def t_tost(est: float, se: float, df: float, low: float, upp: float, alpha: float = 0.05) -> dict:
    """TOST of low < theta < upp from an estimate, its standard error and degrees of freedom: p = max of
    the two one-sided t p-values, and the (1 - 2 alpha) t-interval, which lies inside (low, upp) exactly
    when p < alpha (statsmodels' ttost_mean in the one-sample case)."""
    if not (math.isfinite(est) and se > 0 and df > 0):
        return {"p": float("nan"), "p_low": float("nan"), "p_upp": float("nan"), "lo": float("nan"), "hi": float("nan")}
    p_low = float(sps.t.sf((est - low) / se, df))
    p_upp = float(sps.t.cdf((est - upp) / se, df))
    h = float(sps.t.ppf(1 - alpha, df)) * se
    return {"p": max(p_low, p_upp), "p_low": p_low, "p_upp": p_upp, "lo": est - h, "hi": est + h}


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
_GH = np.polynomial.hermite_e.hermegauss(96)  # nodes and weights for E[f(Z)], Z ~ N(0, 1)


def rank_power(shift: float, n: int, alpha: float, noise: float = 0.0) -> float:
    """Power of the one-sided rank test (reject when (1 + #draws >= x) / (n + 1) <= alpha) for a candidate
    whose true value is `shift` standard deviations of the random locations above their mean, and whose
    own observed value carries noise of sd `noise` (same unit: its question SE / the draws' sd). The
    power integrates over that noise (Gauss-Hermite); noise 0 treats the candidate's value as exact."""
    k = math.floor(alpha * (n + 1) + 1e-9) - 1  # largest count of draws at least as good that still rejects
    if k < 0 or n < 1:
        return 0.0
    if not noise:
        return float(sps.binom.cdf(k, n, float(sps.norm.sf(shift))))
    z, w = _GH
    q = sps.norm.sf(shift + noise * z)
    return float((sps.binom.cdf(k, n, q) * w).sum() / w.sum())


def combined_power(shift: float, n: int, alpha: float, noise: float = 0.0, n_questions: int | None = None,
                   sims: int = 4000, seed: int = 0) -> float:
    """Power of the whole "evidence for" rule (rank test AND hierarchical t-test, each at `alpha`) by
    simulation with common random numbers (so it rises with `shift`): draws N(0, 1), the candidate
    N(shift, noise^2), its question variance estimated with n_questions - 1 df."""
    if n < 2 or rank_power(40.0, n, alpha) == 0.0:
        return 0.0
    rng = np.random.default_rng([seed, n])
    r = rng.standard_normal((sims, n))
    zc = rng.standard_normal(sims)
    c = shift + noise * zc
    p_rank = (1 + (r >= c[:, None]).sum(axis=1)) / (n + 1)
    vl = r.var(axis=1, ddof=1) / n
    if noise and n_questions and n_questions > 1:
        vq = noise ** 2 * rng.chisquare(n_questions - 1, sims) / (n_questions - 1)
        df = (vl + vq) ** 2 / (vl ** 2 / (n - 1) + vq ** 2 / (n_questions - 1))
    else:
        vq = np.full(sims, noise ** 2)
        df = np.full(sims, n - 1.0) if not noise else (vl + vq) ** 2 / (vl ** 2 / (n - 1))
    t = (c - r.mean(axis=1)) / np.sqrt(vl + vq)
    p_t = sps.t.sf(t, df)
    return float(((p_rank <= alpha + 1e-12) & (p_t <= alpha)).mean())


def detectable_shift(n: int, alpha: float, power: float = 0.8, noise: float = 0.0,
                     n_questions: int | None = None) -> float:
    """The shift (in standard deviations of the random locations) detected with `power`, the candidate's
    own noise included: by the rank test alone (rank_power), or with n_questions by the whole "evidence
    for" rule (combined_power). inf when the design cannot reject at all."""
    fn = ((lambda x: combined_power(x, n, alpha, noise, n_questions)) if n_questions
          else (lambda x: rank_power(x, n, alpha, noise)))
    if fn(40.0) < power:
        return float("inf")
    lo, hi = -10.0 if not n_questions else 0.0, 40.0
    for _ in range(60 if not n_questions else 30):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fn(mid) >= power else (mid, hi)
    return hi


def draws_for_power(shift: float, alpha: float, power: float = 0.8, max_n: int = 100000, noise: float = 0.0) -> int | None:
    """The fewest draws with which the rank test detects `shift` (sd units) with `power`, the candidate's
    own noise included; None if > max_n or never (noise can cap the power below the target)."""
    if not math.isfinite(shift) or shift <= 0:
        return None
    n = draws_for_floor(alpha)
    while n <= max_n:
        if rank_power(shift, n, alpha, noise) >= power:
            return n
        n = n + 1 if n < 200 else int(n * 1.05)
        if noise and n > 2000:  # with noise the power tends to P(candidate above every draw's tail): stop
            return None
    return None


def equivalence_power(margin: float, se: float, alpha: float, true_diff: float = 0.0) -> float:
    """Normal-approximation power of TOST (margin +-`margin`, estimate with standard error `se`)."""
    if not (margin > 0 and se > 0):
        return float("nan") if not se > 0 else 0.0
    z = sps.norm.ppf(1 - alpha)
    p = sps.norm.cdf((margin - true_diff) / se - z) + sps.norm.cdf((margin + true_diff) / se - z) - 1
    return float(max(0.0, p))


def margin_for_equivalence(se: float, alpha: float, power: float = 0.8) -> float:
    """The narrowest TOST margin shown with `power` at standard error `se` (true difference 0): the inverse of
    `se_for_equivalence`."""
    return float(se * (sps.norm.ppf(1 - alpha) + sps.norm.ppf((1 + power) / 2)))


def se_for_equivalence(margin: float, alpha: float, power: float = 0.8) -> float:
    """The standard error at which TOST shows equivalence of a true difference 0 with `power`."""
    return float(margin / (sps.norm.ppf(1 - alpha) + sps.norm.ppf((1 + power) / 2)))
