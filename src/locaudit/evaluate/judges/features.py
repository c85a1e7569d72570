"""Frozen-LM features of (question, answer) pairs for the trained judges, cached on disk by content.

Text: "Q: {question}\\nA:" + " {answer}" (the plain prompt format, tokenized as models.scoring does).
Per chosen layer (residual stream after that decoder layer): the mean over the answer's tokens and
the answer's last token. The forward pass stops after the deepest chosen layer, and a question asked
with several answers runs once, its answers continuing from its KV cache (same features up to float
rounding).
"""

from __future__ import annotations

import copy
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
from locaudit.models.batching import length_chunks, pad_id
from locaudit.models.interventions import capture
from locaudit.models.loading import LoadedModel
from locaudit.models.precision import ResolvedPrecision, require_resolved
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
                 *, precision: ResolvedPrecision, cache: str | Path | None | bool = None,
                 share_prompt: bool = True) -> None:
        n = lm.sites.n_layers
        layers = tuple(int(l) if int(l) >= 0 else n + int(l) for l in layers)
        bad = [l for l in layers if not 0 <= l < n]
        if bad or not layers:
            raise ConfigError(f"feature layers {list(layers)} must be non-empty and in [0, {n - 1}] for {lm.name}")
        self.lm = lm
        self.layers = tuple(sorted(set(layers)))
        self.batch_size = batch_size
        self.max_length = max_length
        self.precision = require_resolved(precision, "features")
        self.key = stable_hash({"model": lm.fingerprint, "layers": self.layers, "max_length": max_length,
                                "precision": self.precision.key, "text": "plain-v1"})
        if cache is False:
            self.db_path = None
        else:
            self.db_path = Path(cache) if cache not in (None, True) else cache_dir("judge_features") / f"{self.key}.sqlite"
        self._con = None
        self.share_prompt = share_prompt
        self._shared_ok: bool | None = None  # checked on first use

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
        """Yields (fp16 arrays [b, layer, pool, d], keys) batch by batch.

        The answers of one question share its prompt: where a prompt has several answers (judge training
        data, reference answers), the prompt runs once and its answers run together on its KV cache (on
        TruthfulQA's judge data, whose prompts are short next to the answers, 1.13x the items/s). The shared path is checked once per encoder against
        full sequences on real items (a family whose cache does not continue exactly falls back)."""
        tok = self.lm.tokenizer
        enc = encode_completions(tok, [f"Q: {q}\nA:" for _, (q, a) in items], [f" {a}" if a else "" for _, (q, a) in items],
                                 max_length=self.max_length)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (p, _) in enumerate(enc):
            groups.setdefault(tuple(p), []).append(i)
        shared = [m for p, m in groups.items() if p and len(m) >= 2] if self.share_prompt else []
        keys = [k for k, _ in items]
        with torch.no_grad(), capture(self.lm.sites, "resid_post", self.layers, "all", stop=True) as cap:
            if shared and self._shared_ok is None:
                self._shared_ok = self._check_shared(cap, enc, shared[0][: self.batch_size])
            if not self._shared_ok:
                shared = []
            in_shared = {i for m in shared for i in m}
            plain = sorted((i for i in range(len(enc)) if i not in in_shared),
                           key=lambda i: -(len(enc[i][0]) + len(enc[i][1])))  # longest first
            for s in range(0, len(plain), self.batch_size):
                idx = plain[s: s + self.batch_size]
                vecs = self._plain(cap, [enc[i] for i in idx])
                bar.update(len(idx))
                yield list(vecs), [keys[i] for i in idx]
            for members in shared:
                vecs = self._shared(cap, enc[members[0]][0], [enc[i][1] for i in members])
                bar.update(len(members))
                yield list(vecs), [keys[i] for i in members]

    def _pool(self, states: dict[int, torch.Tensor], mask: torch.Tensor, fallback: dict[int, torch.Tensor] | None,
              ) -> np.ndarray:
        """Float16[b, layer, pool, d]: mean and last of states[l] ([b, pos, d]) over `mask` ([b, pos]); a row
        with no answer token takes `fallback[l]` ([b, d], the prompt's last state) for both pools. Pooled in fp32 at
        any precision, also when called under autocast (a weighted sum, not a matmul, so autocast cannot lower it)."""
        dev = mask.device
        empty = mask.sum(1) == 0
        safe = mask.clone()
        safe[empty, 0] = True  # pooled, then replaced below
        last_pos = (safe.long() * torch.arange(safe.shape[1], device=dev)).argmax(1)
        w = safe.float() / safe.float().sum(1, keepdim=True)
        rows = torch.arange(mask.shape[0], device=dev)
        feats = []
        for l in self.layers:
            h = states[l].float()  # [b, pos, d]
            mean = (w.unsqueeze(-1) * h).sum(1)
            last = h[rows, last_pos]
            if empty.any() and fallback is not None:
                mean[empty] = fallback[l][empty].float()
                last[empty] = fallback[l][empty].float()
            feats.append(torch.stack([mean, last], 1))
        return torch.stack(feats, 1).to(torch.float16).cpu().numpy()

    def _plain(self, cap, seqs: list) -> np.ndarray:
        """Features of full (prompt, answer) sequences, batched with right padding."""
        b = collate_completions(seqs, pad_id(self.lm.tokenizer)).to(self.lm.device)
        with self.precision.compute(self.lm.model, self.lm.dtype):
            cap.forward(self.lm.model, b.input_ids, b.attention_mask)
        lengths = b.attention_mask.sum(1)
        rows = torch.arange(len(seqs), device=b.input_ids.device)
        fallback = {l: cap.values[l][rows, lengths - 1] for l in self.layers}  # an empty answer: the prompt's end
        return self._pool(cap.values, b.completion_mask, fallback)

    def _shared(self, cap, prompt: Sequence[int], comps: list[list[int]]) -> np.ndarray:
        """Float16[n, layer, pool, d]: features of one prompt's answers (in their order): the prompt once (its KV cache
        kept up to the deepest layer read), then the answers in length-sorted chunks, each on a copy of
        that cache (chunks keep padding low: padded tokens cost as much as real ones)."""
        from transformers import DynamicCache

        from locaudit.models.batching import pad_right
        from locaudit.models.prefix_cache import cache_kwarg

        model, dev, B = self.lm.model, self.lm.device, len(comps)
        x = torch.tensor([list(prompt)], dtype=torch.long, device=dev)
        cache = DynamicCache(config=model.config)
        kwarg = cache_kwarg(model)
        out = np.empty((B, *self.dim), dtype=np.float16)
        with self.precision.compute(self.lm.model, self.lm.dtype):
            cap.forward(model, x, torch.ones_like(x), use_cache=True, **{kwarg: cache})
            end = {l: cap.values[l][0, -1] for l in self.layers}
            for idx in length_chunks([len(c) for c in comps], self.batch_size):
                b = len(idx)
                fallback = {l: end[l].expand(b, -1) for l in self.layers}
                ids, mask = pad_right([comps[i] for i in idx], pad_id(self.lm.tokenizer))
                if ids.shape[1] == 0:  # empty answers: the prompt's last state
                    out[idx] = self._pool({l: fallback[l][:, None] for l in self.layers},
                                          torch.zeros(b, 1, dtype=torch.bool, device=dev), fallback)
                    continue
                ids, mask = ids.to(dev), mask.bool().to(dev)
                c = copy.deepcopy(cache)
                if b > 1:
                    c.batch_repeat_interleave(b)
                att = torch.cat([torch.ones(b, x.shape[1], dtype=torch.long, device=dev), mask.long()], dim=1)
                cap.forward(model, ids, att, use_cache=True, **{kwarg: c})
                out[idx] = self._pool(cap.values, mask, fallback)
        return out

    def _check_shared(self, cap, enc: list, members: list[int]) -> bool:
        """Whether the shared-prompt path gives the full sequences' features on `members` (one prompt's
        answers): within 1e-3 relative in fp32 (2e-2 at lower precision), else fall back to full sequences."""
        try:
            a = self._shared(cap, enc[members[0]][0], [enc[i][1] for i in members]).astype(np.float32)
        except Exception as e:  # a family whose cache cannot be continued this way
            log.info("judge features: prompt sharing unavailable for %s (%s)", self.lm.name, e)
            return False
        b = self._plain(cap, [enc[i] for i in members]).astype(np.float32)
        tol = 1e-3 if self.precision.name == "fp32" else 2e-2
        err = float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-6))
        if err > tol:
            log.warning("judge features: the shared-prompt path differs from full sequences by %.3g (relative) "
                        "on %s: encoding full sequences", err, self.lm.name)
            return False
        return True
