"""Agreement between two head localizers, against what two random localizations would give.

For two rankings a, b of the same N = L*H heads (best first) and a set size K:
- Jaccard of the top-K sets, J = |A & B| / |A | B| = o / (2K - o) with o = |A & B|;
- Spearman's rho and Kendall's tau-b between the two rankings over all heads (rank = position, or the
  scores themselves when given, ties averaged as scipy does).

The null is two independent uniformly random K-sets (the study's random draws): the overlap o is
hypergeometric, o ~ Hypergeom(N, K, K), so J's distribution is exact: mean, 95th percentile and the
one-sided p-value P(J_null >= J). For the rank correlations the null is two independent random
permutations: rho and tau have mean 0; the p-value is scipy's (permutation-exact for small N,
asymptotic otherwise), and `null_draws` > 0 adds a seeded Monte-Carlo distribution of all three
statistics for pairs of random rankings (their 95th percentiles), which is what a report plots.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from locaudit.errors import DataError
from locaudit.heads import Head


def _as_scores(x, shape: tuple[int, int] | None = None) -> np.ndarray:
    """A [L*H] score vector (higher = better) from a [L, H] tensor/array or a ranking (best first)."""
    if isinstance(x, torch.Tensor):
        return x.detach().double().reshape(-1).cpu().numpy()
    if isinstance(x, np.ndarray):
        return x.astype(np.float64).reshape(-1)
    ranking = [tuple(map(int, lh)) for lh in x]
    if shape is None:
        raise DataError("a ranking needs the model's (layers, heads) shape to be compared")
    L, H = shape
    if sorted(ranking) != [(l, h) for l in range(L) for h in range(H)]:
        raise DataError(f"a ranking must list each of the {L}x{H} heads exactly once")
    s = np.empty(L * H)
    for r, (l, h) in enumerate(ranking):
        s[l * H + h] = -r
    return s


def top_set(scores: np.ndarray, k: int) -> set[int]:
    """Indices of the k highest finite scores (ties by lower index), as flat head indices."""
    order = sorted(range(len(scores)), key=lambda i: (not np.isfinite(scores[i]), -scores[i] if np.isfinite(scores[i])
                                                      else 0.0, i))
    return set(order[:k])


def jaccard(a: set, b: set) -> float:
    """|a & b| / |a | b| (1.0 for two empty sets)."""
    u = len(a | b)
    return len(a & b) / u if u else 1.0


def jaccard_null(n: int, k: int) -> dict:
    """Exact distribution of the Jaccard index of two independent uniform k-subsets of n items."""
    from scipy.stats import hypergeom

    o = np.arange(0, k + 1)
    p = hypergeom(n, k, k).pmf(o)
    j = o / (2 * k - o)
    cdf = np.cumsum(p)
    q95 = float(j[np.searchsorted(cdf, 0.95)])
    return {"overlap": o.tolist(), "pmf": p.tolist(), "jaccard": j.tolist(), "mean": float((p * j).sum()),
            "mean_overlap": k * k / n, "q95": q95}


def agreement(a, b, k: int, shape: tuple[int, int] | None = None, null_draws: int = 0, seed: int = 0) -> dict:
    """Jaccard of top-k sets and Spearman/Kendall over all heads between localizers a and b.

    a, b: Float[Tensor, "layer head"] scores (higher = better; NaN = not ranked) or rankings (best first;
    then `shape` = (layers, heads)). Heads without a finite score in either are left out of the rank
    correlations. Returns the statistics, their null (module docstring) and the p-values.
    """
    from scipy.stats import hypergeom, kendalltau, spearmanr

    if shape is None and isinstance(a, torch.Tensor):
        shape = tuple(a.shape)  # type: ignore[assignment]
    sa, sb = _as_scores(a, shape), _as_scores(b, shape)
    if sa.shape != sb.shape:
        raise DataError(f"the two localizers rank {sa.size} and {sb.size} heads; they must cover the same model")
    n = sa.size
    if not 1 <= k <= n:
        raise DataError(f"k={k}: must be in 1..{n}")
    A, B = top_set(sa, k), top_set(sb, k)
    o = len(A & B)
    J = jaccard(A, B)
    both = np.isfinite(sa) & np.isfinite(sb)
    rho, p_rho = spearmanr(sa[both], sb[both])
    tau, p_tau = kendalltau(sa[both], sb[both])
    null = jaccard_null(n, k)
    out = {
        "k": k, "n_heads": n, "n_ranked": int(both.sum()), "overlap": o, "jaccard": J,
        "spearman": float(rho), "kendall": float(tau),
        "null": {"jaccard_mean": null["mean"], "jaccard_q95": null["q95"], "overlap_mean": null["mean_overlap"],
                 "spearman_mean": 0.0, "kendall_mean": 0.0},
        # P(overlap >= o) for two random k-sets = P(J >= J_observed)
        "p_jaccard": float(hypergeom(n, k, k).sf(o - 1)),
        "p_spearman": float(p_rho), "p_kendall": float(p_tau),
    }
    if null_draws > 0:
        out["null"].update(random_pair_null(n, k, null_draws, seed))
    return out


def random_pair_null(n: int, k: int, draws: int, seed: int = 0) -> dict:
    """Monte-Carlo null: for `draws` pairs of independent random rankings of n heads, the Jaccard of their
    top-k sets and their Spearman / Kendall correlations (mean and 95th percentile of each)."""
    from scipy.stats import kendalltau

    rng = np.random.default_rng(seed)
    js, rhos, taus = [], [], []
    for _ in range(draws):
        ra, rb = rng.permutation(n), rng.permutation(n)  # rank of head i in each ranking
        js.append(jaccard(set(np.flatnonzero(ra < k)), set(np.flatnonzero(rb < k))))
        rhos.append(float(np.corrcoef(ra, rb)[0, 1]))
        taus.append(float(kendalltau(ra, rb)[0]))
    q = lambda v: float(np.quantile(v, 0.95))  # noqa: E731
    return {"draws": draws, "mc_jaccard_mean": float(np.mean(js)), "mc_jaccard_q95": q(js),
            "mc_spearman_mean": float(np.mean(rhos)), "mc_spearman_q95": q(rhos),
            "mc_kendall_mean": float(np.mean(taus)), "mc_kendall_q95": q(taus)}


def agreement_table(scores: dict[str, object], k: int, shape: tuple[int, int] | None = None,
                    null_draws: int = 0, seed: int = 0) -> list[dict]:
    """`agreement` for every pair of named localizers (a dict name -> scores or ranking)."""
    names = list(scores)
    rows = []
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            r = agreement(scores[names[i]], scores[names[j]], k, shape, null_draws, seed)
            rows.append({"a": names[i], "b": names[j], **r})
    return rows


def ranking_scores(ranking: Sequence[Head], shape: tuple[int, int]) -> Float[Tensor, "layer head"]:
    """Float[Tensor, "layer head"]: -rank of each head in a best-first ranking (for `agreement`)."""
    return torch.from_numpy(_as_scores(ranking, shape).reshape(shape))


__all__ = ["agreement", "agreement_table", "jaccard", "jaccard_null", "random_pair_null", "ranking_scores",
           "top_set"]
