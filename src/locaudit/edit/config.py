"""Training configuration of optimal localized edits, with the paper's defaults."""

from __future__ import annotations

import math
import warnings
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from locaudit.errors import ConfigError
from locaudit.io import key_dump
from locaudit.models.precision import PrecisionName, migrate_autocast_field

# (number of heads, learning rate) from the paper: single head, 16 heads; all heads is added per model
_LR_SINGLE, _LR_16, _LR_ALL = 2e-3, 5e-4, 1e-4


def default_lr(n_heads: int, total_heads: int) -> float:
    """The paper's learning rate for a head set of `n_heads` out of `total_heads`.

    2e-3 for one head, 5e-4 for 16, 1e-4 for all heads; log-log interpolation in between.
    """
    points = [(1, _LR_SINGLE), (16, _LR_16), (max(total_heads, 17), _LR_ALL)]
    if total_heads <= 16:  # small (test) models: single head to all heads only
        points = [(1, _LR_SINGLE), (max(total_heads, 2), _LR_ALL)]
    n = min(max(n_heads, 1), points[-1][0])
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= n <= x1:
            t = (math.log(n) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return float(math.exp(math.log(y0) + t * (math.log(y1) - math.log(y0))))
    return points[-1][1]


class TrainConfig(BaseModel):
    """How to train an optimal localized edit (defaults follow Wang & Veitch 2025)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)  # finite numbers
    # fields added after trials were trained: kept out of `key_dump` (edit metas, keys) at their defaults
    NEW_FIELDS: ClassVar[tuple[str, ...]] = ("eval_every", "patience", "min_delta", "max_epochs", "snapshot_steps")

    objective: Literal["ipo", "dpo", "sft"] = Field(
        "ipo", description="training objective: ipo (the paper's), dpo or sft (the NLL of the preferred answer, a "
        "sanity baseline)")
    tau: float = Field(0.1, gt=0, description="IPO regularisation tau: the target log-ratio gap is 1/(2 tau)")
    beta: float = Field(0.1, gt=0, description="DPO inverse temperature beta")
    lr: float | None = Field(None, gt=0, description="learning rate; None: the paper's, by head-set size (2e-3 one "
                             "head, 5e-4 16 heads, 1e-4 all heads; default_lr)")
    epochs: int = Field(2, ge=1, description="passes over the training pairs")
    batch_size: int = Field(4, ge=1, description="preference pairs per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="fraction of optimizer steps with linear warm-up")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping norm per edit (None: no clipping)")
    rank: int = Field(1, ge=1, description="rank r of the edit (number of (a, b) components per layer; 1 in the "
                      "paper)")
    reparam: bool = Field(True, description="reparameterised form <a,o> W b (the paper's; True) or plain LoRA <a,o> b' (False)")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the initialisation and the batch order (32-bit: "
                      "torch generators are seeded with seed * 1_000_003 + epoch)")
    precision: PrecisionName = Field(
        "auto", description="compute precision: auto (bf16 on GPUs and CPUs where bf16 is measured faster, "
        "else fp32), fp32, bf16 or fp16 (models/precision.py)")
    cast_frozen_weights: bool = Field(
        True, description="under bf16 in its bf16-weights form (models/precision.py), hold bf16 copies of frozen "
        "matmul weights (same numbers, no per-call casts); False: plain autocast")
    tiled_logps: bool = Field(
        True, description="LM head on completion tokens only, in tiles (less memory); checked against the full head")
    packed_pairs: bool = Field(
        True, description="run each pair's chosen and rejected answers in one row sharing their prompt's forward "
        "(edit/packed.py; 1.5x fewer tokens on TruthfulQA); checked against one row per sequence")
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto", description="recompute layer activations in the backward pass (less training memory, one more "
        "forward: in the README's IPO benchmark, about half the memory for 54% more time); auto = only where a training "
        "pass's stored activations would exceed the memory budget (edit/train.py checkpointing_needed)")
    max_length: int = Field(256, ge=8, description="maximum tokens of prompt + completion (prompt cut from the left)")
    eval_batch_size: int = Field(
        8, ge=2, description="sequences per forward in no-grad passes (reference, prefix states, validation); "
        "bounds the [seq, pos, vocab] logits in memory")
    eval_each_epoch: bool = Field(True, description="validation loss and preference accuracy after every epoch")
    frozen_prefix: bool = Field(True, description="cache the states entering the lowest edited layer and run only the layers above")
    reference_disk_cache: bool = Field(True, description="also cache reference log-probs on disk (keyed by content)")
    max_parallel: int = Field(8, ge=1, description="multi-edit: at most this many edits trained together in one pass")
    group_copy_cost: float | None = Field(
        None, ge=0, description="multi-edit planning: cost of one edit's copy in a shared pass relative to a run of "
        "its own (None: 0.85 on CPU, as measured on SmolLM2 with 2 cores; 0.35 on GPU); 0 groups whenever allowed")
    progress: bool = Field(True, description="show a progress bar with the loss")
    eval_every: int | None = Field(
        None, ge=1, description="early stopping on validation: evaluate the validation loss every this many "
        "optimizer steps (and at step 0), keep each edit's best-validation state, freeze an edit after `patience` "
        "evaluations without an improvement of `min_delta`, end the pass when every edit is frozen; the edit "
        "returned is its best state. Needs validation pairs. None: train `epochs` epochs, keep the last state")
    patience: int = Field(3, ge=1, description="early stopping: evaluations without improvement before an edit stops "
                          "(those inside the learning-rate warm-up do not count)")
    min_delta: float = Field(0.0, ge=0, description="early stopping: the least validation-loss decrease that counts "
                             "as an improvement")
    max_epochs: int | None = Field(
        None, ge=1, description="early stopping: the most epochs a pass may run (the cosine schedule spans them); "
        "None: `epochs`. Ignored without eval_every")
    snapshot_steps: list[float] | None = Field(
        None, description="a dose curve: each edit's state is copied after these optimizer steps "
        "(TrainLog.snapshots); a value in (0, 1) is a fraction of the planned steps, a value >= 1 a step count; "
        "None: none")

    @model_validator(mode="before")
    @classmethod
    def _old_fields(cls, data):
        """Old spellings keep loading: autocast (bool) -> precision; prefix_dtype is gone (states are exact)."""
        data = migrate_autocast_field(data, "TrainConfig")
        if isinstance(data, dict) and "prefix_dtype" in data:
            data = dict(data)
            old = data.pop("prefix_dtype")
            warnings.warn(f"TrainConfig.prefix_dtype = {old!r} is gone: cached prefix states keep the dtype "
                          "the layers above receive, so training from them is exact", FutureWarning, stacklevel=2)
        return data

    @field_validator("snapshot_steps")
    @classmethod
    def _snapshot_steps(cls, v: list[float] | None) -> list[float] | None:
        for x in v or []:
            if not (math.isfinite(x) and (0 < x < 1 or (x >= 1 and float(x).is_integer()))):
                raise ValueError(f"each snapshot step is a fraction in (0, 1) or a whole step count >= 1, got {x}")
        return v

    @field_validator("tau", "beta", "lr")
    @classmethod
    def _finite(cls, v):
        if v is not None and not math.isfinite(v):
            raise ValueError("must be finite")
        return v

    @classmethod
    def make(cls, **kwargs) -> "TrainConfig":
        """Build a config, raising ConfigError (naming the field and value) instead of pydantic's error."""
        try:
            return cls(**kwargs)
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, "TrainConfig")) from None

    def key_dump(self) -> dict:
        """model_dump() without the newer fields at their defaults (io.key_dump): edits trained as before
        record the same config as before."""
        return key_dump(self, self.NEW_FIELDS)

    def resolved_epochs(self) -> int:
        """Epochs a pass may run: max_epochs (else epochs) with early stopping, epochs without."""
        return self.epochs if self.eval_every is None else (self.max_epochs or self.epochs)

    def total_steps(self, n_train: int) -> int:
        """Optimizer steps a pass over `n_train` pairs may run: resolved_epochs x steps per epoch."""
        return self.resolved_epochs() * math.ceil(math.ceil(n_train / self.batch_size) / self.grad_accum)

    def warmup_steps(self, n_train: int) -> int:
        """Optimizer steps of linear learning-rate warm-up (warmup_ratio of total_steps, rounded up); early
        stopping counts no evaluation before it against patience."""
        return math.ceil(self.warmup_ratio * self.total_steps(n_train))

    def earliest_stop(self, n_train: int) -> int:
        """The fewest optimizer steps a pass over `n_train` pairs can run: with early stopping, `patience` checks
        without improvement counted from the first check at or after the warm-up's end (a check at step 0 only
        sets the reference); without it, total_steps."""
        total = self.total_steps(n_train)
        if self.eval_every is None:
            return total
        ev = self.eval_every
        first = max(ev, math.ceil(self.warmup_steps(n_train) / ev) * ev)
        return min(total, first + (self.patience - 1) * ev)

    def resolved_snapshots(self, total_steps: int) -> list[int]:
        """snapshot_steps as optimizer step counts in 1..total_steps (fractions of `total_steps` rounded, at least 1)."""
        steps = {max(1, round(x * total_steps)) if x < 1 else int(x) for x in self.snapshot_steps or []}
        return sorted(s for s in steps if s <= total_steps)

    def resolved_lr(self, n_heads: int, total_heads: int) -> float:
        return self.lr if self.lr is not None else default_lr(n_heads, total_heads)


def format_validation_error(e: ValidationError, where: str) -> str:
    parts = []
    for err in e.errors():
        field = ".".join(str(x) for x in err["loc"]) or "?"
        parts.append(f"{where}.{field} = {err.get('input')!r}: {err['msg']}")
    return "; ".join(parts)
