"""bf16 copies of frozen matmul weights for autocast training.

Under bf16 autocast every linear layer casts its fp32 weight to bf16 on every call, because autocast
caches casts only for weights that require grad; an edit leaves all model weights frozen, so each step
re-casts the whole model (the tied lm_head included). Inside `frozen_bf16_weights` the weights of
matmul modules are bf16 copies (rounded exactly as autocast rounds them), so autocast results are
bit-identical while the casts disappear. The fp32 parameters are put back on exit (bit for bit).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


def _matmul_modules(model: nn.Module) -> list[nn.Module]:
    out = []
    for m in model.modules():
        w = getattr(m, "weight", None)
        if not isinstance(w, nn.Parameter) or w.dim() != 2 or w.dtype != torch.float32 or w.requires_grad:
            continue
        if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D":
            out.append(m)
    return out


@contextmanager
def frozen_bf16_weights(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Swap frozen fp32 Linear/Conv1D weights for bf16 copies for the block; restore them on exit.

    Only valid under bf16 autocast (which would cast these weights to bf16 anyway). Tied weights
    (lm_head = embeddings) are untied for the block: the embedding keeps its fp32 weight.
    """
    if not enabled:
        yield
        return
    saved: list[tuple[nn.Module, nn.Parameter]] = []
    copies: dict[int, nn.Parameter] = {}
    try:
        for m in _matmul_modules(model):
            w = m.weight
            if id(w) not in copies:
                copies[id(w)] = nn.Parameter(w.detach().to(torch.bfloat16), requires_grad=False)
            saved.append((m, w))
            m.weight = copies[id(w)]
        yield
    finally:
        for m, w in saved:
            m.weight = w
