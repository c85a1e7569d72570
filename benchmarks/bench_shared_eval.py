"""Benchmark: N edits evaluated together (`evaluate_edits`) vs one at a time (`evaluate_edit` per edit).

Same model (SmolLM2-135M-Instruct), same TruthfulQA test questions (MC under ITI's protocol, KL/CE on the
generic text and on the answers), same EvalConfig and precision on both sides, in one run. The edits: the
unedited model, `--singles` single-head LoRA edits at seeded random heads (random layers), a 16-head set (a
seeded random set standing in for a probe's top 16: its lowest layer decides what it can share), all heads,
and an ITI edit at one head. Random rank-1 weights: the cost does not depend on the values. Both sides give
the same numbers (the script reports the largest differences). One-at-a-time is what a user would otherwise
run (the study calls evaluate_edit per trial); the ideal ratio, if the layers below each edit's lowest layer
were free and everything above cost what it does alone, is printed beside the measured one.

Generation (`--gen-questions N`, 0 to skip): the same edits' greedy answers to N test questions under ITI's
protocol, `generate_many` (the LoRA edits and the unedited model `--gen-edits-together` at a time, one block of
each question batch per edit) against `generate_answers` per edit, the same batch of `--gen-batch-size`
questions per edit on both sides; the script reports how many answers differ (fp32: none expected).

    python benchmarks/bench_shared_eval.py [--questions 40] [--singles 8] [--metrics mc,kl,ce] [--precision auto]
                                           [--gen-questions 16] [--gen-edits-together 8]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import add_out_option, emit, machine_info, short  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LOCAUDIT_DATA", REPO.parent / "shared" / "data"))
CSV = DATA / "truthfulqa" / "data" / "v1" / "TruthfulQA.csv"


def lora(lm, heads, seed: int):
    from locaudit.edit.lora import LoRAEdit, edit_masks

    a_mask, b_mask = edit_masks(lm.sites, heads, reparam=True)
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(a_mask.shape[0], 1, a_mask.shape[-1], generator=g) * a_mask * 0.05
    b = torch.randn(b_mask.shape[0], 1, b_mask.shape[-1], generator=g) * b_mask * 0.05
    return LoRAEdit(a, b, heads)


def make_edits(lm, singles: int, seed: int = 0) -> tuple[list, list[str]]:
    from locaudit.edit.iti import ITIEdit
    from locaudit.heads import HeadSet

    L, H, D = lm.sites.shape
    rng = random.Random(seed)
    every = [(l, h) for l in range(L) for h in range(H)]
    picks = rng.sample(every, singles + 1)
    edits, names = [None], ["unedited"]
    for i, (l, h) in enumerate(picks[:singles]):
        edits.append(lora(lm, HeadSet.from_heads([(l, h)]), i + 1))
        names.append(f"single L{l}H{h}")
    top = HeadSet.from_heads(rng.sample(every, 16))
    edits.append(lora(lm, top, 100))
    names.append(f"16 heads (lowest layer {min(top.layers)})")
    edits.append(lora(lm, HeadSet.from_heads(every), 101))
    names.append("all heads")
    l, h = picks[singles]
    hs = HeadSet.from_heads([(l, h)])
    theta = torch.randn(L, H * D, generator=torch.Generator().manual_seed(7)) * hs.dim_mask(L, H, D)
    edits.append(ITIEdit(theta, alpha=2.0, heads=hs))
    names.append(f"ITI L{l}H{h}")
    return edits, names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--questions", type=int, default=40, help="test-split questions (MC items)")
    ap.add_argument("--singles", type=int, default=8)
    ap.add_argument("--metrics", default="mc,kl,ce")
    ap.add_argument("--kl-max-tokens", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="precision of both sides")
    ap.add_argument("--gen-questions", type=int, default=16, help="questions generated per edit (0: no generation)")
    ap.add_argument("--gen-batch-size", type=int, default=16, help="questions per edit in a generation batch")
    ap.add_argument("--gen-edits-together", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=50)
    ap.add_argument("--csv", default=str(CSV))
    add_out_option(ap, "bench_shared_eval")
    args = ap.parse_args()
    os.environ.setdefault("LOCAUDIT_CACHE", tempfile.mkdtemp(prefix="bench-shared-"))

    from locaudit.data.behaviour import load_behaviour
    from locaudit.evaluate.runner import EvalConfig, evaluate_edit
    from locaudit.evaluate.shared import evaluate_edits
    from locaudit.evaluate.upper import lowest_layer
    from locaudit.models.loading import load_model

    torch.manual_seed(0)
    lm = load_model("smollm2-135m-instruct")
    machine = machine_info(args.precision)
    data = load_behaviour(f"truthfulqa:{args.csv}", max_questions=5 * args.questions)
    n_q = len(data.mc_items("test"))
    edits, names = make_edits(lm, args.singles)
    cfg = EvalConfig(precision=args.precision, progress=False, batch_size=args.batch_size,
                     kl_max_tokens=args.kl_max_tokens)
    metrics = args.metrics.split(",")
    # warm-up: the original distributions of the KL text (cached for both sides) and first-call costs
    evaluate_edit(lm, None, data, "test", metrics, config=cfg)

    t0 = time.perf_counter()
    together = evaluate_edits(lm, edits, data, "test", metrics, config=cfg)
    t_together = time.perf_counter() - t0
    alone, t_each = [], []
    for e in edits:
        t1 = time.perf_counter()
        alone.append(evaluate_edit(lm, e, data, "test", metrics, config=cfg))
        t_each.append(time.perf_counter() - t1)
    t_alone = sum(t_each)

    n = lm.sites.n_layers
    layers = [lowest_layer(lm, e) for e in edits]
    ideal = t_alone / (t_each[0] + sum(t * (n - L) / n for t, L in zip(t_each, layers) if L < n))
    fields = [f for f in ("mc1", "mc2", "mc0", "kl", "ce", "kl_answers", "ce_answers")
              if getattr(together[0], f) is not None]
    diff = {f: max(abs(getattr(a, f) - getattr(s, f)) for a, s in zip(alone, together)) for f in fields}
    out = {
        "machine": machine, "model": "smollm2-135m-instruct", "n_layers": n, "questions": n_q, "metrics": metrics,
        "kl_max_tokens": args.kl_max_tokens, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
        "n_edits": len(edits), "edits": [{"edit": nm, "lowest_layer": L, "seconds_alone": round(t, 2)}
                                         for nm, L, t in zip(names, layers, t_each)],
        "seconds_together": round(t_together, 2), "seconds_one_at_a_time": round(t_alone, 2),
        "speedup": round(t_alone / t_together, 2),
        "ideal_speedup_from_layer_sharing": round(ideal, 2),
        "max_abs_diff": diff,
        "mc2": {nm: round(r.mc2, 4) for nm, r in zip(names, together)} if "mc" in metrics else None,
        "generation": bench_generation(lm, edits, data, args) if args.gen_questions else None,
    }
    emit(args.out, "bench_shared_eval", "N edits evaluated together vs one at a time on SmolLM2", machine, out,
         table_rows(out))


def bench_generation(lm, edits, data, args) -> dict:
    """generate_many vs generate_answers per edit on the same questions, edits and precision."""
    from locaudit.data.prompts import PromptFormat
    from locaudit.evaluate.generate import generate_answers
    from locaudit.evaluate.shared_gen import generate_many
    from locaudit.models.precision import resolve_precision

    prec = resolve_precision(args.precision, lm.device)
    qs = data.questions("test")[: args.gen_questions]
    fmt = PromptFormat("plain", protocol="iti")
    kw = dict(max_new_tokens=args.max_new_tokens, batch_size=args.gen_batch_size, precision=prec)
    generate_answers(lm, None, qs[:2], fmt, progress=False, **kw)  # warm-up
    t0 = time.perf_counter()
    together = generate_many(lm, edits, qs, fmt, edits_together=args.gen_edits_together, progress=False, **kw)
    t_together = time.perf_counter() - t0
    t0 = time.perf_counter()
    alone = [generate_answers(lm, e, qs, fmt, progress=False, **kw) for e in edits]
    t_alone = time.perf_counter() - t0
    differ = sum(a.answer != b.answer for ra, rb in zip(alone, together) for a, b in zip(ra, rb))
    return {"questions": len(qs), "n_edits": len(edits), "edits_together": args.gen_edits_together,
            "batch_size": args.gen_batch_size, "max_new_tokens": args.max_new_tokens,
            "seconds_together": round(t_together, 2), "seconds_one_at_a_time": round(t_alone, 2),
            "speedup": round(t_alone / t_together, 2), "answers_differing": differ,
            "answers": sum(len(r) for r in alone)}


def table_rows(r: dict) -> list[list[str]]:
    """The README's rows (machine.COLUMNS) from this benchmark's results."""
    diff = max(r["max_abs_diff"].values(), default=0.0)
    g = r.get("generation") if isinstance(r.get("generation"), dict) else None  # older files: a note
    gen = [[f"{g['n_edits']} edits' greedy answers generated together ({g['edits_together']} at a time; "
            f"{g['questions']} questions, {g['max_new_tokens']} new tokens at most)",
            f"{g['seconds_together']:.1f} s", f"each edit alone {g['seconds_one_at_a_time']:.1f} s",
            f"{g['speedup']:.2f}x, {g['answers_differing']} of {g['answers']} answers differ"]] if g else []
    return [[f"{r['n_edits']} edits evaluated together ({', '.join(r['metrics'])}; {r['questions']} questions)",
             f"{r['seconds_together']:.1f} s", f"the same edits one at a time {r['seconds_one_at_a_time']:.1f} s",
             f"{r['speedup']:.2f}x (ideal from layer sharing {r['ideal_speedup_from_layer_sharing']:.2f}x), "
             f"same numbers within {short(diff)}"]] + gen


if __name__ == "__main__":
    main()
