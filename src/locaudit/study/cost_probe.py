"""What a study's optimal edits will cost on this machine, measured before any trial runs (`locaudit run STUDY
--dry-run --measure`).

A pilot's ledger gives trial costs (`--pilot`), but the first study on a new model has none. This module times the
study's own building blocks, on its model, precision, data and settings: a few optimizer steps of an edit at all
heads (the costliest start: no frozen prefix), one validation pass, and an evaluation of a few edits together on a
few questions (MC on the split, KL, and greedy generation; evaluate/shared.py, as a study's group of edits is
scored), then multiplies them out per optimal trial:

    training  = steps x (L - lowest layer) / L x (step + validation / eval_every)
    evaluation = MC per question x questions + KL + generation per question x generated questions
    dose       = (MC + KL) per dose point

How many steps an edit trains is not known before it runs (early stopping): the estimate is a range, from the
earliest stop (`patience` checks without improvement after the learning-rate warm-up,
`TrainConfig.earliest_stop`) to the cap (`max_epochs` epochs). Edits trained together in one pass cost less
than this (edit/multi.py: about `group_copy_cost` of a pass of their own), so the upper end is an upper bound. Each figure is given in wall seconds and in process-CPU seconds (CPU time is steadier
when other work shares the machine; wall time is what a run on a quiet machine would take).
"""

from __future__ import annotations

import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

Q_MC = 16  # questions timed for MC (scaled to the split's count)
Q_GEN = 4  # questions timed for generation (scaled to the generated count)
N_EVAL = 4  # edits evaluated together, as a study's group is (per-edit cost: the time / N_EVAL)


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(t: tuple[float, float]) -> dict[str, float]:
    w, c = _clock()
    return {"wall_s": w - t[0], "cpu_s": c - t[1]}


def time_training(lm, heads, enc_train, enc_val, config, lr: float, precision, steps: int) -> dict:
    """Seconds per optimizer step of one edit at `heads` (`train_stack` itself on `enc_train`: `steps` optimizer
    steps' worth of pairs, one epoch), and of one validation pass over `enc_val` (`StackRunner.evaluate`, what an
    early-stopping check runs). A first pass with validation fills the caches a study fills once per dataset
    (reference log-probs, prefix states, the layout check), so neither timing includes them. Wall and process-CPU
    seconds."""
    from locaudit.edit.lora import build_stack
    from locaudit.edit.reference import reference_logps
    from locaudit.edit.train import StackRunner, train_stack

    base = config.model_copy(update={"epochs": 1, "max_epochs": 1, "eval_every": None, "eval_each_epoch": False,
                                     "snapshot_steps": None, "progress": False})
    warm = base.model_copy(update={"eval_every": steps, "patience": 10 ** 6}) if enc_val is not None else base
    train_stack(lm, [heads], enc_train, enc_val, warm, [lr], "measure (warm-up)", precision)
    t = _clock()
    train_stack(lm, [heads], enc_train, None, base, [lr], "measure", precision)
    plain = _since(t)
    out: dict = {"steps": steps, "n_val": len(enc_val) if enc_val is not None else 0}
    for k in ("wall", "cpu"):
        out[f"step_{k}_s"] = plain[f"{k}_s"] / steps
    if enc_val is not None:
        runner = StackRunner(lm, build_stack(lm.sites, [heads], base.rank, base.reparam).to(lm.device), base, precision)
        runner.choose_logp_fn(enc_train)
        ref = reference_logps(lm, enc_val, precision, base.eval_batch_size, base.reference_disk_cache, False,
                              runner.tiled, runner.packed) if base.objective in ("ipo", "dpo") else None
        states = runner.states(enc_val)
        with runner.session():
            t = _clock()
            runner.evaluate(enc_val, ref, states)
            val = _since(t)
        out.update({f"val_{k}_s": val[f"{k}_s"] for k in ("wall", "cpu")})
    return out


