"""Calibration of a judge's probabilities: expected calibration error and a reliability diagram.

ECE with B equal-width bins on [0, 1]: sum_b (n_b / N) |mean(y in b) - mean(p in b)| (Naeini et al.,
2015; Guo et al., 2017). A probability of exactly 1 falls in the last bin. A judge whose P(yes) is
calibrated has ECE near 0, and then its mean probability and its thresholded share say the same thing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def reliability_bins(p: Sequence[float], y: Sequence[float], n_bins: int = 10) -> list[dict]:
    """Per bin: lower/upper edge, count, mean predicted probability, observed positive rate."""
    p, y = np.asarray(p, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if p.shape != y.shape:
        raise ValueError(f"{p.shape[0]} probabilities but {y.shape[0]} labels")
    idx = np.clip((p * n_bins).astype(int), 0, n_bins - 1)
    out = []
    for b in range(n_bins):
        m = idx == b
        out.append({"lo": b / n_bins, "hi": (b + 1) / n_bins, "n": int(m.sum()),
                    "mean_p": float(p[m].mean()) if m.any() else None,
                    "rate": float(y[m].mean()) if m.any() else None})
    return out


def expected_calibration_error(p: Sequence[float], y: Sequence[float], n_bins: int = 10) -> float:
    """ECE with `n_bins` equal-width bins (NaN for no examples)."""
    bins = reliability_bins(p, y, n_bins)
    n = sum(b["n"] for b in bins)
    if n == 0:
        return float("nan")
    return float(sum(b["n"] / n * abs(b["rate"] - b["mean_p"]) for b in bins if b["n"]))


def reliability_diagram(curves: dict[str, tuple[Sequence[float], Sequence[float]]], path: str | Path,
                        n_bins: int = 10, title: str = "Judge reliability") -> Path:
    """One PNG with a reliability curve per entry {label: (p, y)} (label shows ECE and N), atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from locaudit.io import atomic_path

    fig, ax = plt.subplots(figsize=(5.2, 5.0), dpi=110)
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="calibrated")
    for label, (p, y) in curves.items():
        bins = [b for b in reliability_bins(p, y, n_bins) if b["n"]]
        ece = expected_calibration_error(p, y, n_bins)
        ax.plot([b["mean_p"] for b in bins], [b["rate"] for b in bins], marker="o", ms=4,
                label=f"{label} (ECE {ece:.3f}, N={len(p)})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("judge P(yes), bin mean")
    ax.set_ylabel("share labelled yes")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
