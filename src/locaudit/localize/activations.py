"""Every head's output at one token per text: a tensor [N, L, H, D], collected in batches.

Head outputs are the INPUT of each layer's o_proj (split into heads), read by forward pre-hooks.
Texts are sorted by length and right-padded, so each batch pads little and the real tokens see the
same computation as alone; each text's row is gathered at its own last real token (or a chosen one).
After the last layer's o_proj has been read the forward is stopped, skipping the last MLP and the
LM head (a large share of a small model's compute). Rows are streamed into a memory-mapped
safetensors file when one is given, so only the [N, L, H, D] result ever exists, and on disk.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from locaudit.errors import DataError
from locaudit.io import atomic_path, cache_dir, read_jsonl, stable_hash, write_json_atomic, write_text_atomic
from locaudit.localize.store import create_tensor_file, open_tensor
from locaudit.models.batching import length_sorted_batches, pad_id, pad_right
from locaudit.models.interventions import capture
from locaudit.models.precision import ResolvedPrecision, require_resolved

ACTIVATIONS_FILE = "activations.safetensors"
EXAMPLES_FILE = "examples.jsonl"
META_FILE = "meta.json"
FORMAT_VERSION = 1


def tokenize_texts(tokenizer, texts: Sequence[str], max_length: int = 512,
                   add_special_tokens: bool = True) -> tuple[list[list[int]], list[int]]:
    """Token ids of each text, cut from the left to `max_length` (the end matters); also the number cut."""
    ids = tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]
    out, cut = [], []
    for i, row in enumerate(ids):
        if len(row) == 0:
            raise DataError(f"text {i} ({texts[i][:40]!r}) has no tokens")
        c = max(0, len(row) - max_length)
        out.append(list(row[c:]))
        cut.append(c)
    return out, cut


def _resolve_positions(positions: str | Sequence[int], lengths: list[int], cut: list[int]) -> list[int]:
    """Absolute token index per text: 'last' = last real token; ints index the text's tokens
    (negative from its end, non-negative from its start before any left truncation)."""
    n = len(lengths)
    if isinstance(positions, str):
        if positions != "last":
            raise DataError(f"positions={positions!r}: expected 'last' or one token index per text")
        return [m - 1 for m in lengths]
    positions = list(positions)
    if len(positions) != n:
        raise DataError(f"positions has {len(positions)} entries but there are {n} texts (one index per text)")
    out = []
    for i, (p, m, c) in enumerate(zip(positions, lengths, cut)):
        p = int(p)
        a = m + p if p < 0 else p - c
        if not 0 <= a < m:
            raise DataError(f"positions[{i}] = {p} is outside text {i}'s {m + c} tokens"
                            + (f" ({c} cut by max_length)" if c else ""))
        out.append(a)
    return out


def collect_activations(
    lm,
    texts: Sequence[str],
    batch_size: int = 16,
    positions: str | Sequence[int] = "last",
    *,
    out_path: str | os.PathLike | None = None,
    precision: ResolvedPrecision,
    max_length: int = 512,
    add_special_tokens: bool = True,
    stop_early: bool = True,
    progress: bool = True,
) -> Float[Tensor, "N layer head head_dim"]:
    """Float[Tensor, "N layer head head_dim"]: each text's head outputs (o_proj inputs) at one token.

    `out_path`: stream rows into this safetensors file (tensor ``heads``, F32) and return a memory map
    of it; else the result is built in memory. `precision` (None/"fp32", "bf16", "auto", ...;
    models/precision.py) is the forward's compute precision; the result is float32 either way. `stop_early` ends the forward after the last
    layer's o_proj (same values, less compute).
    """
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size}: must be >= 1")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise DataError(f"texts[{i}] is a {type(t).__name__}, not a str")
    sites = lm.sites
    L, H, D = sites.shape
    N = len(texts)
    ids, cut = tokenize_texts(lm.tokenizer, texts, max_length, add_special_tokens) if N else ([], [])
    lengths = [len(r) for r in ids]
    pos = _resolve_positions(positions, lengths, cut)

    if out_path is not None:
        result: Any = create_tensor_file(out_path, "heads", (N, L, H, D), {"format": "locaudit.activations"})
    else:
        result = torch.zeros(N, L, H, D)

    device = lm.device
    pad = pad_id(lm.tokenizer)
    amp = require_resolved(precision, "activations").compute(lm.model, lm.dtype)
    bar = tqdm(total=N, desc="collect activations", unit="ex", disable=not progress or N == 0, leave=False)
    try:
        with torch.inference_mode(), capture(sites, "heads", range(L), "all", stop=stop_early,
                                             dtype=torch.float32) as cap, amp:
            for idx in length_sorted_batches(lengths, batch_size):  # longest first: memory peaks at once
                B = len(idx)
                input_ids, att = pad_right([ids[i] for i in idx], pad)
                cap.forward(lm.model, input_ids.to(device), att.to(device),
                            positions=torch.tensor([pos[i] for i in idx], device=device))
                rows = torch.stack([cap.values[l] for l in range(L)], 1).view(B, L, H, D).cpu()
                if isinstance(result, torch.Tensor):
                    result[idx] = rows
                else:
                    result[np.asarray(idx)] = rows.numpy()
                bar.update(B)
    finally:
        bar.close()
    if isinstance(result, torch.Tensor):
        return result
    result.flush()
    del result
    return torch.from_numpy(open_tensor(out_path, "heads"))


@dataclass
class ActivationSet:
    """Head activations with one example record per row.

    `heads`: Float[Tensor, "N layer head head_dim"]; `examples`: dicts with qid, text, label, split;
    `meta`: model name and fingerprint, data fingerprint, prompt format, shape, dtype.
    """

    heads: torch.Tensor
    examples: list[dict]
    meta: dict = field(default_factory=dict)
    path: Path | None = None  # the folder it was loaded from or saved to

    def __post_init__(self) -> None:
        if self.heads.dim() != 4:
            raise DataError(f"ActivationSet.heads must be [N, L, H, D]; got shape {list(self.heads.shape)}")
        if len(self.examples) != self.heads.shape[0]:
            raise DataError(f"ActivationSet: {len(self.examples)} examples but {self.heads.shape[0]} activation rows")

    def __len__(self) -> int:
        return int(self.heads.shape[0])

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.heads.shape)  # type: ignore[return-value]

    @property
    def labels(self) -> torch.Tensor:
        """Long[Tensor, "N"]"""
        return torch.tensor([int(e["label"]) for e in self.examples], dtype=torch.long)

    def indices(self, split: str) -> torch.Tensor:
        """Long[Tensor, "n"]: rows whose example is in `split` (train/val/test)."""
        return torch.tensor([i for i, e in enumerate(self.examples) if e.get("split") == split], dtype=torch.long)

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write activations.safetensors, examples.jsonl and meta.json (each atomically; meta.json last)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        target = out / ACTIVATIONS_FILE
        if self.path is None or Path(self.path).resolve() != out.resolve() or not target.exists():
            with atomic_path(target) as tmp:
                arr = create_tensor_file(tmp, "heads", self.shape, {"format": "locaudit.activations"})
                for s in range(0, len(self), 1024):
                    arr[s: s + 1024] = self.heads[s: s + 1024].float().cpu().numpy()
                if isinstance(arr, np.memmap):
                    arr.flush()
                del arr
        write_text_atomic(out / EXAMPLES_FILE, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in self.examples))
        meta = dict(self.meta)
        meta.update(shape=list(self.shape), dtype="float32", format_version=FORMAT_VERSION)
        write_json_atomic(out / META_FILE, meta)
        self.path = out
        return out

    @classmethod
    def load(cls, in_dir: str | os.PathLike) -> "ActivationSet":
        """Read a folder written by `save` (the activations stay memory-mapped)."""
        d = Path(in_dir)
        if not d.is_dir():
            raise DataError(f"activation folder {d} does not exist (run `locaudit collect` first)")
        for name in (ACTIVATIONS_FILE, EXAMPLES_FILE, META_FILE):
            if not (d / name).exists():
                raise DataError(f"activation folder {d} is missing {name} (an interrupted `locaudit collect`?)")
        try:
            meta = json.loads((d / META_FILE).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{d / META_FILE}: not valid JSON ({e})") from e
        examples = []
        for lineno, ex in read_jsonl(d / EXAMPLES_FILE):
            for key in ("qid", "label", "split"):
                if not isinstance(ex, dict) or key not in ex:
                    raise DataError(f"{d / EXAMPLES_FILE}:{lineno}: missing field {key!r}")
            if ex["label"] not in (0, 1):
                raise DataError(f"{d / EXAMPLES_FILE}:{lineno}: field 'label' = {ex['label']!r}, expected 0 or 1")
            examples.append(ex)
        heads = torch.from_numpy(open_tensor(d / ACTIVATIONS_FILE, "heads"))
        if "shape" in meta and list(meta["shape"]) != list(heads.shape):
            raise DataError(f"{d / META_FILE}: shape {meta['shape']} but {ACTIVATIONS_FILE} holds {list(heads.shape)}")
        if len(examples) != heads.shape[0]:
            raise DataError(f"{d}: {EXAMPLES_FILE} has {len(examples)} records but {ACTIVATIONS_FILE} has "
                            f"{heads.shape[0]} rows")
        return cls(heads, examples, meta, d)


def activation_key(lm, data_fingerprint: str, fmt, positions: str = "last", max_length: int = 512,
                   *, precision: ResolvedPrecision) -> str:
    """Cache key: model content, data content, prompt format, token positions and numerics."""
    return stable_hash({
        "model": lm.fingerprint, "model_dtype": str(lm.dtype), "data": data_fingerprint,
        "format": [fmt.kind, fmt.system], "positions": positions, "max_length": max_length,
        "precision": require_resolved(precision, "activations").key, "version": FORMAT_VERSION,
    })


def _copy_folder(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in (ACTIVATIONS_FILE, EXAMPLES_FILE, META_FILE):  # meta.json last: it marks completion
        target = dst / name
        if target.exists() and target.resolve() == (src / name).resolve():
            continue
        with atomic_path(target) as tmp:
            tmp.unlink()
            try:
                os.link(src / name, tmp)
            except OSError:
                shutil.copyfile(src / name, tmp)


def collect_probe_activations(
    lm,
    data,
    fmt,
    out_dir: str | os.PathLike | None = None,
    cache: bool = True,
    *,
    batch_size: int = 16,
    precision: ResolvedPrecision,
    max_length: int = 512,
    progress: bool = True,
) -> ActivationSet:
    """Head activations of every probe example of `data` (a BehaviourData) at its last token.

    Cached under cache_dir("activations", key) with key = (model fingerprint, data fingerprint, format,
    positions, numerics): a second call reads the cache. `out_dir` also receives the three files.
    """
    from locaudit.data.prompts import PromptFormat

    if isinstance(fmt, str):
        fmt = PromptFormat(fmt)
    prec = require_resolved(precision, "activations")
    key = activation_key(lm, data.fingerprint, fmt, "last", max_length, precision=prec)
    target = cache_dir("activations", key) if cache else Path(out_dir) if out_dir is not None else None
    if target is None:
        raise DataError("collect_probe_activations: cache=False needs an out_dir to write to")
    if cache and (target / META_FILE).exists():
        try:
            acts = ActivationSet.load(target)
            if acts.meta.get("key") == key:
                if out_dir is not None:
                    _copy_folder(target, Path(out_dir))
                    acts = ActivationSet.load(out_dir)
                return acts
        except DataError:
            pass  # a damaged cache entry is rebuilt below
    target.mkdir(parents=True, exist_ok=True)
    (target / META_FILE).unlink(missing_ok=True)  # incomplete until meta.json is written again

    from locaudit.data.probing import probe_text

    exs = list(data.probe_examples())
    if not exs:
        raise DataError(f"data {data.name!r} has no probe examples")
    split_of = getattr(data, "split_of", {})
    examples = [{"qid": e.qid, "text": probe_text(e, fmt, lm.tokenizer), "label": int(e.label),
                 "split": split_of.get(e.qid, e.split)} for e in exs]
    with atomic_path(target / ACTIVATIONS_FILE) as tmp:
        heads = collect_activations(lm, [e["text"] for e in examples], batch_size, out_path=tmp,
                                    precision=prec, max_length=max_length, progress=progress)
        del heads
    heads = torch.from_numpy(open_tensor(target / ACTIVATIONS_FILE, "heads"))
    meta = {"key": key, "model": lm.name, "model_fingerprint": lm.fingerprint, "model_dtype": str(lm.dtype),
            "data": data.name, "data_fingerprint": data.fingerprint, "data_source": getattr(data, "source", {}),
            "format": fmt.kind, "system": fmt.system,
            "positions": "last", "max_length": max_length, **prec.meta(),
            "n_layers": lm.sites.n_layers, "n_heads": lm.sites.n_heads, "head_dim": lm.sites.head_dim}
    acts = ActivationSet(heads, examples, meta, target)
    acts.save(target)
    if out_dir is not None and cache:
        _copy_folder(target, Path(out_dir))
        acts = ActivationSet.load(out_dir)
    return acts
