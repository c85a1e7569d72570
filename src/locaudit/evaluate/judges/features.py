"""Frozen-LM features of (question, answer) pairs for the trained judges, cached on disk by content.

Text: "Q: {question}\\nA:" + " {answer}" (the plain prompt format, tokenized as models.scoring does).
Per chosen layer (residual stream after that decoder layer): the mean over the answer's tokens and
the answer's last token. The forward pass stops after the deepest chosen layer.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from locaudit.errors import ConfigError
from locaudit.io import cache_dir, stable_hash
from locaudit.models.batching import pad_id
from locaudit.models.interventions import capture
from locaudit.models.loading import LoadedModel
from locaudit.models.precision import PrecisionLike, as_precision
from locaudit.models.scoring import collate_completions, encode_completions

log = logging.getLogger(__name__)
POOLS = ("mean", "last")


def pair_key(question: str, answer: str) -> str:
    h = hashlib.sha256()
    for part in (question, answer):
        b = part.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:32]


class PairEncoder:
    """`encode(questions, answers) -> Float[Tensor, "N layer pool d"]` (pool: mean, last), batched,
    length-sorted, at `precision` (models/precision.py; features are stored as fp16 on disk)."""

    def __init__(self, lm: LoadedModel, layers: Sequence[int], batch_size: int = 32, max_length: int = 256,
                 precision: PrecisionLike = "auto", cache: str | Path | None | bool = None) -> None:
        n = lm.sites.n_layers
        layers = tuple(int(l) if int(l) >= 0 else n + int(l) for l in layers)
        bad = [l for l in layers if not 0 <= l < n]
        if bad or not layers:
            raise ConfigError(f"feature layers {list(layers)} must be non-empty and in [0, {n - 1}] for {lm.name}")
        self.lm = lm
        self.layers = tuple(sorted(set(layers)))
        self.batch_size = batch_size
        self.max_length = max_length
        self.precision = as_precision(precision, lm.device)
        self.key = stable_hash({"model": lm.fingerprint, "layers": self.layers, "max_length": max_length,
                                "precision": self.precision.key, "text": "plain-v1"})
        if cache is False:
            self.db_path = None
        else:
            self.db_path = Path(cache) if cache not in (None, True) else cache_dir("judge_features") / f"{self.key}.sqlite"
        self._con = None

    @property
    def dim(self) -> tuple[int, int, int]:
        return len(self.layers), len(POOLS), self.lm.sites.d_model

    def _db(self) -> sqlite3.Connection | None:
        if self.db_path is None:
            return None
        if self._con is None:
            self.db_path.parent.mkdir(parents=True, exist_ok=True)
            self._con = sqlite3.connect(self.db_path, timeout=60.0)
            self._con.execute("PRAGMA journal_mode=WAL")
            self._con.execute("CREATE TABLE IF NOT EXISTS feats (key TEXT PRIMARY KEY, vec BLOB NOT NULL)")
        return self._con

    def encode(self, questions: Sequence[str], answers: Sequence[str], progress: bool = True,
               desc: str = "judge features") -> torch.Tensor:
        if len(questions) != len(answers):
            raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
        keys = [pair_key(q, a) for q, a in zip(questions, answers)]
        shape = self.dim
        found: dict[str, np.ndarray] = {}
        con = self._db()
        uniq = list(dict.fromkeys(keys))
        if con is not None:
            for s in range(0, len(uniq), 500):
                chunk = uniq[s: s + 500]
                rows = con.execute(f"SELECT key, vec FROM feats WHERE key IN ({','.join('?' * len(chunk))})", chunk)
                for k, blob in rows:
                    found[k] = np.frombuffer(blob, dtype=np.float16).reshape(shape)
        todo = {}
        for k, q, a in zip(keys, questions, answers):
            if k not in found and k not in todo:
                todo[k] = (q, a)
        if todo:
            items = list(todo.items())
            bar = tqdm(total=len(items), desc=desc, disable=not progress or len(items) < 2 * self.batch_size)
            for vecs, ks in self._forward(items, bar):
                for k, v in zip(ks, vecs):
                    found[k] = v
                if con is not None:
                    with con:
                        con.executemany("INSERT OR REPLACE INTO feats (key, vec) VALUES (?, ?)",
                                        [(k, v.tobytes()) for k, v in zip(ks, vecs)])
            bar.close()
        return torch.from_numpy(np.stack([found[k] for k in keys]).astype(np.float32)) if keys else torch.empty(0, *shape)

    def _forward(self, items, bar):
        """Yields (fp16 arrays [b, layer, pool, d], keys) batch by batch, longest texts first."""
        tok = self.lm.tokenizer
        enc = encode_completions(tok, [f"Q: {q}\nA:" for _, (q, a) in items], [f" {a}" if a else "" for _, (q, a) in items],
                                 max_length=self.max_length)
        order = sorted(range(len(enc)), key=lambda i: -(len(enc[i][0]) + len(enc[i][1])))
        pad = pad_id(tok)
        dev = self.lm.device
        ac = self.precision.autocast(self.lm.dtype)
        # the residual stream after each chosen layer; the forward stops after the deepest one
        with torch.no_grad(), capture(self.lm.sites, "resid_post", self.layers, "all", stop=True) as cap:
            for s in range(0, len(order), self.batch_size):
                idx = order[s: s + self.batch_size]
                b = collate_completions([enc[i] for i in idx], pad).to(dev)
                with ac:
                    cap.forward(self.lm.model, b.input_ids, b.attention_mask)
                captured = cap.values
                mask = b.completion_mask.clone()
                lengths = b.attention_mask.sum(1)
                empty = mask.sum(1) == 0  # empty answer: use the prompt's last token
                mask[empty, (lengths[empty] - 1)] = True
                last_pos = (mask.long() * torch.arange(mask.shape[1], device=dev)).argmax(1)
                w = mask.float() / mask.float().sum(1, keepdim=True)
                feats = []
                for l in self.layers:
                    h = captured[l].float()  # [b, pos, d]
                    mean = torch.einsum("bp,bpd->bd", w, h)
                    last = h[torch.arange(len(idx), device=dev), last_pos]
                    feats.append(torch.stack([mean, last], 1))
                vecs = torch.stack(feats, 1).to(torch.float16).cpu().numpy()
                bar.update(len(idx))
                yield list(vecs), [items[i][0] for i in idx]
