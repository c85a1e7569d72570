"""Hooks on the attention output projection: read or change o^l (its input) or its output.

Every hook is registered inside a context manager that removes it on exit, also on error, so the
model is always left as it was.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Mapping

import torch

from locaudit.models.sites import ModelSites

# fn(o: Float[Tensor, "batch pos head*head_dim"]) -> replacement or None (read-only)
PreFn = Callable[[torch.Tensor], torch.Tensor | None]
# fn(o, out: Float[Tensor, "batch pos d_model"]) -> replacement output or None
PostFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None]


@contextmanager
def o_proj_hooks(
    sites: ModelSites, pre: Mapping[int, PreFn] | None = None, post: Mapping[int, PostFn] | None = None
) -> Iterator[None]:
    """Register `pre[l]` on layer l's o_proj input and `post[l]` on its (input, output); remove on exit."""
    handles = []
    try:
        for l, fn in (pre or {}).items():
            def pre_hook(module, args, fn=fn):
                new = fn(args[0])
                return None if new is None else (new, *args[1:])
            handles.append(sites.o_proj(l).register_forward_pre_hook(pre_hook))
        for l, fn in (post or {}).items():
            def post_hook(module, args, output, fn=fn):
                return fn(args[0], output)
            handles.append(sites.o_proj(l).register_forward_hook(post_hook))
        yield
    finally:
        for h in handles:
            h.remove()
