"""One L2-regularised logistic-regression probe per head, all L*H trained as one batched optimisation.

Objective per head (the same as scikit-learn's LogisticRegression with C = 1/l2, intercept not
penalised): sum_i logloss(w . x_i + b, y_i) + l2/2 ||w||^2. It is minimised by batched Newton steps
(one [D+1, D+1] system per head, solved together) with a backtracking line search, so every probe
reaches its optimum in a few tens of iterations whatever the feature scale. Heads are ranked by
accuracy on the validation split; train/val are question-level splits (see ActivationSet.indices).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float, Shaped
from torch import Tensor

from locaudit.errors import DataError
from locaudit.heads import Head, HeadSet
from locaudit.io import atomic_path, write_json_atomic, write_text_atomic, csv_records

ACCURACY_FILE = "probe_accuracy.csv"
HEATMAP_FILE = "probe_heatmap.png"
RANKING_FILE = "ranking.json"
WEIGHTS_FILE = "probes.safetensors"
META_FILE = "probe_meta.json"

_STEPS = torch.tensor([2.0 ** -k for k in range(12)])  # line-search step sizes, tried together


@dataclass
class ProbeResult:
    """Per-head probe accuracies and weights (in the raw activation space: logit = w . o + b)."""

    train_acc: torch.Tensor  # Float[Tensor, "layer head"]
    val_acc: torch.Tensor  # Float[Tensor, "layer head"]
    weight: torch.Tensor  # Float[Tensor, "layer head head_dim"]
    bias: torch.Tensor  # Float[Tensor, "layer head"]
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.val_acc.shape)  # type: ignore[return-value]

    def ranking(self) -> list[Head]:
        """Every (layer, head), best validation accuracy first; ties go to the lower layer, then head."""
        L, H = self.shape
        acc = self.val_acc.double().numpy()
        return sorted(((l, h) for l in range(L) for h in range(H)), key=lambda lh: (-acc[lh], lh[0], lh[1]))

    def top(self, k: int) -> HeadSet:
        """The k best heads as a HeadSet named ``top{k}``."""
        return HeadSet.top(self.ranking(), k)

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write probe_accuracy.csv, probe_heatmap.png, ranking.json, probes.safetensors, probe_meta.json."""
        from safetensors.torch import save_file

        from locaudit.localize.plots import plot_probe_heatmap

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        L, H = self.shape
        lines = ["layer,head,train_acc,val_acc"] + [
            f"{l},{h},{float(self.train_acc[l, h]):.6f},{float(self.val_acc[l, h]):.6f}"
            for l in range(L) for h in range(H)]
        write_text_atomic(out / ACCURACY_FILE, "\n".join(lines) + "\n")
        write_json_atomic(out / RANKING_FILE, [
            {"rank": r, "layer": l, "head": h, "name": f"L{l}H{h}", "val_acc": float(self.val_acc[l, h]),
             "train_acc": float(self.train_acc[l, h])} for r, (l, h) in enumerate(self.ranking(), 1)])
        with atomic_path(out / WEIGHTS_FILE) as tmp:
            save_file({"weight": self.weight.float().contiguous(), "bias": self.bias.float().contiguous(),
                       "train_acc": self.train_acc.float().contiguous(), "val_acc": self.val_acc.float().contiguous()},
                      str(tmp))
        write_json_atomic(out / META_FILE, self.meta)
        plot_probe_heatmap(self.val_acc, out / HEATMAP_FILE, title=self.meta.get("title") or f"probe validation accuracy: {self.meta.get('model', '')}".rstrip(": "),
                           mark_top=min(int(self.meta.get("top_k", 16)), L * H))
        return out

    @classmethod
    def load(cls, in_dir: str | os.PathLike) -> "ProbeResult":
        """Read a folder written by `save`."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        d = Path(in_dir)
        for name in (WEIGHTS_FILE, ACCURACY_FILE):
            if not (d / name).exists():
                raise DataError(f"probe folder {d} is missing {name} (run `locaudit probe` first)")
        try:
            t = load_file(str(d / WEIGHTS_FILE))
        except (SafetensorError, OSError) as e:
            raise DataError(f"{d / WEIGHTS_FILE}: cannot read ({e})") from e
        for key in ("weight", "bias", "train_acc", "val_acc"):
            if key not in t:
                raise DataError(f"{d / WEIGHTS_FILE}: missing tensor {key!r}")
        meta = json.loads((d / META_FILE).read_text()) if (d / META_FILE).exists() else {}
        return cls(t["train_acc"], t["val_acc"], t["weight"], t["bias"], meta)


def _check_inputs(X: torch.Tensor, y: torch.Tensor, train_idx, val_idx) -> tuple[torch.Tensor, torch.Tensor]:
    if X.dim() != 4:
        raise DataError(f"probe features must be [N, L, H, D]; got shape {list(X.shape)}")
    y = torch.as_tensor(y)
    if y.dim() != 1 or y.shape[0] != X.shape[0]:
        raise DataError(f"labels have shape {list(y.shape)} but there are {X.shape[0]} examples (need [N])")
    bad = ~((y == 0) | (y == 1))
    if bad.any():
        i = int(bad.nonzero()[0])
        raise DataError(f"labels[{i}] = {y[i].item()!r}: probe labels must be 0 or 1")
    idx = []
    for name, ix in (("train", train_idx), ("val", val_idx)):
        ix = torch.as_tensor(ix, dtype=torch.long).reshape(-1)
        if ix.numel() == 0:
            raise DataError(f"the {name} split is empty: probing needs examples in both train and val")
        if int(ix.min()) < 0 or int(ix.max()) >= X.shape[0]:
            raise DataError(f"{name}_idx has an index outside 0..{X.shape[0] - 1}")
        idx.append(ix)
    if len(set(y[idx[0]].tolist())) < 2:
        raise DataError("the train split has a single label: a probe needs both correct and incorrect examples")
    return idx[0], idx[1]


def _newton(Xa: torch.Tensor, y: torch.Tensor, l2: float, max_iter: int, tol: float) -> tuple[torch.Tensor, int]:
    """Minimise sum logloss + l2/2 |w[:-1]|^2 for P problems at once.

    Xa: Float[Tensor, "P n D+1"] (last column ones); y: Float[Tensor, "n"]. Returns (w [P, D+1], iterations).
    """
    P, n, K = Xa.shape
    reg = torch.full((K,), float(l2), dtype=torch.float64)
    reg[-1] = 0.0
    w = torch.zeros(P, K, dtype=Xa.dtype)
    XaT = Xa.transpose(1, 2)

    def objective(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # z [..., P, n], w [..., P, K]
        return (F.softplus(z) - y * z).double().sum(-1) + 0.5 * (w.double() ** 2 * reg).sum(-1)

    z = torch.zeros(P, n, dtype=Xa.dtype)
    f = objective(z, w)
    it, prev = 0, float("inf")
    for it in range(1, max_iter + 1):
        p = torch.sigmoid(z)
        grad = torch.bmm(XaT, (p - y).unsqueeze(-1)).squeeze(-1).double() + reg * w.double()
        s = p * (1 - p)
        hess = torch.bmm(XaT * s.unsqueeze(1), Xa).double() + torch.diag(reg + 1e-10 * n)
        chol, info = torch.linalg.cholesky_ex(hess)
        if bool(info.any()):  # not positive definite in float precision: add a ridge where needed
            hess = hess + (info > 0).double()[:, None, None] * 1e-6 * torch.eye(K, dtype=torch.float64) * n
            chol, _ = torch.linalg.cholesky_ex(hess)
        dw = -torch.cholesky_solve(grad.unsqueeze(-1), chol).squeeze(-1)
        decrement = -(grad * dw).sum(-1)  # Newton decrement^2 >= 0
        rel = float((decrement / (1.0 + f.abs())).max())
        if rel <= tol or (rel < 1e-5 and rel >= 0.5 * prev):  # converged, or stalled at the float floor
            break
        prev = rel
        dz = torch.bmm(Xa, dw.to(Xa.dtype).unsqueeze(-1)).squeeze(-1)
        steps = _STEPS.to(Xa.dtype)
        w_t = w.unsqueeze(0) + steps[:, None, None] * dw.to(Xa.dtype).unsqueeze(0)  # [S, P, K]
        z_t = z.unsqueeze(0) + steps[:, None, None] * dz.unsqueeze(0)  # [S, P, n]
        f_t = objective(z_t, w_t)  # [S, P]
        ok = f_t <= f.unsqueeze(0) - 1e-4 * steps.double()[:, None] * decrement.unsqueeze(0)
        first = torch.where(ok.any(0), ok.double().argmax(0), torch.full((P,), -1))
        take = first >= 0  # problems with no acceptable step are at their optimum in float precision
        j = first.clamp(min=0)
        ar = torch.arange(P)
        w = torch.where(take[:, None], w_t[j, ar], w)
        z = torch.where(take[:, None], z_t[j, ar], z)
        f = torch.where(take, f_t[j, ar], f)
        if not bool(take.any()):
            break
    return w, it


def train_probes(
    X: Float[Tensor, "N layer head head_dim"],
    y: Shaped[Tensor, "N"] | Sequence[int],
    train_idx: torch.Tensor | Sequence[int],
    val_idx: torch.Tensor | Sequence[int],
    l2: float = 1.0,
    max_iter: int = 50,
    standardize: bool = False,
    tol: float | None = None,
    heads_per_chunk: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> ProbeResult:
    """Fit one logistic-regression probe per head on `train_idx` rows and score both splits.

    X: Float[Tensor, "N layer head head_dim"], y: Long[Tensor, "N"] (0/1). `l2` = 1/C of scikit-learn
    (penalty l2/2 |w|^2 on the summed log-loss; default 1.0 = sklearn's default C = 1, as ITI uses).
    `standardize` fits on train-standardised features (weights are mapped back to the raw space).
    Heads are processed in chunks of `heads_per_chunk` (default: ~1 GB of features per chunk).
    """
    if l2 <= 0:
        raise DataError(f"l2={l2}: must be > 0 (C = 1/l2)")
    if max_iter < 1:
        raise DataError(f"max_iter={max_iter}: must be >= 1")
    tr, va = _check_inputs(X, torch.as_tensor(y), train_idx, val_idx)
    y = torch.as_tensor(y)
    N, L, H, D = X.shape
    P = L * H
    n = tr.numel()
    if tol is None:  # relative Newton decrement; float32 stalls near 1e-8
        tol = 1e-7 if dtype == torch.float32 else 1e-12
    if heads_per_chunk is None:
        heads_per_chunk = max(1, int(1e9 // max(1, n * (D + 1) * 4 * 3)))
    y_tr = y[tr].to(dtype)
    y_va = y[va]
    weight = torch.zeros(P, D)
    bias = torch.zeros(P)
    train_acc = torch.zeros(P, dtype=torch.float64)
    val_acc = torch.zeros(P, dtype=torch.float64)
    iters = 0
    for s in range(0, P, heads_per_chunk):
        e = min(P, s + heads_per_chunk)
        Xtr = X[tr].reshape(n, P, D)[:, s:e].to(dtype).permute(1, 0, 2)  # [p, n, D]
        if standardize:
            mu = Xtr.mean(1, keepdim=True)
            sd = Xtr.std(1, keepdim=True, unbiased=False).clamp_min(1e-8)
            Xs = (Xtr - mu) / sd
        else:
            Xs = Xtr
        Xa = torch.cat([Xs, torch.ones(e - s, n, 1, dtype=dtype)], dim=-1).contiguous()
        w, it = _newton(Xa, y_tr, l2, max_iter, tol)
        iters = max(iters, it)
        wd, b = w[:, :D].float(), w[:, D].float()
        if standardize:
            wd = wd / sd.squeeze(1).float()
            b = b - (wd * mu.squeeze(1).float()).sum(-1)
        weight[s:e], bias[s:e] = wd, b
        train_acc[s:e] = _accuracy(Xtr.float(), wd, b, y[tr])
        Xva = X[va].reshape(va.numel(), P, D)[:, s:e].float().permute(1, 0, 2)
        val_acc[s:e] = _accuracy(Xva, wd, b, y_va)
    meta = {"l2": l2, "C": 1.0 / l2, "standardize": standardize, "n_train": n, "n_val": int(va.numel()),
            "max_iter": max_iter, "iterations": iters, "shape": [L, H, D]}
    return ProbeResult(train_acc.view(L, H).float(), val_acc.view(L, H).float(), weight.view(L, H, D),
                       bias.view(L, H), meta)


def _accuracy(Xp: torch.Tensor, w: torch.Tensor, b: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Xp [p, n, D], w [p, D], b [p] -> Float64[Tensor, "p"]: fraction with (logit > 0) == y."""
    logits = torch.bmm(Xp, w.unsqueeze(-1)).squeeze(-1) + b.unsqueeze(-1)
    return ((logits > 0).long() == y.long().unsqueeze(0)).double().mean(-1)


def probe_activations(acts, l2: float = 1.0, max_iter: int = 50, standardize: bool = False,
                      train_split: str = "train", val_split: str = "val") -> ProbeResult:
    """Train probes on an ActivationSet's question-level train split, score on its val split."""
    tr, va = acts.indices(train_split), acts.indices(val_split)
    for name, ix in ((train_split, tr), (val_split, va)):
        if ix.numel() == 0:
            where = f" in {acts.path}" if acts.path is not None else ""
            raise DataError(f"no examples have split {name!r}{where}; probing needs both {train_split!r} and {val_split!r}")
    overlap = {acts.examples[i]["qid"] for i in tr.tolist()} & {acts.examples[i]["qid"] for i in va.tolist()}
    if overlap:
        raise DataError(f"{len(overlap)} questions straddle the {train_split!r} and {val_split!r} splits "
                        f"(e.g. qid {sorted(overlap)[0]!r}); splits must be by question")
    _check_finite(acts)
    res = train_probes(acts.heads, acts.labels, tr, va, l2=l2, max_iter=max_iter, standardize=standardize)
    res.meta.update({k: acts.meta.get(k) for k in ("model", "model_fingerprint", "data", "data_fingerprint", "format")
                     if k in acts.meta})
    if acts.path is not None:
        res.meta["activations"] = str(acts.path)
    return res


def _check_finite(acts) -> None:
    """Refuse activations with NaN/inf (a probe on them gives meaningless accuracies), naming the file."""
    X = acts.heads
    for s in range(0, X.shape[0], 256):
        ok = torch.isfinite(torch.as_tensor(X[s: s + 256])).flatten(1).all(1)
        if not ok.all():
            row = s + int(torch.nonzero(~ok)[0])
            where = f"{acts.path}/activations.safetensors" if getattr(acts, "path", None) is not None else "activations"
            raise DataError(f"{where}: non-finite values (NaN/inf) in example {row}; collect the activations again")


def read_accuracy_csv(path: str | os.PathLike) -> list[dict]:
    """Rows of a probe_accuracy.csv (layer, head, train_acc, val_acc) with a clear error on a bad row."""
    rows = []
    for lineno, row in csv_records(path, ("layer", "head", "train_acc", "val_acc")):
        try:
            rows.append({"layer": int(row["layer"]), "head": int(row["head"]),
                         "train_acc": float(row["train_acc"]), "val_acc": float(row["val_acc"])})
        except (TypeError, ValueError) as e:
            raise DataError(f"{path} line {lineno}: {e}") from e
    return rows


__all__ = ["ProbeResult", "train_probes", "probe_activations", "read_accuracy_csv"]