def measure_study(spec: Any, steps: int = 4) -> dict:
    """Measure the pieces (module docstring) and estimate each optimal trial's cost; returns
    {"measured": {...}, "optimal": {"trials", "low_wall_s", "high_wall_s", "low_cpu_s", "high_cpu_s", ...}}."""
    from locaudit.edit.lora import LoRAEdit, build_stack
    from locaudit.edit.train import prepare
    from locaudit.heads import HeadSet
    from locaudit.study.payloads import OptimalTrial
    from locaudit.study.steps.context import RunContext
    from locaudit.study.steps.evaluation import _config
    from locaudit.study.steps.optimal import _subsample
    from locaudit.study.trials import expand
    from locaudit.evaluate.shared import evaluate_edits

    trials = [t for t in expand(spec) if t.kind == "optimal"]
    if not trials:
        return {"measured": {}, "optimal": None}
    with tempfile.TemporaryDirectory(prefix="locaudit-measure-") as tmp:
        ctx = RunContext(spec, Path(tmp))
        lm = ctx.lm
        L, H = lm.sites.n_layers, lm.sites.n_heads
        first = trials[0].as_(OptimalTrial)
        cfg = first.train_config(ctx.precision.name)
        seed = first.data.seed
        train_pairs = _subsample(ctx.data.pairs("train"), first.max_train_pairs, seed)
        val_pairs = _subsample(ctx.data.pairs("val"), first.max_val_pairs, seed + 1)
        every = HeadSet.all(L, H)
        n_batch = steps * cfg.grad_accum * cfg.batch_size
        p = prepare(lm, [every], train_pairs[:n_batch], val_pairs, ctx.fmt, cfg, [first.lr])
        train = time_training(lm, every, p.enc_train, p.enc_val, p.config, first.lr, p.precision, steps)

        ev = first.evaluation
        ecfg = _config(ctx, ev)
        # evaluated as a study's group is (evaluate/shared.py: several edits together), at the head sets of its
        # first trials that need no ranking (random draws, single heads), with b = 0: an edit's cost, no change
        sets = [_heads(ctx, t) for t in trials if t.as_(OptimalTrial).localizer.kind not in ("top", "ranked")]
        sets = sets[:N_EVAL] or [every]
        edits = []
        for hs in sets:
            a, b = build_stack(lm.sites, [hs], cfg.rank, cfg.reparam, seeds=[cfg.seed]).edit_tensors(0)
            edits.append(LoRAEdit(a, b, hs, cfg.reparam))
        split = ev.split
        n_split = len(ctx.eval_view(split, ev.max_questions).questions(split))
        q = min(Q_MC, n_split)
        metrics = list(ev.metrics)
        measured: dict[str, Any] = {"train": train, "n_split": n_split, "edits_together": len(edits),
                                    "machine": machine(ctx.precision)}

        def per_edit(t) -> dict[str, float]:
            return {k: v / len(edits) for k, v in _since(t).items()}

        if "mc" in metrics:
            t = _clock()
            evaluate_edits(lm, edits, ctx.eval_view(split, q), split=split, metrics=["mc"], config=ecfg)
            measured["mc"] = {**per_edit(t), "questions": q}
        if "kl" in metrics or "ce" in metrics:
            t = _clock()
            evaluate_edits(lm, edits, ctx.eval_view(split, q), split=split, metrics=["kl"], config=ecfg)
            measured["kl"] = per_edit(t)
        n_gen = 0
        if "gen" in metrics:
            n_gen = min(n_split, ecfg.gen_max_questions or n_split)
            qg = min(Q_GEN, n_gen)
            t = _clock()
            evaluate_edits(lm, edits, ctx.eval_view(split, qg), split=split, metrics=["gen"], config=ecfg)
            measured["gen"] = {**per_edit(t), "questions": qg}
        measured["n_gen"] = n_gen
        est = _estimate(ctx, trials, cfg, measured, len(p.enc_val) if p.enc_val is not None else 0,
                        len(train_pairs))
    return {"measured": measured, "optimal": est}


