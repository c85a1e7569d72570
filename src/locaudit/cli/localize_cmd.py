"""`locaudit localize`: rank every attention head by activation patching or attribution patching."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from locaudit.cli.options import (
    DType, data_option, device_option, dtype_option,
    format_option, max_questions_option, model_option, precision_option,
    seed_option, value,
)
from locaudit.cli import options as opt
from locaudit.models.precision import Precision, as_precision

EXAMPLE = (
    "Examples:\n\n"
    "  locaudit localize --model smollm2-135m-instruct "
    "--data truthfulqa:$(locaudit data path truthfulqa-v1) --method patching "
    "--max-pairs 48 --out runs/patching\n\n"
    "  locaudit localize --data caa:sycophancy --method attribution --corruption contrast --contrast swap_options "
    "--out runs/atp_sycophancy\n\n"
    "Both write effects.csv, ranking.json, effects_heatmap.png, effects.safetensors and meta.json. Activation "
    "patching costs about L*H forward passes per pair (batched); attribution patching one forward and one "
    "backward per batch of pairs: screen with attribution, then verify its top heads with "
    "`--method patching --heads L3H1,L7H0,...`."
)


def localize(
    model: str = model_option(),
    data: str = data_option(),
    out: Path = typer.Option(..., "--out", help="Folder for effects.csv, ranking.json, effects_heatmap.png, "
                             "effects.safetensors and meta.json."),
    method: str = typer.Option("patching", "--method", help="patching (activation patching, exact, ~L*H forwards "
                               "per pair) or attribution (its first-order approximation: one forward + backward)."),
    corruption: str = typer.Option("contrast", "--corruption", help="contrast: a contrast prompt from the data; "
                                   "noise: Gaussian noise on the prompt's token embeddings but position 0 (ROME's "
                                   "causal tracing); mean: replace the head by its dataset mean."),
    direction: str = typer.Option("auto", "--direction", help="denoise (restore the clean head into the corrupted "
                                  "run), noise (corrupted head into the clean run), or auto (denoise for noise, "
                                  "noise for contrast and mean)."),
    noise_scale: float = typer.Option(3.0, "--noise-scale", **opt.non_negative("--noise-scale", 1e3), help="Noise std in multiples of the prompt tokens' "
                                      "embedding std (ROME: 3)."),
    contrast: str = typer.Option("other_question", "--contrast", help="Contrast prompt: other_question (another "
                                 "pair's prompt) or swap_options (CAA A/B prompts with options (A) and (B) swapped)."),
    positions: str = typer.Option("completion", "--positions", help="Where heads are patched: completion (last "
                                  "prompt token + completion tokens), last (the prompt's last token), prompt or all."),
    split: str = typer.Option("train", "--split", help="Split whose pairs are used (never rank on test)."),
    max_pairs: int = typer.Option(48, "--max-pairs", **opt.count("--max-pairs", 0), help="Seeded subset of the split's pairs (one per question "
                                  "first); 0 = all."),
    heads: Optional[str] = typer.Option(None, "--heads", help="Activation patching only these heads, e.g. "
                                        "'L0,L5H3' (others are left NaN)."),
    rank_by: str = typer.Option("abs", "--rank-by", help="abs (|effect|) or signed (heads that support the clean "
                                "behaviour first)."),
    top_k: int = typer.Option(16, "--top-k", **opt.count("--top-k"), help="How many of the best heads to print and outline."),
    graddrop: bool = typer.Option(False, "--graddrop/--no-graddrop", help="Attribution: also compute AtP*'s "
                                  "GradDrop score (L extra backward passes)."),
    qk_fix: bool = typer.Option(False, "--qk-fix/--no-qk-fix", help="Attribution: also score each head's query "
                                "and key nodes with AtP*'s QK fix (extra scores query, key; their linear AtP "
                                "query_atp, key_atp)."),
    batch_pairs: int = typer.Option(4, "--batch-pairs", **opt.count("--batch-pairs"), help="Pairs per batch (two sequences each)."),
    tokens_per_forward: int = typer.Option(16384, "--tokens-per-forward", **opt.count("--tokens-per-forward", 64), help="Patching stacks one copy of the "
                                           "batch per head, up to about this many tokens per forward."),
    fmt: str = format_option(),
    seed: int = seed_option('Seed of the question-level split, the pair subset and the noise.'),
    max_questions: Optional[int] = max_questions_option(),
    dtype: DType = dtype_option(),
    precision: Precision = precision_option(),
    device: str = device_option(),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="Read/write the content-keyed cache (model, data, "
                               "split, method, settings, precision)."),
    trust_remote_code: bool = opt.trust_remote_code_option(),
) -> None:
    """Rank every attention head by its causal effect on a behaviour's preference log-ratio."""
    from pydantic import ValidationError

    from locaudit.data.behaviour import load_behaviour
    from locaudit.errors import ConfigError
    from locaudit.localize.corruptions import PatchingConfig
    from locaudit.localize.causal import METHODS, localize_heads
    from locaudit.models.loading import load_model

    if method not in METHODS:
        raise ConfigError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    try:
        config = PatchingConfig(corruption=corruption, direction=direction, noise_scale=noise_scale,
                                noise_seed=seed, contrast=contrast, contrast_seed=seed, positions=positions,
                                max_pairs=max_pairs or None, pair_seed=seed, heads=heads, rank_by=rank_by,
                                top_k=top_k, graddrop=graddrop, qk_fix=qk_fix, batch_pairs=batch_pairs,
                                tokens_per_forward=tokens_per_forward, format=fmt)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ())) or "options"
        raise ConfigError(f"--{where.replace('_', '-')}: {first.get('msg')}") from None
    bd = load_behaviour(data, seed=seed, max_questions=max_questions)
    lm = load_model(model, dtype=value(dtype), device=device, trust_remote_code=trust_remote_code)
    L, H = lm.sites.n_layers, lm.sites.n_heads
    if not 1 <= top_k <= L * H:
        raise ConfigError(f"--top-k {top_k}: must be in 1..{L * H} (the model has {L} x {H} heads)")
    # localize_heads checks that the effects are finite before it writes anything (the cache entry, `out`)
    eff = localize_heads(lm, bd, method, config, split=split, out_dir=out, precision=as_precision(value(precision), lm.device), cache=cache)
    m = eff.meta
    typer.echo(f"{method} ({m.get('corruption')}, {m.get('direction')}, positions {m.get('positions')}) on {eff.n} "
               f"{split} pairs: metric clean {_f(m.get('m_clean_mean'))}, corrupted {_f(m.get('m_corrupt_mean'))}; "
               f"precision {m.get('precision', '?')} ({m.get('cpu_capability', '')}) -> {out}")
    typer.echo(f"{'rank':>4}  {'head':<8} {'effect':>10} {'se':>9}")
    for r, (l, h) in enumerate(eff.ranking()[:top_k], 1):
        typer.echo(f"{r:>4}  L{l}H{h:<6} {float(eff.effect[l, h]):>10.4f} {float(eff.se[l, h]):>9.4f}")


def _f(x) -> str:
    return "n/a" if x is None else f"{float(x):.4f}"


def register(app: typer.Typer) -> None:
    app.command("localize", help=(localize.__doc__ or "") + "\n\n" + EXAMPLE)(localize)
