"""`locaudit edit`: train an optimal localized edit (head-masked reparameterised LoRA, IPO) at a head set."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Optional

import typer

from locaudit.cli import options as opt
from locaudit.cli.options import (DType, config_option, data_option, device_option, dtype_option, format_option,
                                  max_questions_option, model_option, precision_option, seed_option, value)
from locaudit.edit.config import TrainConfig
from locaudit.models.precision import Precision

log = logging.getLogger(__name__)

EXAMPLE = (
    "Example:\n\n"
    "  locaudit edit --data truthfulqa:$(locaudit data path truthfulqa-v1) --probe runs/probe "
    "--heads top16 --objective ipo --tau 0.1 --epochs 2 --out runs/edit_top16"
)


def edit(
    out: Path = typer.Option(..., "--out", help="Folder for the edit: edit.safetensors (a, b) and meta.json."),
    data: str = data_option(),
    model: str = model_option(),
    heads: str = typer.Option("top16", "--heads", help="Head set: top16 (needs --probe), random16@3, "
                              "random16@3-top16, single@5, L12, L12H3,L20H1 or all."),
    probe: Optional[Path] = typer.Option(None, "--probe", help="Folder written by `locaudit probe`; its "
                                         "ranking resolves topK head sets."),
    objective: str = config_option(TrainConfig, "objective", "--objective"),
    tau: float = config_option(TrainConfig, "tau", "--tau"),
    beta: float = config_option(TrainConfig, "beta", "--beta"),
    lr: Optional[float] = config_option(TrainConfig, "lr", "--lr"),
    epochs: int = config_option(TrainConfig, "epochs", "--epochs"),
    batch_size: int = config_option(TrainConfig, "batch_size", "--batch-size"),
    grad_accum: int = config_option(TrainConfig, "grad_accum", "--grad-accum"),
    rank: int = config_option(TrainConfig, "rank", "--rank"),
    reparam: bool = config_option(TrainConfig, "reparam", "--reparam/--plain"),
    train_seed: int = config_option(TrainConfig, "seed", "--train-seed"),
    seed: int = seed_option(),
    max_questions: Optional[int] = max_questions_option(),
    max_pairs: Optional[int] = typer.Option(None, "--max-pairs", **opt.count("--max-pairs"), help="Seeded subset of training pairs."),
    max_val_pairs: Optional[int] = typer.Option(None, "--max-val-pairs", **opt.count("--max-val-pairs"), help="Seeded subset of held-out pairs."),
    val_split: str = typer.Option("val", "--val-split", help="Held-out split for validation loss and "
                                  "preference accuracy: val or test."),
    fmt: str = format_option(),
    max_length: int = config_option(TrainConfig, "max_length", "--max-length"),
    precision: Precision = precision_option(),
    frozen_prefix: bool = config_option(TrainConfig, "frozen_prefix", "--frozen-prefix/--no-frozen-prefix"),
    checkpointing: Optional[bool] = typer.Option(None, "--checkpointing/--no-checkpointing", help="Gradient "
                                                 "checkpointing: recompute layer activations in the backward pass "
                                                 "(less training memory for more time: "
                                                 "docs/measurements/bench_optimal_edit.json). Default: only where "
                                                 "a training pass's stored activations would exceed 2 GiB or a "
                                                 "quarter of the free memory (edit/train.py checkpointing_needed)."),
    export_merged: Optional[Path] = typer.Option(None, "--export-merged", help="Also save a merged HF model "
                                                 "folder with the edit folded into o_proj."),
    export_peft: Optional[Path] = typer.Option(None, "--export-peft", help="Also save a PEFT LoRA adapter "
                                               "on o_proj."),
    dtype: DType = dtype_option(),
    device: str = device_option(),
    progress: bool = config_option(TrainConfig, "progress", "--progress/--no-progress"),
    trust_remote_code: bool = opt.trust_remote_code_option(),
) -> None:
    """Train an optimal localized edit at a head set on preference pairs and save it."""
    # Long on purpose: most of its lines are its typer options, one per flag of `locaudit edit`; the body builds the
    # TrainConfig from them and trains.
    from locaudit.data.behaviour import load_behaviour
    from locaudit.data.prompts import PromptFormat
    from locaudit.edit.train import train_edit
    from locaudit.errors import ConfigError
    from locaudit.heads import HeadSet
    from locaudit.models.loading import load_model

    if val_split not in ("val", "test"):
        raise ConfigError(f"--val-split {val_split!r}: use val or test (never train)")
    config = TrainConfig.make(objective=objective, tau=tau, beta=beta, lr=lr, epochs=epochs, batch_size=batch_size,
                              grad_accum=grad_accum, rank=rank, reparam=reparam, seed=train_seed, precision=value(precision),
                              max_length=max_length, frozen_prefix=frozen_prefix,
                              gradient_checkpointing="auto" if checkpointing is None else checkpointing,
                              progress=progress)
    lm = load_model(model, dtype=value(dtype), device=device, trust_remote_code=trust_remote_code)
    L, H = lm.sites.n_layers, lm.sites.n_heads
    ranking = None
    if probe is not None:
        from locaudit.localize.probe import ProbeResult

        pr = ProbeResult.load(probe)
        if pr.shape != (L, H):
            raise ConfigError(f"--probe {probe}: probes are {pr.shape[0]}x{pr.shape[1]} heads, model {model} "
                              f"has {L}x{H}")
        ranking = pr.ranking()
    head_set = HeadSet.parse(heads, L, H, ranking)
    bd = load_behaviour(data, seed=seed, max_questions=max_questions)
    train_pairs, val_pairs = bd.pairs("train"), bd.pairs(val_split)
    if max_pairs is not None and max_pairs < len(train_pairs):
        train_pairs = random.Random(seed).sample(train_pairs, max_pairs)
    if max_val_pairs is not None and max_val_pairs < len(val_pairs):
        val_pairs = random.Random(seed + 1).sample(val_pairs, max_val_pairs)
    typer.echo(f"{lm.name}: {len(head_set)} heads ({head_set.name}), {len(train_pairs)} train pairs, "
               f"{len(val_pairs)} {val_split} pairs")
    result, tlog = train_edit(lm, head_set, train_pairs, val_pairs, PromptFormat(fmt), config)
    result.meta["data"].update({"spec": data, "fingerprint": bd.fingerprint, "seed": seed,
                                "max_questions": max_questions, "val_split": val_split})
    result.save(out)
    b, a = tlog.before, tlog.after
    typer.echo(f"held-out ({val_split}) preference accuracy: {b['val_accuracy']:.3f} -> {a['val_accuracy']:.3f}; "
               f"margin {b['val_margin']:+.3f} -> {a['val_margin']:+.3f}; {objective} loss "
               f"{b['val_loss']:.3f} -> {a['val_loss']:.3f}  ({tlog.seconds:.0f} s) -> {out}")
    if export_merged is not None or export_peft is not None:
        from locaudit.edit import export

        if export_merged is not None:
            export.export_merged(result, lm, export_merged, overwrite=True)
            typer.echo(f"merged model -> {export_merged}")
        if export_peft is not None:
            export.export_peft(result, lm, export_peft, overwrite=True)
            typer.echo(f"PEFT adapter -> {export_peft}")


def register(app: typer.Typer) -> None:
    app.command("edit", help=(edit.__doc__ or "") + "\n\n" + EXAMPLE)(edit)
