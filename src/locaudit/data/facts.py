"""Facts (subject, relation prompt, object) for causal tracing and per-layer editing (Hase et al. 2023).

Sources: ROME's ``known_1000.json`` (a JSON list with subject, prompt, attribute, relation_id, known_id)
or any JSONL file with ``subject``, ``prompt`` and ``target`` (or ``attribute``), optionally
``relation_id`` and ``id``. The prompt must contain the subject and ends where the object starts.

- `known_facts` keeps the facts a model knows: the object's first token is among the model's top-k
  next tokens after the prompt (k = 1: the greedy continuation starts with the object).
- `counterfactual_targets` draws, as CounterFact does, a new object for each fact (seeded) from the
  objects of *other* facts with the same relation_id (different from the fact's own object).
- `split_facts` splits by fact (seeded).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from locaudit.errors import DataError
from locaudit.io import stable_hash
from locaudit.models.batching import length_sorted_batches, pad_id, pad_right


@dataclass(frozen=True)
class Fact:
    """One fact. `prompt` contains `subject` and is completed by " " + `target` (the true object)."""

    id: str
    subject: str
    prompt: str
    target: str
    relation_id: str = ""
    new_target: str | None = None  # the counterfactual object for editing (None until drawn)
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Fact":
        return cls(str(d["id"]), d["subject"], d["prompt"], d["target"], d.get("relation_id", ""),
                   d.get("new_target"), dict(d.get("meta") or {}))


def _check(rec: dict, where: str) -> None:
    for k in ("subject", "prompt"):
        if not isinstance(rec.get(k), str) or not rec[k].strip():
            raise DataError(f"{where}: field {k!r} is missing or empty")
    if rec["subject"] not in rec["prompt"]:
        raise DataError(f"{where}: the subject {rec['subject']!r} does not occur in the prompt {rec['prompt']!r}")


def load_facts(path: str | Path, max_facts: int | None = None) -> list[Fact]:
    """Read known_1000.json (a JSON list) or a JSONL file of facts; errors name the file, record and field."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"fact file {path} does not exist")
    text = path.read_text(encoding="utf-8-sig")
    records: list[tuple[str, dict]] = []
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        records = [(f"{path} record {i}", r) for i, r in enumerate(data)]
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((f"{path} line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {n}: not valid JSON ({e})") from None
    facts: list[Fact] = []
    seen: set[str] = set()
    for i, (where, r) in enumerate(records):
        if not isinstance(r, dict):
            raise DataError(f"{where}: expected an object with subject / prompt / target")
        _check(r, where)
        target = r.get("target", r.get("attribute"))
        if not isinstance(target, str) or not target.strip():
            raise DataError(f"{where}: field 'target' (or 'attribute') is missing or empty")
        fid = str(r.get("id", r.get("known_id", i)))
        if fid in seen:
            raise DataError(f"{where}: duplicate fact id {fid!r}")
        seen.add(fid)
        para = r.get("paraphrases", r.get("paraphrase_prompts"))  # CounterFact's key, or ours (known_1000: none)
        if para is not None and (not isinstance(para, list) or not all(isinstance(p, str) and p.strip() for p in para)):
            raise DataError(f"{where}: field 'paraphrases' must be a list of non-empty prompts")
        meta = {"paraphrases": [p.rstrip() for p in para]} if para else {}
        facts.append(Fact(fid, r["subject"], r["prompt"].rstrip(), target.strip(), str(r.get("relation_id", "")),
                          meta=meta))
        if max_facts is not None and len(facts) >= max_facts:
            break
    if not facts:
        raise DataError(f"{path}: no facts")
    return facts


def facts_fingerprint(facts: Sequence[Fact]) -> str:
    return stable_hash([f.to_dict() for f in facts])


def object_ids(tokenizer, obj: str) -> list[int]:
    """Token ids of an object as it follows the prompt (with its leading space)."""
    return list(tokenizer(" " + obj, add_special_tokens=False)["input_ids"])


@torch.no_grad()
def next_token_topk(lm, prompts: Sequence[str], k: int, batch_size: int = 32, *, precision: "ResolvedPrecision",
                    progress: bool = False) -> torch.Tensor:
    """Long[Tensor, "n k"]: the k most likely next tokens after each prompt (batched, right-padded)."""
    from locaudit.models.precision import require_resolved

    prec = require_resolved(precision, "facts")
    tok = lm.tokenizer
    ids = [list(x) for x in tok(list(prompts))["input_ids"]]
    out = torch.zeros(len(ids), k, dtype=torch.long)
    batches = length_sorted_batches([len(s) for s in ids], batch_size)
    for b in tqdm(batches, desc="known facts", disable=not progress, leave=False):
        x, m = pad_right([ids[i] for i in b], pad_id(tok))
        with prec.autocast(lm.dtype):  # the LM head runs at each prompt's last position only
            h = lm.model.base_model(input_ids=x.to(lm.device), attention_mask=m.to(lm.device),
                                    use_cache=False).last_hidden_state
            last = (m.sum(1) - 1).to(lm.device)
            rows = lm.model.get_output_embeddings()(h[torch.arange(len(b), device=lm.device), last]).float()
        out[b] = rows.topk(k, dim=-1).indices.cpu()
    return out


def known_facts(lm, facts: Sequence[Fact], top_k: int = 1, batch_size: int = 32, *, precision: "ResolvedPrecision",
                progress: bool = False) -> list[Fact]:
    """The facts whose object's first token is among the model's top-k next tokens after the prompt.

    Each kept fact records its object's rank in `meta["object_rank"]` (0 = the greedy token).
    """
    if top_k < 1:
        raise DataError(f"known filter: top_k must be >= 1, got {top_k}")
    top = next_token_topk(lm, [f.prompt for f in facts], top_k, batch_size, precision=precision, progress=progress)
    kept = []
    for f, row in zip(facts, top.tolist()):
        first = object_ids(lm.tokenizer, f.target)[0]
        if first in row:
            kept.append(replace(f, meta={**f.meta, "object_rank": row.index(first)}))
    return kept


def counterfactual_targets(facts: Sequence[Fact], seed: int = 0, pool: Sequence[Fact] | None = None,
                           tokenizer=None) -> list[Fact]:
    """Each fact with `new_target` drawn (seeded per fact id) from the objects of other facts of the same
    relation_id in `pool` (default: `facts`), never equal to its own object (and, given a tokenizer, not
    starting with the same first token where another candidate exists, so that the first token tells
    p_new and p_old apart).
    A fact whose relation offers no other object is dropped."""
    pool = list(pool if pool is not None else facts)
    by_rel: dict[str, list[str]] = {}
    for f in pool:
        by_rel.setdefault(f.relation_id, [])
        if f.target not in by_rel[f.relation_id]:
            by_rel[f.relation_id].append(f.target)
    out = []
    for f in facts:
        cands = [o for o in by_rel.get(f.relation_id, []) if o != f.target]
        if tokenizer is not None:
            first = object_ids(tokenizer, f.target)[0]
            distinct = [o for o in cands if object_ids(tokenizer, o)[0] != first]
            cands = distinct or cands  # (a byte-level tokenizer gives every object the same first token)
        if not cands:
            continue
        rng = random.Random(f"{seed}:{f.id}")
        out.append(replace(f, new_target=rng.choice(sorted(cands))))
    return out


def split_facts(facts: Sequence[Fact], fractions: Sequence[float] = (0.8, 0.2), seed: int = 0,
                names: Sequence[str] = ("edit", "heldout")) -> dict[str, list[Fact]]:
    """Split by fact (seeded shuffle), in the given fractions (they must sum to 1)."""
    if len(fractions) != len(names) or abs(sum(fractions) - 1.0) > 1e-9 or min(fractions) < 0:
        raise DataError(f"split fractions {list(fractions)} must be >= 0, one per split {list(names)}, and sum to 1")
    order = sorted(facts, key=lambda f: f.id)
    random.Random(seed).shuffle(order)
    out, start = {}, 0
    for i, (name, fr) in enumerate(zip(names, fractions)):
        end = len(order) if i == len(names) - 1 else start + round(fr * len(order))
        out[name] = order[start:end]
        start = end
    return out


def subject_token_span(tokenizer, prompt: str, subject: str) -> tuple[int, int]:
    """[start, end) token positions of the subject's first occurrence in the prompt (as the model sees it,
    special tokens included), from the fast tokenizer's character offsets."""
    enc = tokenizer(prompt, return_offsets_mapping=True)
    c0 = prompt.find(subject)
    if c0 < 0:
        raise DataError(f"subject {subject!r} does not occur in prompt {prompt!r}")
    c1 = c0 + len(subject)
    toks = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < c1 and b > c0]
    if not toks:
        raise DataError(f"subject {subject!r}: no token of prompt {prompt!r} covers it")
    return toks[0], toks[-1] + 1
