"""Train optimal localized edits: IPO (or DPO, SFT) on preference pairs, one or many edits per pass.

`train_edit` trains one edit; `train_stack` is the loop behind it and behind `multi.train_edits`: E edits
share every forward pass (the batch is replicated E times, copy e routed to edit e), their losses are
summed (so gradients stay independent) and each edit has its own AdamW group and gradient clipping,
which makes the result equal to E separate runs. The frozen model's reference log-probs are computed
once per dataset (edit/reference.py) and, where the lowest edited layer is l > 0, the states entering
layer l are cached once (edit/prefix.py) so that only layers l..L-1 run. Each pair's chosen and rejected
answers share one forward of their prompt (edit/packed.py) where the model takes the packed layout.
"""

from __future__ import annotations

import logging
import math
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from typing import Iterator, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from locaudit.data.prompts import PromptFormat
from locaudit.data.types import PreferencePair
from locaudit.edit.config import TrainConfig
from locaudit.models.fastcast import frozen_bf16_weights
from locaudit.edit.encoded import EncodedPairs, encode_pairs, length_sorted, replicate
from locaudit.edit.logps import check_tiled, tiled_completion_logprobs
from locaudit.edit.lora import LoRAEdit, LoRAStack, build_stack
from locaudit.edit.objectives import PairLogps, pair_loss, preference_stats
from locaudit.edit.packed import check_packed, pack_pairs, packed_lengths, packed_logprobs
from locaudit.edit.prefix import PREFIX_CACHE, PrefixStates
from locaudit.edit.reference import reference_logps
from locaudit.edit.resume import EVERY_STEPS as RESUME_EVERY_STEPS
from locaudit.edit.resume import PassCheckpoint, pass_key
from locaudit.edit.resume import capture as capture_state
from locaudit.edit.resume import restore as resume_state
from locaudit.edit.resume import stale_stop
from locaudit.edit.stopping import EarlyStopping
from locaudit.errors import ConfigError, LocauditError
from locaudit.heads import HeadSet
from locaudit.models.loading import LoadedModel
from locaudit.models.precision import ResolvedPrecision, as_precision, require_resolved
from locaudit.models.scoring import completion_logprobs
from locaudit.models.surgery import checkpointed_layers, prefix_supported, run_from_layer

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 60.0  # a training pass logs its progress at early-stopping checks at most this often


class TrainingError(LocauditError, RuntimeError):
    """Training diverged (a NaN or inf loss); the message names the step, the batch and the edit."""


@dataclass
class TrainLog:
    """The training curve of one edit: per optimizer step and per epoch, plus validation before training."""

    heads: str
    lr: float
    steps: list[dict] = field(default_factory=list)  # {step, epoch, loss, lr, grad_norm}
    epochs: list[dict] = field(default_factory=list)  # {epoch, train_loss, val_loss, val_accuracy, val_margin}
    before: dict = field(default_factory=dict)  # validation of the unedited model
    seconds: float = 0.0
    n_train: int = 0
    n_val: int = 0
    lowest_layer: int = 0
    frozen_prefix: bool = False
    tiled_logps: bool = False
    packed_pairs: bool = False
    gradient_checkpointing: bool = False
    diverged: str | None = None  # why training diverged (see `divergence`); such an edit is never saved
    # early stopping (TrainConfig.eval_every): the validation curve, the best state's evaluation, where it stopped
    evals: list[dict] = field(default_factory=list)  # {step, epoch, val_loss, val_accuracy, val_margin}
    best: dict = field(default_factory=dict)  # the evaluation of the state returned: {step, val_loss, ...}
    stopped_step: int | None = None  # optimizer steps done when patience ran out (None: it never did)
    patience_from: int | None = None  # the first step whose evaluation counted against patience (the warm-up's end)
    steps_run: int | None = None  # optimizer steps the pass ran (early stopping)
    resumed_at: list[int] = field(default_factory=list)  # optimizer steps at which the pass resumed (edit/resume.py)
    # TrainConfig.snapshot_steps: {optimizer steps done: (a, b) full-model tensors}; not part of to_dict
    snapshots: dict = field(default_factory=dict, repr=False)

    @property
    def after(self) -> dict:
        """Validation of the edit returned: its best state with early stopping, else after the last epoch
        (empty without validation data)."""
        if self.best:
            return self.best
        return self.epochs[-1] if self.epochs else {}

    def to_dict(self) -> dict:
        """The curve as JSON-able data: the snapshots' tensors left out, the early-stopping fields only when used
        (a run without them records what it recorded before they existed)."""
        d = {k: v for k, v in asdict(replace(self, snapshots={})).items() if k != "snapshots"}
        for k in ("evals", "best", "stopped_step", "patience_from", "steps_run", "resumed_at"):
            if not d[k] and d[k] != 0:
                d.pop(k)
        if self.snapshots:
            d["snapshot_steps"] = sorted(self.snapshots)
        return d