def machine(precision: Any) -> dict[str, Any]:
    """Where the pieces were timed, for a measurement kept beside the numbers: the resolved precision and the
    CPU's (or GPU's) capability, torch's threads and version, and when (UTC)."""
    import torch

    meta = precision.meta()
    return {"precision": meta["precision"], "device": meta["device"], "cpu_capability": meta["cpu_capability"],
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "measured_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def _heads(ctx, trial):
    """The trial's head set; a draw that excludes the ranking's top heads (random16@3-top16, single heads) is drawn
    against a stand-in ranking (all heads in a seeded order): the ranking is not known before the study runs, and
    excluding a few heads barely moves where the draw's lowest layer falls."""
    from locaudit.study.payloads import OptimalTrial

    loc = trial.as_(OptimalTrial).localizer
    if not loc.needs_ranking:
        return ctx.heads(trial)
    import numpy as np

    L, H = ctx.lm.sites.n_layers, ctx.lm.sites.n_heads
    order = np.random.default_rng(0).permutation(L * H).tolist()
    return loc.resolve(L, H, [(i // H, i % H) for i in order])


def _estimate(ctx, trials: list, cfg, m: dict, n_val: int, n_train: int) -> dict:
    """Per trial: its training range (steps from the earliest stop to the cap, scaled by the layers it runs)
    plus its evaluations; summed over the trials, in wall and CPU seconds."""
    from locaudit.study.payloads import OptimalTrial

    L = ctx.lm.sites.n_layers
    tr = m["train"]
    cap, low_steps = cfg.total_steps(n_train), cfg.earliest_stop(n_train)
    out = {"trials": len(trials), "steps_low": low_steps, "steps_high": cap}
    for unit in ("wall_s", "cpu_s"):
        kind = unit.split("_")[0]
        step = tr[f"step_{kind}_s"] + (tr.get(f"val_{kind}_s", 0.0) / cfg.eval_every if cfg.eval_every else 0.0)
        ev = 0.0
        if "mc" in m:
            ev += m["mc"][unit] / m["mc"]["questions"] * m["n_split"]
        if "kl" in m:
            ev += m["kl"][unit]
        gen = m["gen"][unit] / m["gen"]["questions"] * m["n_gen"] if "gen" in m else 0.0
        dose_eval = ev  # a dose point is scored on the primary metric and KL
        lo = hi = 0.0
        for t in trials:
            p = t.as_(OptimalTrial)
            if p.localizer.kind in ("top", "ranked") or not cfg.frozen_prefix:  # the ranking is not known yet:
                frac = 1.0  # from layer 0, the upper bound
            else:
                frac = (L - min(_heads(ctx, t).layers)) / L
            points = len(p.dose_steps or [])
            fixed = ev + gen + points * dose_eval
            lo += low_steps * frac * step + fixed
            hi += cap * frac * step + fixed
        out[f"low_{unit}"], out[f"high_{unit}"] = lo, hi
        out[f"step_{unit}"], out[f"eval_{unit}"] = step, ev + gen
    return out


def measure_text(r: dict) -> list[str]:
    """The measurement as lines for the terminal."""
    o, m = r.get("optimal"), r.get("measured") or {}
    if not o:
        return ["  measured cost: no optimal trials"]
    tr = m["train"]
    w = m.get("machine")  # absent from a measurement written before it was kept
    where = (f" ({w['device']}, {w['cpu_capability']}, {w['precision']}, {w['threads']} thread(s), "
             f"{w['measured_at']})" if w else "")
    lines = [f"  measured on this machine{where}: an optimizer step at all heads {tr['step_wall_s']:.2f} s wall "
             f"({tr['step_cpu_s']:.2f} s CPU)"
             + (f", a validation pass over {tr['n_val']} pairs {tr['val_wall_s']:.1f} s" if "val_wall_s" in tr else "")
             + (f", MC {m['mc']['wall_s'] / m['mc']['questions']:.2f} s per question" if "mc" in m else "")
             + (f", KL {m['kl']['wall_s']:.1f} s per edit" if "kl" in m else "")
             + (f", generation {m['gen']['wall_s'] / m['gen']['questions']:.1f} s per question" if "gen" in m else "")]
    lines.append(f"  cost optimal (measured, {o['trials']} trials, each trained {o['steps_low']} to {o['steps_high']} "
                 f"steps: early stopping decides): {o['low_wall_s'] / 3600:.1f} to {o['high_wall_s'] / 3600:.1f} h "
                 f"wall ({o['low_cpu_s'] / 3600:.1f} to {o['high_cpu_s'] / 3600:.1f} h CPU), edits trained one at a "
                 "time; a pass of several costs less")
    return lines
