"""Early stopping of a stack of edits on validation loss, per edit (TrainConfig.eval_every).

`EarlyStopping` watches every edit of a `LoRAStack` trained together: at each evaluation it keeps a copy of an
edit's parameters when its validation loss improved by more than `min_delta` on its best, counts evaluations
without such an improvement, and marks an edit stopped after `patience` of them. Evaluations before `count_from`
(the end of the learning-rate warm-up) do not count against patience: an edit whose learning rate is still
rising has not had its chance to learn, and a slow starter (a single head, a low layer) would otherwise be
stopped before its step size reaches the one chosen for it. A stopped edit gets no further
updates (`mask_stopped_grads` drops its gradients, so AdamW leaves it and its moments alone); the pass ends
when every edit has stopped. `restore_best` puts each edit's best state back into the stack at the end, so the
trained edit is the best-validation one, whatever happened after.
"""

from __future__ import annotations

import math

import torch

from locaudit.edit.lora import LoRAStack


class EarlyStopping:
    """Per-edit best-validation bookkeeping for E edits trained in one pass."""

    def __init__(self, stack: LoRAStack, patience: int, min_delta: float = 0.0, count_from: int = 0) -> None:
        self.stack, self.patience, self.min_delta = stack, int(patience), float(min_delta)
        self.count_from = int(count_from)  # the first optimizer step whose evaluation can count against patience
        E = stack.n_edits
        self.best_loss = [math.inf] * E
        self.best_step = [0] * E
        self.bad = [0] * E
        self.stopped_at: list[int | None] = [None] * E
        self.best_state: list[list[torch.Tensor] | None] = [None] * E

    def update(self, step: int, losses: list[float]) -> list[bool]:
        """Record the validation losses of every edit after `step` optimizer steps; returns, per edit, whether
        it improved (a stopped edit is not updated). A non-finite loss never improves."""
        improved = []
        for e, loss in enumerate(losses):
            if self.stopped_at[e] is not None:
                improved.append(False)
                continue
            better = math.isfinite(loss) and loss < self.best_loss[e] - self.min_delta
            if better or self.best_state[e] is None:  # the first evaluation is the reference state
                self.best_loss[e] = float(loss) if math.isfinite(loss) else math.inf
                self.best_step[e] = int(step)
                self.best_state[e] = [p.detach().clone() for p in self.stack.edit_parameters(e)]
                self.bad[e] = 0
            elif step >= self.count_from:
                self.bad[e] += 1
                if self.bad[e] >= self.patience:
                    self.stopped_at[e] = int(step)
            improved.append(bool(better))
        return improved

    @property
    def all_stopped(self) -> bool:
        return all(s is not None for s in self.stopped_at)

    def is_stopped(self, e: int) -> bool:
        return self.stopped_at[e] is not None

    def mask_stopped_grads(self) -> None:
        """Drop the gradients of stopped edits before the optimizer step: AdamW skips a parameter without one."""
        for e, s in enumerate(self.stopped_at):
            if s is not None:
                for p in self.stack.edit_parameters(e):
                    p.grad = None

    def restore_best(self) -> None:
        """Copy each edit's best-validation state back into the stack."""
        with torch.no_grad():
            for e, state in enumerate(self.best_state):
                if state is None:
                    continue
                for p, v in zip(self.stack.edit_parameters(e), state):
                    p.copy_(v)


def stopped_in_warmup(curve: dict, warmup_steps: int, patience: int) -> bool:
    """Whether a saved training curve (TrainLog.to_dict) was stopped by patience counted on evaluations inside the
    learning-rate warm-up: a curve from before `count_from` existed (no `patience_from` in it) whose last
    `patience` evaluations, the ones that stopped it, include one before step `warmup_steps`. Such an edit
    would train on under today's rule, so it is not what its settings now mean."""
    stopped = curve.get("stopped_step")
    if stopped is None or "patience_from" in curve:
        return False
    steps = sorted(int(e["step"]) for e in curve.get("evals") or [] if int(e["step"]) <= int(stopped))
    counted = steps[-int(patience):] if patience > 0 else []
    return bool(counted) and min(counted) < int(warmup_steps)
