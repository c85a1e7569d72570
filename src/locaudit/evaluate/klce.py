"""KL(p_orig || p_edit) of next-token distributions and the edited model's CE, on held-out text.

Caching the original distributions exactly: storing full log-probs costs V numbers per position (49k
for SmolLM2: ~100 kB/position in fp16, and fp16 is not exact). Instead we cache the ORIGINAL model's
final hidden state h (the input of the output embedding, d_model numbers per position, float32: 85x
smaller for SmolLM2) and recompute p_orig = softmax(lm_head(h)) when scoring an edit. That is exact:
both p_orig and p_edit go through the same lm_head code path, so the unedited model has KL exactly 0.
The cache lives in memory and on disk (cache_dir("klce")), keyed by model fingerprint, dtype,
precision, text hash and max_length.

KL and CE are pooled means over all next-token positions of all texts (each position t predicts token
t+1, prompt tokens included). Standard errors are cluster-robust with texts as clusters (positions in
one text are not independent): SE = sqrt(n/(n-1) * sum_i (S_i - m n_i)^2) / sum_i n_i.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float, Shaped
from torch import Tensor
from tqdm.auto import tqdm

from locaudit.data.prompts import PromptFormat
from locaudit.data.types import Question
from locaudit.edit.base import Edit
from locaudit.errors import ConfigError, DataError
from locaudit.evaluate.view import edited
from locaudit.io import atomic_path, cache_dir, stable_hash
from locaudit.models.batching import pad_id, pad_right
from locaudit.models.interventions import capture
from locaudit.models.loading import LoadedModel
from locaudit.models.precision import ResolvedPrecision, require_resolved
from locaudit.models.sites import output_head

_MEMORY: "OrderedDict[str, OriginalCache]" = OrderedDict()
_MEMORY_SIZE = 4


@dataclass
class OriginalCache:
    """The original model's final hidden states for a list of token sequences."""

    ids: list[list[int]]  # token ids of each text
    hidden: torch.Tensor  # Float[Tensor, "positions d_model"]: rows of text i are offsets[i]:offsets[i+1]
    offsets: list[int]  # text i predicts len(ids[i]) - 1 tokens
    key: str


@dataclass
class KLCEResult:
    kl: float
    kl_se: float | None
    ce: float
    ce_se: float | None
    n_tokens: int
    n_texts: int

    def summary(self) -> dict:
        return {"kl": self.kl, "kl_se": self.kl_se, "ce": self.ce, "ce_se": self.ce_se,
                "n_kl_tokens": self.n_tokens, "n_kl_texts": self.n_texts}


def heldout_texts(questions: Sequence[Question], fmt: PromptFormat, tokenizer) -> list[str]:
    """The default KL/CE text: each held-out question with its best answer, in the prompt format."""
    return [fmt.full(q.question, q.best_answer, tokenizer) for q in questions]


