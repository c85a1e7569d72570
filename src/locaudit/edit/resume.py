"""Resume a training pass where it stopped, not from its beginning.

A pass of several edits trained together (edit/multi.py) can run for an hour on a CPU; a study killed in the
middle of one used to lose it all. With a checkpoint folder, `train_stack` writes the whole state of the pass
after every early-stopping check (every `eval_every` optimizer steps, else every `EVERY_STEPS`): the edits'
parameters, AdamW's moments, the schedule, the early-stopping bookkeeping (best states, patience counts, stopped
edits), the training curves and dose snapshots, and where in which epoch it stood. A new attempt of the same pass
loads it and goes on from the next micro-batch. Every step is deterministic (the batch order is seeded per epoch,
there is no dropout), so on the same machine the result equals an uninterrupted pass bit for bit
(tests/unit/test_resume_pass.py, fp32 and bf16); on another CPU it differs only by that CPU's rounding.

The checkpoint is ONE safetensors file (tensors; the rest as JSON in its metadata), written atomically, so a kill
while writing leaves the previous one. It is used only when its key matches the pass: the model, the head sets,
the learning rates, the training config, the data, the precision and the layout (`pass_key`); anything else
starts the pass afresh. The file holds tensors and JSON only: nothing is unpickled.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from locaudit.io import atomic_path, stable_hash

log = logging.getLogger(__name__)

FILE = "pass.safetensors"
FORMAT = 1
EVERY_STEPS = 16  # without early stopping, a checkpoint every this many optimizer steps
# config fields that change neither the numbers nor the plan of a pass: a resumed attempt may differ in them
NOT_IN_PASS_KEY = ("progress", "max_parallel", "group_copy_cost", "gradient_checkpointing", "reference_disk_cache")


def pass_key(model_fingerprint: str, heads: list[str], lrs: list[float], config: dict, train_key: str,
             val_key: str | None, precision_key: Any, layout: dict) -> str:
    """The content key of a training pass: what must be equal for a checkpoint to continue it."""
    cfg = {k: v for k, v in config.items() if k not in NOT_IN_PASS_KEY}
    return stable_hash({"format": FORMAT, "model": model_fingerprint, "heads": heads, "lrs": [float(x) for x in lrs],
                        "config": cfg, "train": train_key, "val": val_key, "precision": precision_key,
                        "layout": layout}, 24)


def _enc(x: Any) -> Any:
    """JSON-able with non-finite floats kept (the curves hold NaN grad norms): {"__float__": "nan"}."""
    if isinstance(x, float) and not math.isfinite(x):
        return {"__float__": repr(x)}
    if isinstance(x, dict):
        return {"__dict__": [[_enc(k), _enc(v)] for k, v in x.items()]} if any(not isinstance(k, str) for k in x) \
            else {k: _enc(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_enc(v) for v in x]
    return x


def _dec(x: Any) -> Any:
    if isinstance(x, dict):
        if set(x) == {"__float__"}:
            return float(x["__float__"])
        if set(x) == {"__dict__"}:
            return {_dec(k): _dec(v) for k, v in x["__dict__"]}
        return {k: _dec(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_dec(v) for v in x]
    return x


@dataclass
class PassState:
    """Where a pass stood after `step` optimizer steps: epoch `epoch`, its micro-batch `next_batch` to run next.

    tensors: named tensors (edit parameters, optimizer moments, best states, snapshots); info: the rest, JSON.
    """

    step: int
    epoch: int
    next_batch: int
    seconds: float
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


class PassCheckpoint:
    """The checkpoint folder of training passes under `root`; `bind(key)` selects one pass's file."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.key: str | None = None
        self.heads: list[str] = []
        self.lrs: list[float] = []

    @property
    def path(self) -> Path:
        if self.key is None:
            raise RuntimeError("PassCheckpoint: bind(key) first")
        return self.root / f"pass-{self.key}" / FILE

    def bind(self, key: str, heads: list[str] | None = None, lrs: list[float] | None = None) -> "PassCheckpoint":
        """Select the pass `key`; its head sets and learning rates are written beside its state (for a reader)."""
        self.key, self.heads, self.lrs = key, list(heads or []), [float(x) for x in lrs or []]
        return self

    def save(self, state: PassState) -> None:
        from safetensors.torch import save_file

        info = {"format": FORMAT, "key": self.key, "heads": self.heads, "lrs": self.lrs, "step": state.step,
                "epoch": state.epoch,
                "next_batch": state.next_batch, "seconds": state.seconds, "info": _enc(state.info)}
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.tensors.items()}
        with atomic_path(self.path) as tmp:
            save_file(tensors, str(tmp), metadata={"locaudit_pass": json.dumps(info, allow_nan=False)})

    def load(self) -> PassState | None:
        """The saved state of this pass, or None (none saved, or unreadable: then the pass starts afresh)."""
        from safetensors import SafetensorError, safe_open

        p = self.path
        if not p.exists():
            return None
        try:
            with safe_open(str(p), framework="pt") as f:
                info = json.loads((f.metadata() or {})["locaudit_pass"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            if info.get("format") != FORMAT or info.get("key") != self.key:
                raise ValueError(f"format {info.get('format')} / key {info.get('key')} is not this pass's")
            return PassState(int(info["step"]), int(info["epoch"]), int(info["next_batch"]), float(info["seconds"]),
                             tensors, _dec(info["info"]))
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
            log.warning("%s: cannot resume from this checkpoint (%s); the pass starts from its beginning", p, e)
            return None

    def clear(self) -> None:
        """Remove this pass's checkpoint (its edits are saved)."""
        if self.key is not None:
            shutil.rmtree(self.path.parent, ignore_errors=True)


# ---------------------------------------------------------------- the state of train_stack's loop


def capture(stack, opt: torch.optim.Optimizer, sched, stopper, logs: list, step: int, epoch: int, next_batch: int,
            seconds: float, epoch_loss: torch.Tensor, n_seen: list[int], last_eval) -> PassState:
    """Everything `train_stack` needs to go on after `step` optimizer steps (at a step boundary: no gradient is
    pending)."""
    tensors: dict[str, torch.Tensor] = {}
    for e in range(stack.n_edits):
        for j, p in enumerate(stack.edit_parameters(e)):
            tensors[f"edit.{e}.{j}"] = p.detach()
    sd = opt.state_dict()
    opt_scalars: dict[str, dict] = {}
    for i, st in sd["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{i}.{name}"] = v
            else:
                opt_scalars.setdefault(str(i), {})[name] = v
    info: dict[str, Any] = {
        "opt_groups": sd["param_groups"], "opt_scalars": opt_scalars, "opt_ids": [int(i) for i in sd["state"]],
        "sched": {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"},
        "active": None if stack.active is None else [int(e) for e in stack.active],
        "epoch_loss": [float(x) for x in epoch_loss], "n_seen": list(n_seen),
        "last_eval": None if last_eval is None else [last_eval[0], last_eval[1]],
        "logs": [{"steps": lg.steps, "epochs": lg.epochs, "evals": lg.evals, "resumed_at": lg.resumed_at,
                  "snapshots": sorted(lg.snapshots)} for lg in logs],
    }
    for e, lg in enumerate(logs):
        for s, parts in lg.snapshots.items():
            for j, t in enumerate(parts):
                tensors[f"snap.{e}.{s}.{j}"] = t
    if stopper is not None:
        info["stopper"] = {"best_loss": stopper.best_loss, "best_step": stopper.best_step, "bad": stopper.bad,
                           "stopped_at": stopper.stopped_at, "count_from": stopper.count_from,
                           "has_best": [s is not None for s in stopper.best_state]}
        for e, st in enumerate(stopper.best_state):
            for j, t in enumerate(st or []):
                tensors[f"best.{e}.{j}"] = t
    return PassState(step, epoch, next_batch, seconds, tensors, info)


def restore(state: PassState, stack, opt: torch.optim.Optimizer, sched, stopper, logs: list) -> None:
    """Put `state` (from `capture` on the same pass) back into the loop's objects. A state saved before early
    stopping's patience skipped the warm-up has its edits' counts of evaluations without improvement counted
    again from their curves (`stale_stop` says whether one of its edits was stopped by the old count)."""
    t, info = state.tensors, state.info
    with torch.no_grad():
        for e in range(stack.n_edits):
            for j, p in enumerate(stack.edit_parameters(e)):
                p.copy_(t[f"edit.{e}.{j}"])
    st: dict[int, dict] = {}
    for i in info["opt_ids"]:
        d = {k[len(f"opt.{i}."):]: v for k, v in t.items() if k.startswith(f"opt.{i}.")}
        d.update(info["opt_scalars"].get(str(i), {}))
        st[int(i)] = d
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in info["opt_groups"]]
    opt.load_state_dict({"state": st, "param_groups": groups})
    sched.load_state_dict({**info["sched"], "lr_lambdas": [None] * len(opt.param_groups)})
    stack.set_active(info["active"])
    for e, (lg, d) in enumerate(zip(logs, info["logs"])):
        lg.steps, lg.epochs, lg.evals = d["steps"], d["epochs"], d["evals"]
        lg.resumed_at = list(d.get("resumed_at") or [])
        lg.snapshots = {int(s): tuple(v for k, v in sorted(((k, v) for k, v in t.items()
                                                            if k.startswith(f"snap.{e}.{s}.")),
                                                           key=lambda kv: int(kv[0].rsplit(".", 1)[1])))
                        for s in d["snapshots"]}
    if stopper is not None:
        s = info["stopper"]
        stopper.best_loss = [float(x) for x in s["best_loss"]]
        stopper.best_step, stopper.bad, stopper.stopped_at = list(s["best_step"]), list(s["bad"]), list(s["stopped_at"])
        if "count_from" not in s:  # saved before warm-up evaluations stopped counting: count them again without those
            stopper.bad = [b if stopper.stopped_at[e] is not None else
                           sum(1 for v in logs[e].evals if stopper.best_step[e] < int(v["step"]) and
                               int(v["step"]) >= stopper.count_from)
                           for e, b in enumerate(stopper.bad)]
        stopper.best_state = [
            [t[f"best.{e}.{j}"].clone() for j in range(len(stack.edit_parameters(e)))] if has else None
            for e, has in enumerate(s["has_best"])]


def stale_stop(state: PassState, warmup_steps: int, patience: int) -> bool:
    """Whether a pass state saved before patience skipped the warm-up holds an edit that its old count stopped
    inside the warm-up (edit.stopping.stopped_in_warmup): such a state cannot go on under today's rule."""
    from locaudit.edit.stopping import stopped_in_warmup

    s = state.info.get("stopper")
    if not s or "count_from" in s:
        return False
    return any(at is not None and stopped_in_warmup({"stopped_step": at, "evals": d["evals"]}, warmup_steps, patience)
               for at, d in zip(s["stopped_at"], state.info["logs"]))