def cosine_schedule(total: int, warmup: int):
    """HF's get_cosine_schedule_with_warmup multiplier: linear warm-up, then half a cosine to 0."""
    def f(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return f


def choose_layout(lm: LoadedModel, enc: EncodedPairs, config: TrainConfig,
                  precision: ResolvedPrecision) -> tuple[bool, bool]:
    """(tiled, packed) as training uses them: tiled log-probs if configured and equal to `completion_logprobs`
    on a batch of `enc`; packed pairs (which need the tiled head) if configured and equal to the unpacked
    ones. The reference log-probs must be computed in the same layout (`reference_logps(tiled=, packed=)`)."""
    precision = require_resolved(precision, "choose_layout")
    key = (lm.fingerprint, enc.key, precision.key, bool(config.tiled_logps), bool(config.packed_pairs))
    if key in _LAYOUTS:  # checked once per model, data and precision (a study trains many edits on the same pairs)
        return _LAYOUTS[key]
    tiled = packed = False
    with precision.autocast(lm.dtype):
        if config.tiled_logps:
            batch = enc.batch(list(range(min(2, len(enc))))).to(lm.device)
            tiled = check_tiled(lm.model, batch)
        if tiled and config.packed_pairs:
            packed = check_packed(lm.model, enc, tiled_completion_logprobs)
    _LAYOUTS[key] = (tiled, bool(packed))
    return _LAYOUTS[key]


_LAYOUTS: dict[tuple, tuple[bool, bool]] = {}


ACTIVATION_BUDGET_BYTES = 2 * 1024 ** 3  # stored activations above this (or a quarter of free memory) checkpoint


def activation_bytes(lm: LoadedModel, tokens: int, n_layers: int) -> int:
    """Estimated bytes a training pass stores for the backward pass: per token and layer about 16 d_model +
    4 d_ff values (attention and MLP inputs, norms, activations), at 4 bytes (fp32 residual stream)."""
    cfg = lm.model.config.get_text_config() if hasattr(lm.model.config, "get_text_config") else lm.model.config
    d = lm.sites.d_model
    d_ff = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or getattr(cfg, "ffn_dim", None) or 4 * d
    return int(tokens) * int(n_layers) * (16 * d + 4 * int(d_ff)) * 4


def memory_budget() -> int:
    """ACTIVATION_BUDGET_BYTES, or a quarter of the memory available now if that is less."""
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return ACTIVATION_BUDGET_BYTES
    return int(min(ACTIVATION_BUDGET_BYTES, free // 4))


def checkpointing_needed(lm: LoadedModel, config: TrainConfig, enc: EncodedPairs, n_edits: int, n_layers: int,
                         packed: bool) -> bool:
    """config.gradient_checkpointing resolved: "auto" checkpoints only where the largest training batch's
    stored activations (`activation_bytes`, E copies) exceed `memory_budget()`."""
    if config.gradient_checkpointing != "auto":
        return bool(config.gradient_checkpointing)
    if packed:
        longest = max(packed_lengths(enc))
    else:
        longest = 2 * max(len(p) + len(c) for p, c in enc.sequences())
    tokens = n_edits * min(config.batch_size, len(enc)) * longest
    return activation_bytes(lm, tokens, n_layers) > memory_budget()


class StackRunner:
    """Forward passes of a LoRAStack on pair batches: full model, or from the cached prefix."""

    def __init__(self, lm: LoadedModel, stack: LoRAStack, config: TrainConfig, precision: ResolvedPrecision) -> None:
        self.lm, self.stack, self.config = lm, stack, config
        self.precision = require_resolved(precision, "StackRunner")
        self.lowest = min(stack.layers)
        self.use_prefix = bool(config.frozen_prefix and self.lowest > 0 and prefix_supported(lm))
        if config.frozen_prefix and self.lowest > 0 and not self.use_prefix:
            log.info("frozen prefix not enabled for family %r: using the full forward", lm.sites.model_type)
        self.logp_fn = completion_logprobs
        self.tiled = False
        self.packed = False
        self.feed: dict | None = None
        self.active = False
        self.checkpointing = config.gradient_checkpointing is True  # resolved by choose_logp_fn

    def choose_logp_fn(self, enc: EncodedPairs) -> bool:
        """Use tiled log-probs and packed pairs where configured and checked (`choose_layout`)."""
        self.tiled, self.packed = choose_layout(self.lm, enc, self.config, self.precision)
        self.logp_fn = tiled_completion_logprobs if self.tiled else completion_logprobs
        n_run = self.lm.sites.n_layers - (self.lowest if self.use_prefix else 0)
        self.checkpointing = checkpointing_needed(self.lm, self.config, enc, self.stack.n_edits, n_run, self.packed)
        return self.tiled

    def states(self, enc: EncodedPairs) -> PrefixStates | None:
        if not self.use_prefix:
            return None
        return PREFIX_CACHE.get(self.lm, enc, self.lowest, self.precision, self.config.eval_batch_size,
                                self.config.progress, self.packed)

    @contextmanager
    def session(self) -> Iterator[None]:
        """Attach the edits, cut the model to the layers above the prefix and (optionally) checkpoint them,
        for a whole training run: the backward passes, which recompute checkpointed layers, need them too."""
        run = run_from_layer(self.lm, self.lowest) if self.use_prefix else nullcontext()
        with self.stack.attached(), run as feed, checkpointed_layers(self.lm, self.checkpointing):
            self.feed, self.active = feed, True
            try:
                yield
            finally:
                self.feed, self.active = None, False

    def logps(self, enc: EncodedPairs, idx: Sequence[int], states: PrefixStates | None) -> PairLogps:
        """Policy PairLogps with tensors [E, B] for the stack's E active edits (active edit e on copy e of the
        batch of pairs `idx`); inside `session`."""
        if not self.active:
            raise RuntimeError("StackRunner.logps runs inside StackRunner.session()")
        E, B = self.stack.n_active, len(idx)
        # packed: short pairs in one row, so that a small batch is one larger matrix product
        batch = pack_pairs(enc, idx, one_row=None) if self.packed else enc.batch(idx)
        dev = self.lm.device
        if states is not None:
            h = states.batch(idx, len(enc), batch.input_ids.shape[1], one_row=self.packed and batch.one_row)
            self.feed["h"] = (h.repeat(E, 1, 1) if E > 1 else h).to(dev)
        with self.precision.autocast(self.lm.dtype):
            if self.packed:
                sums, counts = packed_logprobs(self.lm.model, batch.replicate(E).to(dev))
            else:
                sums, counts = self.logp_fn(self.lm.model, replicate(batch, E).to(dev))
        sums, counts = sums.float().view(E, 2 * B), counts.view(E, 2 * B)
        return PairLogps(sums[:, :B], sums[:, B:], counts[:, :B], counts[:, B:])

    def evaluate(self, enc: EncodedPairs, ref: PairLogps | None, states: PrefixStates | None) -> list[dict | None]:
        """Per edit of the stack: validation loss, preference accuracy and mean margin (no grad, length-sorted
        batches); None for an edit that is not active (stopped early: it is not run)."""
        E = self.stack.n_active
        order = length_sorted(enc)
        per = max(1, self.config.eval_batch_size // (2 * E))  # pairs per forward: 2 sequences x E copies
        parts = []
        with torch.no_grad():
            for s in range(0, len(order), per):
                idx = order[s: s + per]
                parts.append((idx, self.logps(enc, idx, states)))
        idx_all = [i for idx, _ in parts for i in idx]
        cat = PairLogps(*(torch.cat([getattr(p, f) for _, p in parts], dim=1).cpu()
                          for f in ("chosen", "rejected", "n_chosen", "n_rejected")))
        out: list[dict | None] = [None] * self.stack.n_edits
        active = self.stack.active if self.stack.active is not None else range(self.stack.n_edits)
        for e, k in enumerate(active):
            pol = cat.index((e, slice(None)))
            stats = preference_stats(pol)
            r = ref.index(idx_all) if ref is not None else None
            loss = pair_loss(self.config.objective, pol, r, self.config.tau, self.config.beta)
            out[k] = {"val_loss": float(loss.mean()), "val_accuracy": stats["accuracy"], "val_margin": stats["margin"]}
        return out


def validation_before(config: TrainConfig, ref_val: PairLogps) -> dict:
    """Validation of the unedited model: the policy is the reference itself."""
    stats = preference_stats(ref_val)
    loss = pair_loss(config.objective, ref_val, ref_val, config.tau, config.beta)
    return {"val_loss": float(loss.mean()), "val_accuracy": stats["accuracy"], "val_margin": stats["margin"]}


def train_stack(lm: LoadedModel, heads_list: Sequence[HeadSet], enc_train: EncodedPairs,
                enc_val: EncodedPairs | None, config: TrainConfig, lrs: Sequence[float],
                label: str = "", precision: ResolvedPrecision | None = None,
                checkpoint: PassCheckpoint | None = None) -> tuple[LoRAStack, list[TrainLog]]:
    """Train len(heads_list) edits together; returns the trained stack and one TrainLog per edit. `precision`:
    `config.precision` resolved once by the caller (`prepare`); None resolves it here (a direct call).
    `checkpoint`: the pass writes its state there after every early-stopping check and, started again, goes on
    from it (edit/resume.py); it is bound to this pass's key here, and the caller clears it once the edits are saved."""
    if len(lrs) != len(heads_list):
        raise ConfigError(f"train_stack: {len(lrs)} learning rates for {len(heads_list)} edits")
    prec = as_precision(config.precision, lm.device) if precision is None else require_resolved(precision, "train_stack")
    with frozen_bf16_weights(lm.model, prec.name == "bf16" and prec.form == "bf16-weights"
                             and lm.dtype != torch.bfloat16 and config.cast_frozen_weights):
        return _train_stack(lm, heads_list, enc_train, enc_val, config, lrs, label, prec, checkpoint)


def _train_stack(lm: LoadedModel, heads_list: Sequence[HeadSet], enc_train: EncodedPairs,
                 enc_val: EncodedPairs | None, config: TrainConfig, lrs: Sequence[float],
                 label: str, precision: ResolvedPrecision,
                 checkpoint: PassCheckpoint | None = None) -> tuple[LoRAStack, list[TrainLog]]:
    # Long on purpose: one training loop (micro-batches, gradient accumulation, schedule, early stopping, dose
    # snapshots) whose steps share the optimizer, the stack and the step count; pieces would pass most of that state
    # back and forth.
    t0 = time.perf_counter()
    E = len(heads_list)
    dev = lm.device
    cfg = config
    stack = build_stack(lm.sites, heads_list, cfg.rank, cfg.reparam, seeds=[cfg.seed] * E).to(dev)
    runner = StackRunner(lm, stack, cfg, precision)
    tiled = runner.choose_logp_fn(enc_train)
    need_ref = cfg.objective in ("ipo", "dpo")
    ref_train = reference_logps(lm, enc_train, runner.precision, cfg.eval_batch_size, cfg.reference_disk_cache,
                                cfg.progress, tiled, runner.packed) if need_ref else None
    ref_val = reference_logps(lm, enc_val, runner.precision, cfg.eval_batch_size, cfg.reference_disk_cache,
                              cfg.progress, tiled, runner.packed) if enc_val is not None else None
    st_train = runner.states(enc_train)
    if cfg.eval_every is not None and enc_val is None:
        raise ConfigError("TrainConfig.eval_every (early stopping on validation) needs validation pairs; none given")
    st_val = runner.states(enc_val) if enc_val is not None and (cfg.eval_each_epoch or cfg.eval_every) else None

    logs = [TrainLog(hs.name, float(lr), n_train=len(enc_train), n_val=len(enc_val) if enc_val else 0,
                     lowest_layer=runner.lowest, frozen_prefix=runner.use_prefix,
                     tiled_logps=tiled, packed_pairs=runner.packed, gradient_checkpointing=runner.checkpointing)
            for hs, lr in zip(heads_list, lrs)]
    if ref_val is not None:
        before = validation_before(cfg, ref_val)
        for lg in logs:
            lg.before = dict(before)

    opt = torch.optim.AdamW([{"params": stack.edit_parameters(e), "lr": float(lrs[e])} for e in range(E)],
                            betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
    n = len(enc_train)
    n_micro = math.ceil(n / cfg.batch_size)
    epochs = cfg.resolved_epochs()
    total, warmup = cfg.total_steps(n), cfg.warmup_steps(n)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_schedule(total, warmup))
    stopper = None
    if cfg.eval_every is not None:  # patience counts from the end of the warm-up
        stopper = EarlyStopping(stack, cfg.patience, cfg.min_delta, count_from=warmup)
        for lg in logs:
            lg.patience_from = warmup
    snap_at = set(cfg.resolved_snapshots(total))
    last_eval: tuple[int, list[dict]] | None = None  # (step, per-edit validation) of the latest early-stopping check
    said = [time.perf_counter()]  # when progress was last logged
    resumed = None
    if checkpoint is not None:
        checkpoint.bind(pass_key(lm.fingerprint, [hs.to_string() for hs in heads_list], list(lrs), cfg.key_dump(),
                                 enc_train.key, enc_val.key if enc_val is not None else None, runner.precision.key,
                                 {"tiled": tiled, "packed": runner.packed, "prefix": runner.use_prefix}),
                        [hs.to_string() for hs in heads_list], list(lrs))
        resumed = checkpoint.load()
        if resumed is not None and stopper is not None and stale_stop(resumed, warmup, cfg.patience):
            log.warning("%s: not resuming from %s: an edit in it was stopped by evaluations inside the learning-rate "
                        "warm-up, which no longer count against patience; training the pass again",
                        label or f"{E} edit(s)", checkpoint.path)
            resumed = None
    ckpt_every = cfg.eval_every or RESUME_EVERY_STEPS

    def check(step: int, epoch: float) -> list[dict]:
        """Early stopping: validation of every edit after `step` optimizer steps, recorded and judged."""
        nonlocal last_eval
        vals = runner.evaluate(enc_val, ref_val, st_val)
        was = [stopper.is_stopped(e) for e in range(E)]  # a stopped edit's curve ends where it stopped
        stopper.update(step, [v["val_loss"] if v is not None else math.nan for v in vals])
        for e, v in enumerate(vals):
            if not was[e] and v is not None:
                logs[e].evals.append({"step": step, "epoch": epoch, **v})
        last_eval = (step, vals)
        if not stopper.all_stopped:  # stopped edits leave the batch: the rest of the pass runs only the others
            stack.set_active([e for e in range(E) if not stopper.is_stopped(e)])
        if time.perf_counter() - said[0] >= PROGRESS_EVERY_S:  # a long pass says where it is, at most once a minute
            said[0] = time.perf_counter()
            log.info("%s: step %d of at most %d (%.0f s); validation %s loss %s; %d of %d edit(s) stopped",
                     label or f"{E} edit(s)", step, total, said[0] - t0, cfg.objective.upper(),
                     " ".join(f"{v['val_loss']:.4g}" if v is not None else "-" for v in vals),
                     sum(stopper.is_stopped(e) for e in range(E)), E)
        return vals

    step, start_epoch, skip = 0, 0, 0
    if resumed is not None:  # go on where an earlier attempt of this very pass checkpointed
        resume_state(resumed, stack, opt, sched, stopper, logs)
        step, start_epoch, skip = resumed.step, resumed.epoch, resumed.next_batch
        last_eval = tuple(resumed.info["last_eval"]) if resumed.info["last_eval"] is not None else None
        t0 = time.perf_counter() - resumed.seconds  # the pass's cost: this attempt's set-up is not counted twice
        for lg in logs:
            lg.resumed_at.append(step)
        log.info("%s: resuming at optimizer step %d (epoch %d, micro-batch %d) from %s", label or f"{E} edit(s)",
                 step, start_epoch, skip, checkpoint.path)
    with runner.session():
        bar = tqdm(total=epochs * n_micro, initial=start_epoch * n_micro + skip, desc=label or f"train {E} edit(s)",
                   disable=not cfg.progress, leave=False)
        try:
            if stopper is not None and resumed is None:
                check(0, 0.0)  # the unedited state (b = 0) is the first candidate
            for epoch in range(start_epoch, epochs):
                g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
                perm = torch.randperm(n, generator=g).tolist()
                batches = [perm[s: s + cfg.batch_size] for s in range(0, n, cfg.batch_size)]
                epoch_loss = torch.zeros(E)
                acc_loss = torch.zeros(E)
                n_seen = [0] * E  # micro-batches each edit trained on this epoch (a stopped edit leaves the batch)
                if resumed is not None and epoch == start_epoch:
                    epoch_loss = torch.tensor(resumed.info["epoch_loss"], dtype=epoch_loss.dtype)
                    n_seen = list(resumed.info["n_seen"])
                else:
                    skip = 0
                opt.zero_grad(set_to_none=True)
                for k, idx in enumerate(batches):
                    if k < skip:  # trained before the checkpoint this attempt resumed from
                        continue
                    group_start = (k // cfg.grad_accum) * cfg.grad_accum
                    group_size = min(cfg.grad_accum, len(batches) - group_start)
                    act = list(range(E)) if stack.active is None else list(stack.active)
                    pol = runner.logps(enc_train, idx, st_train)
                    ref = ref_train.index(idx).to(dev) if ref_train is not None else None
                    losses = pair_loss(cfg.objective, pol, ref, cfg.tau, cfg.beta).mean(-1)  # [active edits]
                    if not torch.isfinite(losses.detach()).all():
                        bad = [heads_list[e].name for j, e in enumerate(act) if not math.isfinite(float(losses[j].detach()))]
                        raise TrainingError(
                            f"non-finite {cfg.objective} loss at optimizer step {step} (epoch {epoch}, micro-batch {k}) "
                            f"on pairs {idx} (qids {[enc_train.pairs[i].qid for i in idx]}) for edit(s) {bad}: "
                            f"{losses.tolist()}; try a lower lr or precision fp32 (this run: {runner.precision.name})"
                        )
                    (losses.sum() / group_size).backward()
                    ld = losses.detach().float().cpu()
                    full = torch.zeros(E)
                    full[act] = ld
                    epoch_loss += full
                    acc_loss += full / group_size
                    for e in act:
                        n_seen[e] += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{float(ld.mean()):.4f}", epoch=epoch)
                    if k + 1 == group_start + group_size:
                        if stopper is not None:
                            stopper.mask_stopped_grads()  # a stopped edit keeps its parameters and moments
                        norms = []
                        for e in range(E):
                            if cfg.max_grad_norm is not None:
                                norms.append(float(torch.nn.utils.clip_grad_norm_(stack.edit_parameters(e),
                                                                                   cfg.max_grad_norm)))
                            else:
                                norms.append(float("nan"))
                        lr_now = [grp["lr"] for grp in opt.param_groups]
                        opt.step()
                        sched.step()
                        opt.zero_grad(set_to_none=True)
                        for e in act:  # the edits this step trained
                            logs[e].steps.append({"step": step, "epoch": epoch, "loss": float(acc_loss[e]),
                                                  "lr": lr_now[e], "grad_norm": norms[e]})
                        acc_loss.zero_()
                        step += 1
                        if step in snap_at:
                            for e in range(E):
                                if stopper is None or not stopper.is_stopped(e):
                                    logs[e].snapshots[step] = stack.edit_tensors(e)
                        if stopper is not None and step % cfg.eval_every == 0:
                            check(step, epoch + (k + 1) / len(batches))
                            if stopper.all_stopped:
                                break
                        if checkpoint is not None and step % ckpt_every == 0:
                            checkpoint.save(capture_state(stack, opt, sched, stopper, logs, step, epoch, k + 1,
                                                          time.perf_counter() - t0, epoch_loss, n_seen, last_eval))
                rec = [{"epoch": epoch + 1, "train_loss": float(epoch_loss[e] / max(n_seen[e], 1))} for e in range(E)]
                if enc_val is not None and cfg.eval_each_epoch:
                    vals = (last_eval[1] if last_eval is not None and last_eval[0] == step
                            else runner.evaluate(enc_val, ref_val, st_val))
                    for e, v in enumerate(vals):
                        if v is not None:
                            rec[e].update(v)
                for e in range(E):
                    logs[e].epochs.append(rec[e])
                if stopper is not None and stopper.all_stopped:
                    break
            if stopper is not None:
                if last_eval is None or last_eval[0] != step:
                    check(step, float(epochs))  # the last state is a candidate too
                _finish_early_stopping(stopper, logs, step)
        finally:
            bar.close()
            stack.set_active(None)
    secs = time.perf_counter() - t0
    log.info("%s: trained %d step(s) in %.0f s", label or f"{E} edit(s)", step, secs)
    for e, lg in enumerate(logs):
        lg.seconds = secs
        lg.diverged = divergence(*stack.edit_tensors(e), lg)
        if lg.diverged:
            log.warning("edit %s diverged: %s", lg.heads, lg.diverged)
    return stack, logs


def _finish_early_stopping(stopper: EarlyStopping, logs: list[TrainLog], step: int) -> None:
    """Put each edit's best-validation state back into the stack and record it in its log."""
    stopper.restore_best()
    for e, lg in enumerate(logs):
        best = next(v for v in lg.evals if v["step"] == stopper.best_step[e])
        lg.best = dict(best)
        lg.stopped_step = stopper.stopped_at[e]
        lg.steps_run = int(step)


MAX_EDIT_ABS = 1e4  # an edit parameter beyond this magnitude has exploded (Adam moves ~lr per step)
VAL_LOSS_FACTOR = 10.0  # a validation loss this many times its start (and 1 above it) has diverged


def divergence(a: Float[Tensor, "layer rank hd"], b: Float[Tensor, "layer rank out"], tlog: TrainLog) -> str | None:
    """Why a trained edit cannot be trusted (non-finite or exploding parameters, validation loss far
    above its start), naming the values and the learning rate; None if it looks sane."""
    cause = f"the learning rate lr={tlog.lr:g} is likely too high"
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return f"non-finite edit parameters after training; {cause}"
    big = max(float(a.abs().max()), float(b.abs().max())) if a.numel() and b.numel() else 0.0
    if big > MAX_EDIT_ABS:
        return f"edit parameters exploded (largest |value| {big:.3g} > {MAX_EDIT_ABS:g}); {cause}"
    v0, v1 = tlog.before.get("val_loss"), tlog.after.get("val_loss")
    if v0 is not None and v1 is not None:
        if not math.isfinite(v1):
            return f"validation loss is {v1} after training (it was {v0:.4g}); {cause}"
        if v1 > VAL_LOSS_FACTOR * max(abs(v0), 0.1) and v1 > v0 + 1.0:
            return f"validation loss rose from {v0:.4g} to {v1:.4g} (over {VAL_LOSS_FACTOR:g}x its start); {cause}"
    return None


def make_edit(lm: LoadedModel, stack: LoRAStack, e: int, heads: HeadSet, config: TrainConfig, lr: float,
              fmt: PromptFormat, tlog: TrainLog, enc_train: EncodedPairs, enc_val: EncodedPairs | None,
              precision: ResolvedPrecision) -> LoRAEdit:
    """Edit e of a trained stack as a LoRAEdit with its meta (model, objective, hyper-parameters, curve)."""
    a, b = stack.edit_tensors(e)
    cfg = config.key_dump()
    cfg["lr"] = float(lr)
    meta = {
        "model": {"name": lm.name, "fingerprint": lm.fingerprint},
        "objective": config.objective,
        "config": cfg,
        "precision": require_resolved(precision, "make_edit").meta(),
        "format": {"kind": fmt.kind, "system": fmt.system},
        "data": {"n_train": len(enc_train), "n_val": len(enc_val) if enc_val else 0, "train_key": enc_train.key,
                 "val_key": enc_val.key if enc_val else None},
        "final": {"before": tlog.before, "after": tlog.after},
        "curve": tlog.to_dict(),
    }
    return LoRAEdit(a, b, heads, config.reparam, meta)


def resolve_config(config: TrainConfig | dict | None, **overrides) -> TrainConfig:
    if config is None:
        config = TrainConfig.make(**overrides)
    elif isinstance(config, dict):
        config = TrainConfig.make(**{**config, **overrides})
    elif overrides:
        config = TrainConfig.make(**{**config.model_dump(), **overrides})
    return config


@dataclass
class Prepared:
    """What a training run needs besides the model: the config, the per-edit learning rates and the
    encoded train/validation pairs."""

    config: TrainConfig
    fmt: PromptFormat
    lrs: list[float]
    enc_train: EncodedPairs
    enc_val: EncodedPairs | None
    precision: ResolvedPrecision  # config.precision resolved once, for every step of the run


def prepare(lm: LoadedModel, heads_list: Sequence[HeadSet], train_pairs: Sequence[PreferencePair],
            val_pairs: Sequence[PreferencePair] | None, fmt: PromptFormat | None,
            config: TrainConfig | dict | None, lrs: Sequence[float] | None = None, **overrides) -> Prepared:
    """Resolve the config and learning rates (lr=None: the paper's default per head-set size) and encode the pairs."""
    cfg = resolve_config(config, **overrides)
    fmt = fmt or PromptFormat("plain")
    heads_list = list(heads_list)
    if not heads_list:
        raise ConfigError("train_edits: no head sets given")
    L, H = lm.sites.n_layers, lm.sites.n_heads
    if lrs is None:
        lrs = [cfg.resolved_lr(len(hs), L * H) for hs in heads_list]
    elif len(lrs) != len(heads_list):
        raise ConfigError(f"train_edits: {len(lrs)} learning rates for {len(heads_list)} head sets")
    enc_train = encode_pairs(lm.tokenizer, train_pairs, fmt, cfg.max_length, lm.fingerprint)
    enc_val = encode_pairs(lm.tokenizer, val_pairs, fmt, cfg.max_length, lm.fingerprint) if val_pairs else None
    return Prepared(cfg, fmt, [float(x) for x in lrs], enc_train, enc_val, as_precision(cfg.precision, lm.device))


def train_edit(lm: LoadedModel, heads: HeadSet, train_pairs: Sequence[PreferencePair],
               val_pairs: Sequence[PreferencePair] | None = None, fmt: PromptFormat | None = None,
               config: TrainConfig | dict | None = None, **overrides) -> tuple[LoRAEdit, TrainLog]:
    """Train one optimal localized edit at `heads`; returns the edit and its training curve.

    `config` (or keyword overrides of its fields) sets the objective and hyper-parameters; lr=None takes
    the paper's default for len(heads). Same result as `multi.train_edits` with one head set.
    """
    p = prepare(lm, [heads], train_pairs, val_pairs, fmt, config, **overrides)
    stack, logs = train_stack(lm, [heads], p.enc_train, p.enc_val, p.config, p.lrs, heads.name, p.precision)
    tlog = logs[0]
    edit = make_edit(lm, stack, 0, heads, p.config, p.lrs[0], p.fmt, tlog, p.enc_train, p.enc_val, p.precision)
    if tlog.diverged:
        raise TrainingError(f"edit at {heads.name} diverged: {tlog.diverged}; it was not saved")
    return edit, tlog

