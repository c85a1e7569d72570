"""Memory-lean completion log-probs for training: the LM head runs only on completion tokens, in tiles.

`models.scoring.completion_logprobs` materialises [batch, pos, vocab] logits (and their fp32 copies and
gradients); with a 49k vocabulary that dominates a training step's memory. `tiled_completion_logprobs`
runs the model's backbone, gathers the hidden states that predict completion tokens, and computes
log p(token) tile by tile with a custom autograd function that recomputes each tile's logits in the
backward pass, so at most [tile, vocab] logits exist at any time. Values equal `completion_logprobs`
(same bf16 rounding of the logits under autocast, fp32 log-softmax); `check_tiled` verifies that on a
real batch and the trainer falls back to `completion_logprobs` for a model where they differ (e.g. a
family whose head does something this module does not know).
"""

from __future__ import annotations

import logging

import torch

from locaudit.models.scoring import CompletionBatch, completion_logprobs

log = logging.getLogger(__name__)

TILE = 1024  # completion tokens per LM-head tile


def _head_transform(model) -> tuple[float, float | None]:
    """(logit scale, final soft-capping) of the model's LM head, as TRL's fused head reads them."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    scale = getattr(cfg, "logit_scale", None)
    if scale is None and getattr(cfg, "logits_scaling", None) is not None:
        scale = 1.0 / cfg.logits_scaling
    return (1.0 if scale is None else float(scale)), getattr(cfg, "final_logit_softcapping", None)


def _logits(h: torch.Tensor, W: torch.Tensor, bias, dt: torch.dtype, scale: float, cap) -> torch.Tensor:
    z = torch.matmul(h.to(dt), W.to(dt).t())
    if bias is not None:
        z = z + bias.to(dt)
    z = z.float()
    if scale != 1.0:
        z = z * scale
    if cap is not None:
        z = torch.tanh(z / cap) * cap
    return z


class _TiledTokenLogp(torch.autograd.Function):
    """log softmax(h W^T)[target] per row, tile by tile; W frozen (no gradient)."""

    @staticmethod
    def forward(ctx, h, W, bias, targets, dt, scale, cap, tile):  # noqa: D401
        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        lse = torch.empty_like(out)
        for s in range(0, h.shape[0], tile):
            z = _logits(h[s: s + tile], W, bias, dt, scale, cap)
            lse[s: s + tile] = torch.logsumexp(z, dim=-1)
            out[s: s + tile] = z.gather(1, targets[s: s + tile, None]).squeeze(1) - lse[s: s + tile]
        ctx.save_for_backward(h, W, targets, lse)
        ctx.bias, ctx.dt, ctx.scale, ctx.cap, ctx.tile = bias, dt, scale, cap, tile
        return out

    @staticmethod
    def backward(ctx, g):
        h, W, targets, lse = ctx.saved_tensors
        grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], ctx.tile):
            hs = h[s: s + ctx.tile].detach().requires_grad_(True)
            with torch.enable_grad():
                z = _logits(hs, W, ctx.bias, ctx.dt, ctx.scale, ctx.cap)
                p = torch.exp(z.detach() - lse[s: s + ctx.tile, None])  # softmax, from the saved lse
                dz = -g[s: s + ctx.tile, None] * p
                dz.scatter_add_(1, targets[s: s + ctx.tile, None], g[s: s + ctx.tile, None])
                (gh,) = torch.autograd.grad(z, hs, dz)
            grad_h[s: s + ctx.tile] = gh
        return grad_h.to(h.dtype), None, None, None, None, None, None, None


def token_logps(model, h: torch.Tensor, targets: torch.Tensor, tile: int = TILE) -> torch.Tensor:
    """Float[Tensor, "n"]: log p(targets[i] | h[i]) under the model's (frozen) LM head, tile by tile.
    h: Float[Tensor, "n d_model"], the final hidden states predicting each target; gradients flow to h."""
    head = model.get_output_embeddings()
    dt = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
    scale, cap = _head_transform(model)
    with torch.autocast(h.device.type, enabled=False):
        return _TiledTokenLogp.apply(h, head.weight, getattr(head, "bias", None), targets, dt, scale, cap, tile)


def tiled_completion_logprobs(model, batch: CompletionBatch, tile: int = TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """Same as `completion_logprobs` (summed log p of completion tokens Float[batch], counts Long[batch])
    without [batch, pos, vocab] logits; gradients flow to the hidden states (the LM head stays frozen)."""
    ids, att, comp = batch.input_ids, batch.attention_mask, batch.completion_mask
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(input_ids=ids, attention_mask=att, use_cache=False).last_hidden_state
    mask = comp[:, 1:]
    h = hidden[:, :-1][mask]  # [n_tok, d]: states that predict completion tokens
    tok = token_logps(model, h, ids[:, 1:][mask], tile)
    row = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(mask)[mask]
    sums = torch.zeros(ids.shape[0], dtype=torch.float32, device=ids.device).index_add(0, row, tok)
    return sums, mask.sum(-1)


def check_tiled(model, batch: CompletionBatch, rtol: float = 1e-3, atol: float = 2e-2) -> bool:
    """True if the tiled log-probs equal `completion_logprobs` on `batch` (no grad), else log why."""
    try:
        with torch.no_grad():
            a, na = tiled_completion_logprobs(model, batch)
            b, nb = completion_logprobs(model, batch)
    except Exception as e:  # a family the backbone/head lookup does not fit
        log.info("tiled log-probs unavailable for %s (%s): using completion_logprobs", type(model).__name__, e)
        return False
    ok = bool(torch.equal(na.cpu(), nb.cpu()) and torch.allclose(a.float(), b.float(), rtol=rtol, atol=atol))
    if not ok:
        log.warning("tiled log-probs differ from completion_logprobs on %s (max |diff| %.3g): using the latter",
                    type(model).__name__, float((a.float() - b.float()).abs().max()))
    return ok
