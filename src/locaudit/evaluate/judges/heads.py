"""Classifier heads of the trained judges: standardised L2 logistic regression (full-batch L-BFGS in
torch) and a one-hidden-layer MLP; both save as plain tensors (safetensors), never pickle."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class Head:
    """p = sigmoid(f((x - mean) / std)); f linear (`w1` [F], `b1` []) or an MLP (`w1` [F, H], `b1` [H],
    `w2` [H], `b2` []). An ensemble stores its members' tensors as 'm0.<name>', 'm1.<name>', ... and
    averages their probabilities."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.t = {k: v.float() for k, v in tensors.items()}
        members = sorted({k.split(".", 1)[0] for k in tensors if "." in k})
        if members:
            self.members = [Head({k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(m + ".")})
                            for m in members]
            return
        self.members = []
        missing = {"mean", "std", "w1", "b1"} - set(tensors)
        if missing:
            raise KeyError(f"head tensors missing: {sorted(missing)}")

    @classmethod
    def ensemble(cls, heads: list["Head"]) -> "Head":
        return cls({f"m{i}.{k}": v for i, h in enumerate(heads) for k, v in h.t.items()})

    @property
    def n_features(self) -> int:
        return self.members[0].n_features if self.members else int(self.t["mean"].shape[0])

    @property
    def kind(self) -> str:
        if self.members:
            return "ensemble(" + ",".join(m.kind for m in self.members) + ")"
        return "mlp" if "w2" in self.t else "logistic"

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: Float[Tensor, "N F"] -> Float[Tensor, "N"]."""
        if x.shape[-1] != self.n_features:
            raise ValueError(f"head expects {self.n_features} features, got {x.shape[-1]}")
        if self.members:
            return torch.logit(self.prob(x), eps=1e-7)
        z = (x.float() - self.t["mean"]) / self.t["std"]
        if self.kind == "logistic":
            return z @ self.t["w1"] + self.t["b1"]
        return F.gelu(z @ self.t["w1"] + self.t["b1"]) @ self.t["w2"] + self.t["b2"]

    def prob(self, x: torch.Tensor) -> torch.Tensor:
        if self.members:
            return torch.stack([m.prob(x) for m in self.members]).mean(0)
        return torch.sigmoid(self.logits(x))


def standardise_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = x.mean(0)
    std = x.std(0).clamp_min(1e-4)
    return mean, std


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float, max_iter: int = 300,
                 sample_weight: torch.Tensor | None = None) -> Head:
    """L2 logistic regression on standardised features: mean BCE + l2/2 * |w|^2 (bias unpenalised).

    x: Float[Tensor, "N F"], y: Float[Tensor, "N"] in {0, 1}.
    """
    mean, std = standardise_stats(x)
    z = ((x.float() - mean) / std).double()
    yd = y.double()
    sw = sample_weight.double() / sample_weight.double().mean() if sample_weight is not None else None
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    p = yd.mean().clamp(1e-3, 1 - 1e-3)
    b = torch.tensor(math.log(p / (1 - p)), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-7, tolerance_change=1e-10,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z @ w + b, yd, weight=sw) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return Head({"mean": mean, "std": std, "w1": w.detach().float(), "b1": b.detach().float()})


def fit_mlp(x: torch.Tensor, y: torch.Tensor, hidden: int = 128, weight_decay: float = 1e-2, epochs: int = 20,
            dropout: float = 0.2, lr: float = 1e-3, seed: int = 0, batch_size: int = 256) -> Head:
    """A one-hidden-layer MLP (GELU, input dropout) trained with AdamW on standardised features."""
    g = torch.Generator().manual_seed(seed)
    mean, std = standardise_stats(x)
    z = (x.float() - mean) / std
    yf = y.float()
    n, f = z.shape
    w1 = (torch.randn(f, hidden, generator=g) / math.sqrt(f)).requires_grad_()
    b1 = torch.zeros(hidden, requires_grad=True)
    w2 = (torch.randn(hidden, generator=g) / math.sqrt(hidden)).requires_grad_()
    b2 = torch.zeros((), requires_grad=True)
    opt = torch.optim.AdamW([w1, b1, w2, b2], lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, batch_size):
            idx = perm[s: s + batch_size]
            zb = F.dropout(z[idx], dropout, training=True)
            logit = F.gelu(zb @ w1 + b1) @ w2 + b2
            loss = F.binary_cross_entropy_with_logits(logit, yf[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return Head({"mean": mean, "std": std, "w1": w1.detach(), "b1": b1.detach(), "w2": w2.detach(), "b2": b2.detach()})
