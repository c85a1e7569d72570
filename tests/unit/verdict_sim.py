"""Synthetic studies for the verdict's simulation table (docs/verdict.md, tests/unit/test_verdict_sim.py).

A study: `n` random locations and one or more candidates, scored on `q` test questions. Per question,
    x[j, i] = mu_j + b_i + e[j, i],   mu_j ~ N(0, tau^2) (location),  b_i ~ N(0, 1) (question difficulty,
                                      shared by every edit: the pairing), e ~ N(0, sigma_j^2) (noise)
The random draws' observed values x[j].mean() then have sd 1 when tau^2 + sigma^2 / q = 1 (the unit of
"shift in sd"). The estimand is E[candidate - mean of random locations] = mu_c (the population of random
locations has mean 0). Everything is vectorised over studies: [S, ...] arrays.
"""

from __future__ import annotations

import numpy as np


def studies(S: int, n: int, q: int, rng: np.random.Generator, shift: float = 0.0, loc_share: float = 0.5,
            cand_noise: float | None = None, n_cand: int = 1, exchangeable: bool = False) -> dict:
    """S synthetic studies. Draws: location sd tau = sqrt(loc_share), question noise such that the draws'
    observed sd is 1. Candidates: true mean `shift` (sd units) or, with `exchangeable`, drawn like a
    random location; their question noise gives an observed-value SE of `cand_noise` (default: as the
    draws'). Returns per-question scores rand [S, n, q], cand [S, n_cand, q] and the true difference."""
    tau = np.sqrt(loc_share)
    se_draw = np.sqrt(1 - loc_share)  # sd of a draw's question-mean noise
    sig = se_draw * np.sqrt(q)
    b = rng.standard_normal((S, 1, q))
    mu = tau * rng.standard_normal((S, n, 1))
    rand = mu + b + sig * rng.standard_normal((S, n, q))
    se_c = se_draw if cand_noise is None else cand_noise
    mu_c = tau * rng.standard_normal((S, n_cand, 1)) if exchangeable else np.full((S, n_cand, 1), shift)
    cand = mu_c + b + se_c * np.sqrt(q) * rng.standard_normal((S, n_cand, q))
    return {"rand": rand, "cand": cand, "true": mu_c[..., 0]}


def rank_p(c: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Vectorised rank p-value (1 + #draws >= c) / (n + 1); c [S], r [S, n] (stats.empirical_p)."""
    return (1 + (r >= c[:, None]).sum(axis=1)) / (r.shape[1] + 1)


def _half_mask(q: int) -> np.ndarray:
    import hashlib

    return np.array([int(hashlib.sha256(f"q{i}".encode()).hexdigest()[:8], 16) % 2 for i in range(q)]) == 0


def multinomial_weights(S: int, B: int, q: int, rng: np.random.Generator, mask: np.ndarray | None = None
                        ) -> np.ndarray:
    """[S, B, q] bootstrap weights over questions (rows sum to 1); with `mask`, only those questions."""
    idx = np.flatnonzero(np.ones(q, bool) if mask is None else mask)
    w = np.zeros((S, B, q))
    counts = rng.multinomial(idx.size, np.full(idx.size, 1.0 / idx.size), size=(S, B))
    w[..., idx] = counts / idx.size
    return w


def old_interval(st: dict, B: int, rng: np.random.Generator, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """The interval before issue 25: a percentile interval of the hierarchical bootstrap whose question
    resamples keep the two question-id hash halves' sizes (analysis.SelectionEngine.weights before the change)."""
    rand, cand = st["rand"], st["cand"][:, 0]
    S, n, q = rand.shape
    half = _half_mask(q)
    fa = half.mean()
    wa = multinomial_weights(S, B, q, rng, half)
    wb = multinomial_weights(S, B, q, rng, ~half)
    w = fa * wa + (1 - fa) * wb  # [S, B, q]
    loc = rng.integers(0, n, size=(S, B, n))
    cnt = np.zeros((S, B, n))
    np.add.at(cnt, (np.arange(S)[:, None, None], np.arange(B)[None, :, None], loc), 1.0 / n)
    rbar_q = cnt @ rand  # [S, B, q]: mean of the resampled locations, per question
    d = (w * (cand[:, None, :] - rbar_q)).sum(-1)
    lo, hi = np.quantile(d, [(1 - level) / 2, (1 + level) / 2], axis=1)
    return lo, hi


def hierarchical(st: dict, B: int, rng: np.random.Generator, k: int = 0, level: float = 0.95) -> dict:
    """The rule after issue 25 for candidate k, vectorised over studies: the difference d, its question
    variance from the paired question bootstrap (locations as drawn; unbiased by q / (q - 1)), and the
    hierarchical t-test / t-interval of stats.hierarchical_t (checked equal on a sample of studies)."""
    from scipy import stats as sps

    rand, cand = st["rand"], st["cand"][:, k]
    S, n, q = rand.shape
    r = rand.mean(-1)
    c = cand.mean(-1)
    d = c - r.mean(1)
    dq = cand - rand.mean(1)  # [S, q]: per-question differences (paired)
    w = multinomial_weights(S, B, q, rng)
    var_q = (w * dq[:, None, :]).sum(-1).var(axis=1, ddof=1) * q / (q - 1)
    var_l = r.var(axis=1, ddof=1) / n
    var = var_l + var_q
    df = var ** 2 / (var_l ** 2 / (n - 1) + var_q ** 2 / (q - 1))
    se = np.sqrt(var)
    h = sps.t.ppf((1 + level) / 2, df) * se
    return {"d": d, "r": r, "c": c, "var_q": var_q, "p_rank": rank_p(c, r), "p_mean": sps.t.sf(d / se, df),
            "ci_low": d - h, "ci_high": d + h, "se": se, "df": df}


def claims(h: dict, n: int, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """(any claim: "evidence for" or "suggestive", "evidence for" only) for one test alone in its family:
    both tests at alpha, better; suggestive when one more draw at least as good would undo it."""
    claim = (np.maximum(h["p_rank"], h["p_mean"]) <= alpha + 1e-12) & (h["d"] > 0)
    firm = claim & (h["p_rank"] + 1 / (n + 1) <= alpha + 1e-12)
    return claim, firm