def text_file_chunks(path: str | Path, tokenizer, max_length: int = 512) -> list[list[int]]:
    """A text file's tokens cut into consecutive windows of at most `max_length` tokens."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"KL/CE text file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"KL/CE text file {path} is empty")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [ids[s: s + max_length] for s in range(0, len(ids), max_length) if len(ids[s: s + max_length]) > 1]


def tokenize(tokenizer, texts: Sequence[str], max_length: int = 512) -> list[list[int]]:
    """Token ids per text, cut to `max_length`; special tokens are added as in scoring unless the texts
    already start with the BOS token (chat templates write it themselves)."""
    bos = getattr(tokenizer, "bos_token", None)
    special = not (bos and texts and all(t.startswith(bos) for t in texts))
    ids = [list(x)[:max_length] for x in tokenizer(list(texts), add_special_tokens=special)["input_ids"]]
    short = [i for i, x in enumerate(ids) if len(x) < 2]
    if short:
        raise DataError(f"KL/CE texts {short[:5]} have fewer than 2 tokens: nothing to predict")
    return ids


def head_logits(model, h: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch vocab"]:
    """Float[Tensor, "... vocab"] logits from final hidden states (Float[Tensor, "... d_model"]), with the family's
    logit soft-capping."""
    head = output_head(model)
    logits = head(h.to(head.weight.dtype)).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def final_hidden(lm: LoadedModel, ids: Sequence[Sequence[int]], batch_size: int = 16,
                 progress: bool = False, check: bool = False) -> tuple[torch.Tensor, list[int]]:
    """Hidden states entering lm_head for every predicting position (all but each text's last token).

    Returns (Float[Tensor, "positions d_model"] in float32, offsets). Runs under whatever edit is active.
    `check` verifies on the first batch that lm_head(h) reproduces the model's logits.
    """
    model = lm.model
    pad = pad_id(lm.tokenizer)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    rows: list[torch.Tensor | None] = [None] * len(ids)
    with capture(lm.sites, "final", [0]) as cap:
        for s in tqdm(range(0, len(order), batch_size), desc="kl/ce", disable=not progress):
            idx = order[s: s + batch_size]
            T = max(len(ids[i]) for i in idx)
            x, att = pad_right([ids[i] for i in idx], pad, length=T)
            cap.stop = not check  # the model's own logits are needed only to check lm_head(h)
            out = cap.forward(model, x.to(lm.device), att.to(lm.device))
            h = cap.values[0]
            if check and out is not None:
                ref = out.logits.float()
                got = head_logits(model, h)
                if not torch.allclose(got, ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max())):
                    raise ConfigError(f"{type(model).__name__}: lm_head(final hidden) does not reproduce the "
                                      "model's logits (a logit transform locaudit does not know); KL/CE unsupported")
                check = False
            for j, i in enumerate(idx):
                rows[i] = h[j, : len(ids[i]) - 1].float().cpu()
    offsets = [0]
    for x in ids:
        offsets.append(offsets[-1] + len(x) - 1)
    return torch.cat([r for r in rows if r is not None]), offsets


def original_cache(lm: LoadedModel, ids: Sequence[Sequence[int]], batch_size: int = 16,
                   *, precision: ResolvedPrecision, disk: bool = True, progress: bool = False) -> OriginalCache:
    """The unedited model's final hidden states for `ids`, from memory, disk, or computed once."""
    key = stable_hash({"model": lm.fingerprint, "dtype": str(lm.dtype), "precision": require_resolved(precision, "klce").key,
                       "ids": stable_hash([list(x) for x in ids], 32), "v": 1})
    if key in _MEMORY:
        _MEMORY.move_to_end(key)
        return _MEMORY[key]
    path = cache_dir("klce") / f"{key}.safetensors" if disk else None
    cache = None
    if path is not None and path.exists():
        from safetensors.torch import load_file

        try:
            t = load_file(str(path))
            offsets = t["offsets"].tolist()
            if offsets[-1] == t["hidden"].shape[0] and len(offsets) == len(ids) + 1:
                cache = OriginalCache([list(x) for x in ids], t["hidden"], offsets, key)
        except Exception:  # a damaged cache file is recomputed
            cache = None
    if cache is None:
        with edited(lm, None, precision=precision):
            hidden, offsets = final_hidden(lm, ids, batch_size, progress, check=True)
        cache = OriginalCache([list(x) for x in ids], hidden, offsets, key)
        if path is not None:
            from safetensors.torch import save_file

            with atomic_path(path) as tmp:
                save_file({"hidden": hidden.contiguous(), "offsets": torch.tensor(offsets)}, str(tmp))
    _MEMORY[key] = cache
    while len(_MEMORY) > _MEMORY_SIZE:
        _MEMORY.popitem(last=False)
    return cache


def cluster_se(sums: Float[Tensor, "clusters"], counts: Shaped[Tensor, "clusters"]) -> float | None:
    """Cluster-robust SE of the ratio mean sum(S_i)/sum(n_i) with clusters i."""
    n = len(sums)
    if n < 2:
        return None
    m = sums.sum() / counts.sum()
    resid = sums - m * counts
    return float(math.sqrt(n / (n - 1) * float((resid ** 2).sum())) / float(counts.sum()))


def kl_ce(
    lm: LoadedModel,
    edit: Edit | None,
    texts: Sequence[str] | None = None,
    ids: Sequence[Sequence[int]] | None = None,
    batch_size: int = 16,
    max_length: int = 512,
    *, precision: ResolvedPrecision,
    chunk: int = 256,
    disk_cache: bool = True,
    progress: bool = False,
) -> KLCEResult:
    """KL(p_orig || p_edit) and CE of the edited model, pooled over next-token positions of the texts.

    Give `texts` (tokenized here) or token `ids` (e.g. from `text_file_chunks`).
    """
    if ids is None:
        if texts is None:
            raise ConfigError("kl_ce needs texts or token ids")
        ids = tokenize(lm.tokenizer, texts, max_length)
    if not ids:
        raise DataError("kl_ce: no texts to score")
    orig = original_cache(lm, ids, batch_size, precision=precision, disk=disk_cache, progress=progress)
    if edit is None:  # the unedited model IS the reference: KL is exactly 0 (a cache written under another
        hidden, offsets = orig.hidden, orig.offsets  # thread count would differ from a recomputation by rounding)
    else:
        with edited(lm, edit, precision=precision):
            hidden, offsets = final_hidden(lm, ids, batch_size, progress)
    targets = torch.cat([torch.tensor(x[1:]) for x in ids])
    kl_pos = torch.empty(len(targets), dtype=torch.float64)
    ce_pos = torch.empty(len(targets), dtype=torch.float64)
    model = lm.model
    with torch.no_grad():
        for s in range(0, len(targets), chunk):
            sl = slice(s, s + chunk)
            logp = F.log_softmax(head_logits(model, orig.hidden[sl].to(lm.device)), -1)
            logq = F.log_softmax(head_logits(model, hidden[sl].to(lm.device)), -1)
            kl_pos[sl] = (logp.exp() * (logp - logq)).sum(-1).double().cpu()
            ce_pos[sl] = -logq.gather(1, targets[sl].to(lm.device)[:, None]).squeeze(1).double().cpu()
    counts = torch.tensor([offsets[i + 1] - offsets[i] for i in range(len(ids))], dtype=torch.float64)
    kl_sums = torch.stack([kl_pos[offsets[i]: offsets[i + 1]].sum() for i in range(len(ids))])
    ce_sums = torch.stack([ce_pos[offsets[i]: offsets[i + 1]].sum() for i in range(len(ids))])
    N = float(counts.sum())
    return KLCEResult(float(kl_sums.sum() / N), cluster_se(kl_sums, counts), float(ce_sums.sum() / N),
                      cluster_se(ce_sums, counts), int(N), len(ids))


def clear_memory_cache() -> None:
    _MEMORY.clear()
