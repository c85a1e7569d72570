"""Hooks on the attention output projection: read or change o^l (its input) or its output.

A thin layer over models/interventions.py (`site_hooks` on the ``heads`` site, `module_hooks` on the
``o_proj`` module) for code that needs o_proj's input and output together (LoRA's delta). Every hook
is registered inside a context manager that removes it on exit, also on error, so the model is
always left as it was.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Mapping

import torch

from locaudit.models.interventions import module_hooks, site_hooks
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
    with site_hooks(sites, {("heads", int(l)): fn for l, fn in (pre or {}).items()}), \
            module_hooks(sites, {("o_proj", int(l)): fn for l, fn in (post or {}).items()}):
        yield
