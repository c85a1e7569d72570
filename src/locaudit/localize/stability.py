"""Top-K stability of a causal localizer between disjoint pair sets.

A localizer's ranking is an estimate from a sample of pairs. Its stability: split the pairs into two disjoint
halves (seeded), rank the heads on each half from the per-pair effects (no second run: activation and
attribution patching keep per-pair effects [n, L, H]), and compare the halves' top-K sets and rankings:
  overlap    |top_K(A) & top_K(B)| / K (1 = the same heads; a random pair of K-sets of N heads overlaps K/N
             on average, given as `chance`);
  jaccard    |A & B| / |A | B| of the two top-K sets;
  spearman   Spearman rank correlation of the two halves' scores over every computed head;
  layer_hist the top-K's layer histogram of each half and of all pairs.
Disjoint halves of n pairs each estimate with n/2 pairs, so the numbers are a lower bound on the stability of
the full-sample ranking (the same split-half logic as tracing's reliability).
"""

from __future__ import annotations

import numpy as np
import torch

from locaudit.errors import DataError


def _scores(per: torch.Tensor, rank_by: str) -> np.ndarray:
    m = per.double().mean(0)
    return (m.abs() if rank_by == "abs" else m).numpy()


def _top(score: np.ndarray, k: int) -> list[tuple[int, int]]:
    """The k best heads of a [L, H] score, NaN last, ties broken by (layer, head) (HeadEffects' order)."""
    L, H = score.shape
    flat = [(-(score[l, h]) if np.isfinite(score[l, h]) else np.inf, l, h) for l in range(L) for h in range(H)]
    return [(l, h) for _, l, h in sorted(flat)[:k]]


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return float("nan")
    return float(spearmanr(a[ok], b[ok]).statistic)


def topk_stability(per_example: torch.Tensor, k: int, rank_by: str = "abs", seed: int = 0) -> dict:
    """Stability of the top-`k` heads between two disjoint, seeded halves of the pairs of `per_example`
    (Float[n, L, H] per-pair effects; module docstring). Needs n >= 2."""
    if per_example is None or per_example.dim() != 3:
        raise DataError("top-K stability needs the per-pair effects [n, L, H] (keep_per_example)")
    n, L, H = per_example.shape
    if n < 2:
        raise DataError(f"top-K stability needs at least 2 pairs to split into two halves; got {n}")
    if rank_by not in ("abs", "signed"):
        raise DataError(f"rank_by={rank_by!r}: expected abs or signed")
    k = max(1, min(int(k), L * H))
    perm = np.random.default_rng(seed).permutation(n)
    a, b = sorted(perm[: n // 2].tolist()), sorted(perm[n // 2: 2 * (n // 2)].tolist())
    sa, sb = _scores(per_example[a], rank_by), _scores(per_example[b], rank_by)
    ta, tb = set(_top(sa, k)), set(_top(sb, k))
    full = _top(_scores(per_example, rank_by), k)

    def hist(heads) -> list[int]:
        c = [0] * L
        for l, _ in heads:
            c[l] += 1
        return c

    return {"k": k, "n_pairs": n, "half_pairs": n // 2, "seed": seed, "rank_by": rank_by,
            "overlap": len(ta & tb) / k, "jaccard": len(ta & tb) / len(ta | tb), "chance": k / (L * H),
            "spearman": _spearman(sa.ravel(), sb.ravel()),
            "top_a": [f"L{l}H{h}" for l, h in sorted(ta)], "top_b": [f"L{l}H{h}" for l, h in sorted(tb)],
            "top_all": [f"L{l}H{h}" for l, h in full],
            "layer_hist": {"a": hist(ta), "b": hist(tb), "all": hist(full)}}


def record_stability(meta: dict, per_example: torch.Tensor, k: int, rank_by: str, seed: int) -> None:
    """Put `topk_stability` into a localizer's meta["stability"] (a note where it cannot be computed)."""
    try:
        meta["stability"] = topk_stability(per_example, k, rank_by, seed)
    except DataError as e:
        meta["stability"] = {"note": str(e)}


__all__ = ["topk_stability", "record_stability"]
