"""Preference objectives on completion log-probs, following TRL's DPOTrainer conventions.

Inputs are per-pair summed completion log-probs (prompt tokens never count) and completion token counts,
as `locaudit.models.scoring.completion_logprobs` returns them:

- IPO (Azar et al., Eq. 17; TRL ``loss_type="ipo"``): log-ratios AVERAGED over each side's own completion
  tokens, loss = (delta - 1/(2 tau))^2 with delta = avg logratio(chosen) - avg logratio(rejected).
- DPO (TRL ``loss_type="sigmoid"``): -logsigmoid(beta * delta) on SUMMED log-ratios.
- SFT (TRL ``loss_type="sft"``): token-level mean NLL of the chosen completions over the batch.

Every function returns Float[Tensor, "... batch"] per-pair losses (leading axes, e.g. one per edit of
a multi-edit stack, broadcast); the batch loss is their mean over the last axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from locaudit.errors import ConfigError

OBJECTIVES = ("ipo", "dpo", "sft")


@dataclass
class PairLogps:
    """Summed completion log-probs and token counts of chosen and rejected answers (all Float/Long[batch])."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    n_chosen: torch.Tensor
    n_rejected: torch.Tensor

    def avg(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token averaged log-probs (chosen, rejected)."""
        return self.chosen / self.n_chosen.clamp(min=1), self.rejected / self.n_rejected.clamp(min=1)

    def index(self, idx) -> "PairLogps":
        return PairLogps(self.chosen[idx], self.rejected[idx], self.n_chosen[idx], self.n_rejected[idx])

    def to(self, device) -> "PairLogps":
        return PairLogps(*(t.to(device) for t in (self.chosen, self.rejected, self.n_chosen, self.n_rejected)))


def ipo_loss(policy: PairLogps, ref: PairLogps, tau: float) -> torch.Tensor:
    """(avg logratio chosen - avg logratio rejected - 1/(2 tau))^2 per pair."""
    nc, nr = policy.n_chosen.clamp(min=1), policy.n_rejected.clamp(min=1)
    delta = (policy.chosen - ref.chosen) / nc - (policy.rejected - ref.rejected) / nr
    return (delta - 1.0 / (2.0 * tau)) ** 2


def dpo_loss(policy: PairLogps, ref: PairLogps, beta: float) -> torch.Tensor:
    """-logsigmoid(beta * (logratio chosen - logratio rejected)) per pair, on summed log-probs."""
    delta = (policy.chosen - ref.chosen) - (policy.rejected - ref.rejected)
    return -F.logsigmoid(beta * delta)


def sft_loss(policy: PairLogps) -> torch.Tensor:
    """The batch's token-level mean NLL of the chosen answers, expanded to one value per pair (as TRL)."""
    nll = -policy.chosen.sum(-1, keepdim=True) / policy.n_chosen.sum(-1, keepdim=True).clamp(min=1)
    return nll.expand(policy.chosen.shape)


def pair_loss(objective: str, policy: PairLogps, ref: PairLogps | None, tau: float = 0.1,
              beta: float = 0.1) -> torch.Tensor:
    """Per-pair losses of `objective` (ipo | dpo | sft)."""
    if objective == "ipo":
        return ipo_loss(policy, ref, tau)
    if objective == "dpo":
        return dpo_loss(policy, ref, beta)
    if objective == "sft":
        return sft_loss(policy)
    raise ConfigError(f"objective {objective!r} is not one of {OBJECTIVES}")


def preference_stats(logps: PairLogps) -> dict[str, float]:
    """Held-out preference accuracy (avg log p(chosen) > avg log p(rejected)) and mean margin of the averages."""
    c, r = logps.avg()
    margin = (c - r).float()
    n = int(margin.numel())
    if n == 0:
        return {"accuracy": float("nan"), "margin": float("nan"), "n": 0}
    return {"accuracy": float((margin > 0).float().mean()), "margin": float(margin.mean()), "n": n}
