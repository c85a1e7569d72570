"""Benchmark: batched activation patching and attribution patching on SmolLM2 (TruthfulQA training pairs).

Measured in one process, on the same pairs and heads:
  (a) batched activation patching (`localize.patching.activation_patching`): pairs batched, copies of the
      batch stacked along the batch axis, one patched head per copy, up to --tokens-per-forward tokens;
  (b) the one-head-at-a-time loop: the same code with one pair per batch, one head per forward pass and
      every layer computed (what a hand-written patching loop does); also (a) without layer skipping
      (stacked copies only), to separate the two savings;
  (c) attribution patching (all heads, one forward + backward per batch) as a multiple of one plain
      forward + backward of the metric over the same batches (no hooks).
Throughput is heads x pairs per second. (a) and (b) patch the heads of `--layers` (every head of those
layers) so the loop stays short; the batched throughput does not depend on which heads are patched.
Prints one JSON object with the CPU capability and the resolved precision (benchmarks/machine.py).

    python benchmarks/bench_patching.py --pairs 4 --layers 0,15,29
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import add_out_option, emit, machine_info, short  # noqa: E402
from locaudit.models.precision import resolve_precision as _P  # resolved once, as entry points do

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CSV = REPO.parent / "shared" / "data" / "truthfulqa" / "data" / "v1" / "TruthfulQA.csv"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv", default=str(DEFAULT_CSV), help="TruthfulQA CSV")
    ap.add_argument("--pairs", type=int, default=4, help="training pairs")
    ap.add_argument("--layers", default="0,15,29", help="layers whose heads (a) and (b) patch")
    ap.add_argument("--batch-pairs", type=int, default=4)
    ap.add_argument("--tokens-per-forward", type=int, default=16384)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved repeats; the best time counts")
    add_out_option(ap, "bench_patching")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")

    from locaudit.data.behaviour import load_behaviour
    from locaudit.localize.attribution import attribution_patching
    from locaudit.localize.corruptions import PatchingConfig, select_pairs
    from locaudit.localize.patching import _Plan, embedding_hook, pair_metric
    from locaudit.models.loading import load_model
    from locaudit.models.precision import as_precision

    info = machine_info(args.precision)
    lm = load_model("smollm2-135m-instruct")
    prec = as_precision(args.precision, lm.device)
    data = load_behaviour(f"truthfulqa:{args.csv}", seed=0, max_questions=100)
    pairs = select_pairs(data.pairs("train"), args.pairs, 0)
    heads = ",".join(f"L{int(x)}" for x in args.layers.split(","))
    n_heads = len(args.layers.split(",")) * lm.sites.n_heads
    from locaudit.localize.patching import activation_patching

    def timed(fn):
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out

    batched_cfg = PatchingConfig(heads=heads, batch_pairs=args.batch_pairs, tokens_per_forward=args.tokens_per_forward)
    stack_cfg = batched_cfg.model_copy(update={"skip_layers": False})
    loop_cfg = PatchingConfig(heads=heads, batch_pairs=1, tokens_per_forward=64, skip_layers=False)
    activation_patching(lm, pairs[:1], PatchingConfig(heads="L0H0"), precision=args.precision, progress=False)  # warm-up
    best = {"batched": float("inf"), "stacked": float("inf"), "loop": float("inf")}
    cfgs = {"batched": batched_cfg, "stacked": stack_cfg, "loop": loop_cfg}
    results = {}
    for _ in range(args.repeats):  # interleaved, best of: the machine may be shared
        for name, cfg in cfgs.items():
            t, results[name] = timed(lambda cfg=cfg: activation_patching(lm, pairs, cfg, precision=args.precision, progress=False))
            best[name] = min(best[name], t)
    t_batched, t_stack, t_loop = best["batched"], best["stacked"], best["loop"]
    eff_b, eff_l = results["batched"], results["loop"]
    done = torch.isfinite(eff_b.effect)
    max_diff = float((eff_b.effect[done] - eff_l.effect[done]).abs().max())

    all_cfg = PatchingConfig(batch_pairs=args.batch_pairs)
    t_atp = min(timed(lambda: attribution_patching(lm, pairs, all_cfg, precision=args.precision, progress=False))[0]
                for _ in range(args.repeats))
    plan = _Plan(lm, pairs, all_cfg)

    def fwd_bwd():
        """The metric's forward and its backward down to the token embeddings (what AtP differentiates)."""
        for idx in plan.batches:
            base, noise, *_ = plan.base_and_source(idx)
            store = {}

            def grab(m, a, out):
                out = out.detach().requires_grad_(True)
                store["emb"] = out
                return out
            h = lm.sites.embed().register_forward_hook(grab)
            try:
                with prec.autocast(lm.dtype), torch.enable_grad(), embedding_hook(lm, noise):
                    m = pair_metric(lm.model, base.to(lm.device))
                    torch.autograd.grad(m.sum(), store["emb"])
            finally:
                h.remove()

    fwd_bwd()
    t_fb = min(timed(fwd_bwd)[0] for _ in range(args.repeats))
    L, H = lm.sites.n_layers, lm.sites.n_heads
    out = {
        "benchmark": "patching", **info, "repeats": args.repeats, "model": lm.name, "pairs": len(pairs), "heads_patched": n_heads,
        "batched_heads_x_pairs_per_s": round(n_heads * len(pairs) / t_batched, 2),
        "loop_heads_x_pairs_per_s": round(n_heads * len(pairs) / t_loop, 2),
        "batched_over_loop": round(t_loop / t_batched, 2),
        "stacked_copies_only_over_loop": round(t_loop / t_stack, 2),
        "batched_vs_loop_max_abs_diff": max_diff,
        "all_heads_patching_estimated_s": round(t_batched * L * H / n_heads, 1),
        "attribution_all_heads_s": round(t_atp, 2), "forward_backward_s": round(t_fb, 2),
        "attribution_over_forward_backward": round(t_atp / t_fb, 2),
        "attribution_speedup_over_all_head_patching": round(t_batched * L * H / n_heads / t_atp, 1),
    }
    emit(args.out, "bench_patching", "activation and attribution patching on SmolLM2", info, out, table_rows(out))


def table_rows(r: dict) -> list[list[str]]:
    """The README's rows (machine.COLUMNS) from this benchmark's results."""
    return [
        [f"activation patching, {r['heads_patched']} heads x {r['pairs']} pairs",
         f"{r['batched_heads_x_pairs_per_s']:.1f} heads x pairs/s (batched)",
         f"one head per forward, every layer: {r['loop_heads_x_pairs_per_s']:.1f}",
         f"{r['batched_over_loop']:.1f}x (stacked copies alone {r['stacked_copies_only_over_loop']:.1f}x), "
         f"same effects within {short(r['batched_vs_loop_max_abs_diff'])}"],
        [f"attribution patching, all heads, {r['pairs']} pairs", f"{r['attribution_all_heads_s']:.2f} s",
         f"activation patching of all heads, {r['all_heads_patching_estimated_s']:.1f} s (estimated from the batched rate)",
         f"{r['attribution_speedup_over_all_head_patching']:.1f}x; {r['attribution_over_forward_backward']:.2f}x one "
         f"plain forward + backward"],
    ]


if __name__ == "__main__":
    main()
