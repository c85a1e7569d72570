"""`HeadEffects`: one causal localizer's result, an effect per (layer, head) with its standard error.

Written by activation patching (`localize/patching.py`) and attribution patching
(`localize/attribution.py`). Sign convention for both: a positive effect means the head's *clean*
value pushes the metric (default: the preference log-ratio) towards the clean behaviour. Heads are
ranked by |effect| (default) or by the signed effect, best first; heads that were not computed
(a patching run restricted to some heads) have NaN effects and rank last.

Files (`save(dir)` / `load(dir)`):
- ``effects.csv``: layer, head, effect, se, n, rank and any extra per-head scores (e.g. graddrop);
- ``ranking.json``: every head best first (rank, layer, head, name, effect, se);
- ``effects_heatmap.png``: layers x heads heatmap of the effect, the top-K outlined;
- ``effects.safetensors``: tensors ``effect``, ``se`` [L, H], ``per_example`` [n, L, H] when kept, extras;
- ``meta.json``: method, corruption, metric, model/data fingerprints, precision, figures (written last).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from locaudit.errors import DataError
from locaudit.heads import Head, HeadSet
from locaudit.io import atomic_path, write_json_atomic, write_text_atomic, csv_records

EFFECTS_CSV = "effects.csv"
RANKING_FILE = "ranking.json"
HEATMAP_FILE = "effects_heatmap.png"
TENSORS_FILE = "effects.safetensors"
META_FILE = "meta.json"
RANK_BY = ("abs", "signed")


@dataclass
class HeadEffects:
    """effect, se: Float[Tensor, "layer head"]; n: examples averaged; method: "patching" | "attribution";
    per_example: Float[Tensor, "n layer head"] or None; extra: other per-head scores [L, H] by name."""

    effect: torch.Tensor
    se: torch.Tensor
    n: int
    method: str
    meta: dict = field(default_factory=dict)
    per_example: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.effect.dim() != 2 or self.se.shape != self.effect.shape:
            raise DataError(f"HeadEffects: effect {list(self.effect.shape)} and se {list(self.se.shape)} must both "
                            "be [layers, heads]")
        if self.per_example is not None and tuple(self.per_example.shape[1:]) != tuple(self.effect.shape):
            raise DataError(f"HeadEffects: per_example {list(self.per_example.shape)} does not match "
                            f"effect {list(self.effect.shape)}")
        for k, v in self.extra.items():
            if tuple(v.shape) != tuple(self.effect.shape):
                raise DataError(f"HeadEffects: extra score {k!r} has shape {list(v.shape)}, expected "
                                f"{list(self.effect.shape)}")

    @classmethod
    def from_per_example(cls, per_example: torch.Tensor, method: str, meta: dict | None = None,
                         extra: dict[str, torch.Tensor] | None = None, keep: bool = True) -> "HeadEffects":
        """Mean and standard error (std with ddof=1 over sqrt(n)) over examples of Float[n, L, H] effects."""
        x = per_example.double()
        n = int(x.shape[0])
        mean = x.mean(0)
        se = x.std(0, unbiased=True) / math.sqrt(n) if n > 1 else torch.full_like(mean, float("nan"))
        return cls(mean.float(), se.float(), n, method, dict(meta or {}), per_example.float() if keep else None,
                   dict(extra or {}))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.effect.shape)  # type: ignore[return-value]

    @property
    def rank_by(self) -> str:
        return str(self.meta.get("rank_by", "abs"))

    def score(self, rank_by: str | None = None) -> torch.Tensor:
        """Float[Tensor, "layer head"]: what the ranking sorts by (|effect| or effect); NaN where not computed."""
        rb = rank_by or self.rank_by
        if rb not in RANK_BY:
            raise DataError(f"rank_by={rb!r}: expected one of {RANK_BY}")
        return self.effect.abs() if rb == "abs" else self.effect

    def ranking(self, rank_by: str | None = None) -> list[Head]:
        """Every (layer, head), best first; ties by lower layer, then head; NaN (not computed) last."""
        s = self.score(rank_by).double()
        L, H = self.shape

        def key(lh: Head):
            v = float(s[lh])
            return (math.isnan(v), -v if not math.isnan(v) else 0.0, lh[0], lh[1])

        return sorted(((l, h) for l in range(L) for h in range(H)), key=key)

    def top(self, k: int, rank_by: str | None = None) -> HeadSet:
        """The k best heads as a HeadSet named ``top{k}``."""
        return HeadSet.top(self.ranking(rank_by), k)

    # ------------------------------------------------------------------ files
    def save(self, out_dir: str | os.PathLike, top_k: int | None = None) -> Path:
        """Write effects.csv, ranking.json, effects_heatmap.png, effects.safetensors and meta.json (last)."""
        from safetensors.torch import save_file

        from locaudit.localize.plots import plot_head_heatmap

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        L, H = self.shape
        ranking = self.ranking()
        rank_of = {lh: r for r, lh in enumerate(ranking, 1)}
        names = sorted(self.extra)
        lines = [",".join(["layer", "head", "effect", "se", "n", "rank", *names])]
        for l in range(L):
            for h in range(H):
                vals = [_fmt(self.effect[l, h]), _fmt(self.se[l, h]), str(self.n), str(rank_of[(l, h)])]
                vals += [_fmt(self.extra[k][l, h]) for k in names]
                lines.append(",".join([str(l), str(h), *vals]))
        write_text_atomic(out / EFFECTS_CSV, "\n".join(lines) + "\n")
        write_json_atomic(out / RANKING_FILE, [
            {"rank": r, "layer": l, "head": h, "name": f"L{l}H{h}", "effect": float(self.effect[l, h]),
             "se": float(self.se[l, h]), **{k: float(self.extra[k][l, h]) for k in names}}
            for r, (l, h) in enumerate(ranking, 1)])
        tensors = {"effect": self.effect.float().contiguous(), "se": self.se.float().contiguous()}
        if self.per_example is not None:
            tensors["per_example"] = self.per_example.float().contiguous()
        for k in names:
            tensors[f"extra.{k}"] = self.extra[k].float().contiguous()
        with atomic_path(out / TENSORS_FILE) as tmp:
            save_file(tensors, str(tmp))
        k = int(top_k if top_k is not None else self.meta.get("top_k", 16))
        title = self.meta.get("title") or f"{self.method} effect: {self.meta.get('model', '')}".rstrip(": ")
        finite = torch.isfinite(self.effect)
        plot_head_heatmap(self.effect, out / HEATMAP_FILE, title=title, label=str(self.meta.get("metric_label",
                          "effect on the metric")), mark=ranking[: min(k, int(finite.sum()))], diverging=True)
        meta = dict(self.meta)
        meta.update(method=self.method, n=self.n, shape=[L, H], rank_by=self.rank_by)
        write_json_atomic(out / META_FILE, meta)
        return out

    @classmethod
    def load(cls, in_dir: str | os.PathLike) -> "HeadEffects":
        """Read a folder written by `save` (the safetensors file, else effects.csv)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        d = Path(in_dir)
        if not (d / META_FILE).exists():
            raise DataError(f"effects folder {d} has no {META_FILE} (not written by `locaudit localize`, or "
                            "interrupted)")
        try:
            meta = json.loads((d / META_FILE).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{d / META_FILE}: not valid JSON ({e})") from e
        for key in ("method", "n", "shape"):
            if key not in meta:
                raise DataError(f"{d / META_FILE}: missing field {key!r}")
        L, H = (int(x) for x in meta["shape"])
        if (d / TENSORS_FILE).exists():
            try:
                t = load_file(str(d / TENSORS_FILE))
            except (SafetensorError, OSError) as e:
                raise DataError(f"{d / TENSORS_FILE}: cannot read ({e})") from e
            for key in ("effect", "se"):
                if key not in t:
                    raise DataError(f"{d / TENSORS_FILE}: missing tensor {key!r}")
            extra = {k[len("extra."):]: v for k, v in t.items() if k.startswith("extra.")}
            return cls(t["effect"], t["se"], int(meta["n"]), str(meta["method"]), meta, t.get("per_example"), extra)
        return cls(*_read_csv(d / EFFECTS_CSV, L, H), int(meta["n"]), str(meta["method"]), meta)


def _fmt(x: torch.Tensor) -> str:
    v = float(x)
    return "" if not math.isfinite(v) else f"{v:.8g}"


def _read_csv(path: Path, L: int, H: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not path.exists():
        raise DataError(f"effects folder {path.parent} is missing {EFFECTS_CSV} and {TENSORS_FILE}")
    eff = torch.full((L, H), float("nan"))
    se = torch.full((L, H), float("nan"))
    for lineno, row in csv_records(path, ("layer", "head", "effect", "se")):
        try:
            l, h = int(row["layer"]), int(row["head"])
            eff[l, h] = float(row["effect"]) if row["effect"] else float("nan")
            se[l, h] = float(row["se"]) if row["se"] else float("nan")
        except (ValueError, IndexError) as e:
            raise DataError(f"{path} line {lineno}: {e}") from e
    return eff, se


__all__ = ["HeadEffects", "RANK_BY"]
