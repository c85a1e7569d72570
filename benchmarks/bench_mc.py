"""MC scoring throughput on SmolLM2 with TruthfulQA's mc_task.json: batched vs one answer at a time.

Batched = locaudit's `score_mc` (every distinct (question, answer) of every question scored together,
sorted by length, in batches). One at a time = one forward pass per answer, as TruthfulQA's and ITI's
evaluation code do. Both use the same log-prob code, so the ratio isolates batching; the script also
checks that both give the same MC1/MC2. Prints one JSON object. Goal: batched >= 3x.

`--protocol iti` (the default, as `locaudit eval` and studies): ITI's instruction + six-shot QA primer
before every question. Batched runs that preamble once and continues every question from its KV cache
(models/prefix_cache.py); one at a time scores the whole prompt per answer, as ITI's code does.
`--protocol bare` isolates batching and the per-question shared prompt.

Both sides run at one precision (`--precision`, default auto: bf16 only where this CPU runs it faster).

    python benchmarks/bench_mc.py [--questions 24] [--batch-size 32] [--precision auto|fp32|bf16] [--protocol iti|bare]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import add_out_option, emit, short, fraction_of_peak, linear_params, machine_info  # noqa: E402

from locaudit.models.precision import resolve_precision  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MC_FILE = Path(os.environ.get("LOCAUDIT_SHARED_DATA", REPO.parent / "shared" / "data")) / "truthfulqa/data/v1/mc_task.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--questions", type=int, default=24, help="MC items taken from the start of mc_task.json")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="precision of both sides")
    ap.add_argument("--mc-file", default=str(MC_FILE))
    ap.add_argument("--protocol", default="iti", choices=["iti", "bare"], help="what goes before each question")
    add_out_option(ap, "bench_mc")
    args = ap.parse_args()

    from locaudit.data.prompts import PromptFormat
    from locaudit.data.truthfulqa import load_mc
    from locaudit.evaluate.mc import mc1_score, mc2_score, score_mc
    from locaudit.models.loading import load_model
    from locaudit.models.scoring import score_completions

    torch.manual_seed(0)
    items = load_mc(args.mc_file)[: args.questions]
    lm = load_model("smollm2-135m-instruct")
    machine = machine_info(args.precision)
    prec = resolve_precision(args.precision, "cpu")
    fmt = PromptFormat("plain", protocol=args.protocol)
    pairs = list(dict.fromkeys((it.question, a) for it in items for a in (*it.mc1_answers, *it.mc2_answers)))
    n = len(pairs)

    score_mc(lm, None, items[:2], fmt, batch_size=args.batch_size, precision=prec)  # warm-up
    t0 = time.perf_counter()
    batched = score_mc(lm, None, items, fmt, batch_size=args.batch_size, precision=prec)
    t_batched = time.perf_counter() - t0

    t0 = time.perf_counter()
    single: dict[tuple[str, str], float] = {}
    for q, a in pairs:
        with torch.no_grad(), prec.autocast(lm.dtype):
            s, _ = score_completions(lm.model, lm.tokenizer, [fmt.prompt(q, lm.tokenizer)], [fmt.completion(a)],
                                     batch_size=1)
        single[(q, a)] = float(s[0])
    t_single = time.perf_counter() - t0

    diff = max(abs(batched.items[i].logprobs[a] - single[(it.question, a)])
               for i, it in enumerate(items) for a in (*it.mc1_answers, *it.mc2_answers))
    mc1_single = sum(mc1_score([single[(it.question, a)] for a in it.mc1_answers], it.mc1_labels) for it in items) / len(items)
    mc2_single = sum(mc2_score([single[(it.question, a)] for a in it.mc2_answers], it.mc2_labels) for it in items) / len(items)
    n_tok = sum(len(lm.tokenizer(fmt.prompt(q, lm.tokenizer) + fmt.completion(a))["input_ids"]) for q, a in pairs)
    flops = 2 * linear_params(lm.model) * n_tok
    out = {
        "machine": machine,
        "fraction_of_fp32_peak": {"batched": fraction_of_peak(flops, t_batched, machine["fp32_gemm_peak_gflops"]),
                                  "one_at_a_time": fraction_of_peak(flops, t_single, machine["fp32_gemm_peak_gflops"])},
        "model": "smollm2-135m-instruct", "protocol": args.protocol, "questions": len(items), "answers": n, "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "batched_answers_per_s": round(n / t_batched, 1), "one_at_a_time_answers_per_s": round(n / t_single, 1),
        "speedup": round(t_single / t_batched, 2), "goal_speedup": 3.0,
        "max_abs_logprob_diff": diff, "mc1": batched.mean("mc1"), "mc2": batched.mean("mc2"),
        "mc1_one_at_a_time": mc1_single, "mc2_one_at_a_time": mc2_single,
    }
    emit(args.out, "bench_mc", "MC1/MC2 scoring on SmolLM2, batched vs one answer at a time", machine, out,
         table_rows(out))


def _agreement(a: float, b: float) -> str:
    return "identical" if a == b else f"within {short(abs(a - b))}"


def table_rows(r: dict) -> list[list[str]]:
    """The README's row (machine.COLUMNS) from this benchmark's results."""
    proto = "ITI's protocol" if r["protocol"] == "iti" else "the bare protocol"
    return [[f"MC1/MC2 with {proto}, {r['questions']} questions, {r['answers']} answers",
             f"{r['batched_answers_per_s']:.1f} answers/s", f"one answer at a time {r['one_at_a_time_answers_per_s']:.1f}",
             f"{r['speedup']:.1f}x, MC1 {_agreement(r['mc1'], r['mc1_one_at_a_time'])}, "
             f"MC2 {_agreement(r['mc2'], r['mc2_one_at_a_time'])}"]]


if __name__ == "__main__":
    main()
