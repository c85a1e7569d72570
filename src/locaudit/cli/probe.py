"""`locaudit probe`: one logistic-regression probe per head; rank heads by validation accuracy."""

from __future__ import annotations

from pathlib import Path

import typer
from locaudit.cli import options as opt

EXAMPLE = "Example:\n\n  locaudit probe --activations runs/acts --out runs/probe --top-k 16"


def probe(
    activations: Path = typer.Option(..., "--activations", help="Folder written by `locaudit collect` "
                                     "(activations.safetensors, examples.jsonl, meta.json)."),
    out: Path = typer.Option(..., "--out", help="Folder for probe_accuracy.csv, probe_heatmap.png, ranking.json "
                             "and the probe weights (probes.safetensors)."),
    l2: float = typer.Option(1.0, "--l2", **opt.non_negative("--l2"), help="L2 penalty l2/2 |w|^2 on the summed log-loss; 1/l2 is "
                             "scikit-learn's C (1.0 = its default, as ITI uses)."),
    top_k: int = typer.Option(16, "--top-k", **opt.count("--top-k"), help="How many of the best heads to print and outline in the heatmap."),
    standardize: bool = typer.Option(False, "--standardize/--no-standardize", help="Fit on features "
                                     "standardised with train statistics (ITI fits raw activations)."),
    max_iter: int = typer.Option(50, "--max-iter", **opt.count("--max-iter"), help="Newton iterations at most (converges in ~5-15)."),
    train_split: str = typer.Option("train", "--train-split", help="Split the probes are fit on."),
    val_split: str = typer.Option("val", "--val-split", help="Split that ranks the heads (never the test split)."),
) -> None:
    """Train all L x H head probes in one batched optimisation and print the best heads."""
    from locaudit.errors import ConfigError
    from locaudit.localize.activations import ActivationSet
    from locaudit.localize.probe import probe_activations

    acts = ActivationSet.load(activations)
    N, L, H, D = acts.shape
    if not 1 <= top_k <= L * H:
        raise ConfigError(f"--top-k {top_k}: must be in 1..{L * H} (the model has {L} x {H} heads)")
    res = probe_activations(acts, l2=l2, max_iter=max_iter, standardize=standardize,
                            train_split=train_split, val_split=val_split)
    res.meta["top_k"] = top_k
    res.save(out)
    typer.echo(f"probed {L * H} heads on {res.meta['n_train']} train / {res.meta['n_val']} val examples "
               f"({res.meta['iterations']} Newton iterations) -> {out}")
    typer.echo(f"{'rank':>4}  {'head':<8} {'val_acc':>7} {'train_acc':>9}")
    for r, (l, h) in enumerate(res.ranking()[:top_k], 1):
        typer.echo(f"{r:>4}  L{l}H{h:<6} {float(res.val_acc[l, h]):>7.3f} {float(res.train_acc[l, h]):>9.3f}")


def register(app: typer.Typer) -> None:
    app.command("probe", help=(probe.__doc__ or "") + "\n\n" + EXAMPLE)(probe)
