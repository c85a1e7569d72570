"""Summaries over traced facts (localize/tracing.py's `TracedFact`): the split-half reliability of the tracing
variable, and effects averaged within ROME's token categories (heatmaps over facts)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from locaudit.errors import ConfigError

if TYPE_CHECKING:
    from locaudit.localize.tracing import TracedFact

# ROME's token categories for heatmaps averaged over facts
CATEGORIES = ("first subject token", "middle subject tokens", "last subject token", "first subsequent token",
              "further tokens", "last token")


def split_half_reliability(traced: Sequence["TracedFact"], kind: str) -> dict:
    """Split-half reliability of the tracing variable of `kind` over (fact, layer): r = Pearson correlation
    of the two halves' values, and Spearman-Brown 2r / (1 + r) (the full curve's reliability); also the
    median over facts of the per-fact correlation of the two half curves (over layers)."""
    a, b, per = [], [], []
    for t in traced:
        h = t.halves.get(kind)
        if not h:
            continue
        x, y = torch.tensor(h[0], dtype=torch.float64), torch.tensor(h[1], dtype=torch.float64)
        ok = torch.isfinite(x) & torch.isfinite(y)
        a.append(x[ok])
        b.append(y[ok])
        if int(ok.sum()) >= 3 and float(x[ok].std()) > 0 and float(y[ok].std()) > 0:
            per.append(float(torch.corrcoef(torch.stack([x[ok], y[ok]]))[0, 1]))
    out = {"kind": kind, "n_facts": len(a), "r": float("nan"), "spearman_brown": float("nan"),
           "median_fact_r": float(torch.tensor(per).median()) if per else float("nan"), "n_fact_r": len(per)}
    if a:
        x, y = torch.cat(a), torch.cat(b)
        if x.numel() >= 3 and float(x.std()) > 0 and float(y.std()) > 0:
            r = float(torch.corrcoef(torch.stack([x, y]))[0, 1])
            out.update(r=r, spearman_brown=2 * r / (1 + r) if r > -1 else float("nan"))
    return out


def token_categories(subject: tuple[int, int], n_tokens: int) -> list[int]:
    """ROME's category (index into CATEGORIES) of every token position of a prompt."""
    s0, s1 = subject
    cats = []
    for t in range(n_tokens):
        if t == n_tokens - 1:
            cats.append(5)
        elif t == s0:
            cats.append(0)
        elif s0 < t < s1 - 1:
            cats.append(1)
        elif t == s1 - 1:
            cats.append(2)
        elif t == s1:
            cats.append(3)
        elif t > s1:
            cats.append(4)
        else:
            cats.append(-1)  # before the subject: not in ROME's categories
    return cats


def category_heatmap(traced: Sequence[TracedFact], kind: str) -> torch.Tensor:
    """Float[n_layers, 6]: grid effects averaged over facts within ROME's token categories (NaN where a
    category has no token in any fact)."""
    sums, counts = None, torch.zeros(len(CATEGORIES))
    for tf in traced:
        if kind not in tf.grid:
            continue
        g = torch.tensor(tf.grid[kind])  # [L, T]
        if sums is None:
            sums = torch.zeros(g.shape[0], len(CATEGORIES))
        seen = torch.zeros(len(CATEGORIES))
        per = torch.zeros(g.shape[0], len(CATEGORIES))
        for t, c in enumerate(token_categories(tf.subject, tf.n_tokens)):
            if c >= 0:
                per[:, c] += g[:, t]
                seen[c] += 1
        mask = seen > 0
        sums[:, mask] += per[:, mask] / seen[mask]
        counts[mask] += 1
    if sums is None:
        raise ConfigError(f"no traced fact has a {kind!r} grid (trace with grid_facts > 0)")
    return sums / counts.clamp(min=1) + torch.where(counts > 0, 0.0, float("nan"))
