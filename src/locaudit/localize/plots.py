"""Figures of localization results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os

import torch

from locaudit.io import atomic_path


def plot_probe_heatmap(val_acc: torch.Tensor, path: str | os.PathLike, title: str = "probe validation accuracy",
                       mark_top: int = 0, dpi: int = 120) -> None:
    """Save a layers x heads heatmap of Float[Tensor, "layer head"] accuracies to `path` (PNG).

    `mark_top` > 0 outlines the best heads so a reader sees at once which ones a top-K choice takes.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    acc = val_acc.detach().float().cpu().numpy()
    L, H = acc.shape
    fig, ax = plt.subplots(figsize=(min(2.0 + 0.35 * H, 16), min(1.5 + 0.25 * L, 14)))
    im = ax.imshow(acc, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title + (f"\n(outlined: best {mark_top})" if mark_top > 0 else ""), fontsize=10)
    step_h = max(1, H // 16)
    step_l = max(1, L // 20)
    ax.set_xticks(range(0, H, step_h))
    ax.set_yticks(range(0, L, step_l))
    cbar = fig.colorbar(im, ax=ax)
    cbar.set_label("validation accuracy")
    if mark_top > 0:
        flat = sorted(((-acc[l, h], l, h) for l in range(L) for h in range(H)))[:mark_top]
        for _, l, h in flat:
            ax.add_patch(plt.Rectangle((h - 0.5, l - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.2))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
