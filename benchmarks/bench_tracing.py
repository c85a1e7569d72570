"""Causal tracing cost per fact on SmolLM2 at the Hase study's settings: the shared computation vs the full one.

full    (`method="full"`, the straightforward computation): every (noise sample, restored window, position) row
        runs the whole model;
layers  (`method="shared", share_positions=False`): the corrupted run once per noise sample, each row only from
        its window's first layer upward on the corrupted states (models/surgery.py run_from_layer);
shared  (`method="shared"`, the default): also only from its restored position on, on the corrupted run's KV
        cache of the positions before it.
All three give the same numbers up to rounding; the script prints the largest difference of the tracing
variable from `full`. Tracing settings and traced layers come from the study file (default
studies/hase_smollm2.yaml: mlp, window 5, 10 noise samples, fraction over the subject's tokens and the last
token, every 3rd layer and the last); facts are the first `--facts` of known_1000.json (not filtered for
"known": the cost depends only on the prompt). The variants run fact by fact, interleaved, so that a load
change on a shared machine hits them alike. Prints one JSON object.

    python benchmarks/bench_tracing.py [--facts 3] [--precision auto|fp32|bf16] [--variants full,layers,shared]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import add_out_option, emit, machine_info, short  # noqa: E402

from locaudit.models.precision import resolve_precision  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FACTS = Path(os.environ.get("LOCAUDIT_SHARED_DATA", REPO.parent / "shared" / "data")) / "rome" / "known_1000.json"
VARIANTS = {"full": {"method": "full"}, "layers": {"method": "shared", "share_positions": False},
            "shared": {"method": "shared", "share_positions": True}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--facts", type=int, default=3, help="facts taken from the start of known_1000.json")
    ap.add_argument("--study", default=str(REPO / "studies" / "hase_smollm2.yaml"), help="tracing settings, layers")
    ap.add_argument("--facts-file", default=str(FACTS))
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="precision of every side")
    ap.add_argument("--variants", default="full,layers,shared", help="comma-separated: full, layers, shared")
    add_out_option(ap, "bench_tracing")
    args = ap.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or any(v not in VARIANTS for v in variants):
        ap.error(f"--variants: choose from {', '.join(VARIANTS)}")

    from locaudit.data.facts import load_facts, subject_token_span
    from locaudit.localize.tracing import subject_embedding_std, embedding_std, trace_fact
    from locaudit.models.loading import load_model
    from locaudit.study.hase.spec import load_hase_spec

    spec = load_hase_spec(args.study)
    cfg = spec.tracing
    lm = load_model("smollm2-135m-instruct")
    layers = spec.layer_list(lm.sites.n_layers)
    machine = machine_info(args.precision)
    prec = resolve_precision(args.precision, "cpu")
    facts = load_facts(args.facts_file, max_facts=args.facts)
    std = subject_embedding_std(lm, facts) if cfg.noise_from == "subject" else embedding_std(lm)

    f0 = facts[0]  # warm-up (allocator, first-call costs) on a cut-down config
    for v in variants:
        trace_fact(lm, f0.prompt, f0.subject, f0.target, cfg.model_copy(update={"n_noise": 2}), 0, layers[:2],
                   precision=prec, noise_std=std, **VARIANTS[v])

    seconds = {v: [] for v in variants}
    diff = {v: 0.0 for v in variants}
    per_fact = []
    for i, f in enumerate(facts):
        out = {}
        for v in variants:
            t0 = time.perf_counter()
            out[v] = trace_fact(lm, f.prompt, f.subject, f.target, cfg, i, layers, precision=prec, noise_std=std,
                                **VARIANTS[v])
            seconds[v].append(time.perf_counter() - t0)
        ref = out[variants[0]]
        for v in variants:
            for kind, eff in ref.effects.items():
                for a, b in zip(eff, out[v].effects[kind]):
                    if a == a and b == b:  # both finite (NaN where the corruption changes nothing)
                        diff[v] = max(diff[v], abs(a - b))
        s0, s1 = subject_token_span(lm.tokenizer, f.prompt, f.subject)
        per_fact.append({"prompt": f.prompt, "tokens": ref.n_tokens, "subject_tokens": s1 - s0,
                         "seconds": {v: round(seconds[v][-1], 2) for v in variants}})

    mean = {v: sum(s) / len(s) for v, s in seconds.items()}
    result = {
        "benchmark": "causal tracing per fact (Hase study settings)",
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        **machine,
        "model": lm.name, "study": Path(args.study).name, "facts": len(facts), "layers": layers,
        "tracing": {k: v for k, v in cfg.model_dump().items() if k in ("kinds", "window", "n_noise", "measure",
                                                                        "fraction_positions", "max_rows")},
        "seconds_per_fact": {v: round(m, 2) for v, m in mean.items()},
        "speedup_vs_full": ({v: round(mean["full"] / m, 2) for v, m in mean.items()} if "full" in mean else None),
        "max_abs_diff_of_tracing_variable_vs_" + variants[0]: {v: d for v, d in diff.items()},
        "minutes_per_100_facts": {v: round(100 * m / 60, 1) for v, m in mean.items()},
        "per_fact": per_fact,
    }
    emit(args.out, "bench_tracing", "causal tracing per fact on SmolLM2 at a Hase study's settings", machine, result,
         table_rows(result))


NAMES = {"full": "full computation", "layers": "layer sharing", "shared": "layer and position sharing"}


def table_rows(r: dict) -> list[list[str]]:
    """The README's row (machine.COLUMNS) from this benchmark's results: locaudit's default (shared) against
    the full computation, and the layer-only variant where it ran."""
    s, sp = r["seconds_per_fact"], r.get("speedup_vs_full") or {}
    if "shared" not in s or "full" not in s:
        return []
    alt = [f"{NAMES['full']} {s['full']:.1f} s"] + ([f"{NAMES['layers']} {s['layers']:.1f} s"] if "layers" in s else [])
    diff = max((d for d in next(v for k, v in r.items() if k.startswith("max_abs_diff")).values()), default=0.0)
    return [[f"causal tracing of one fact, {r['study']}'s settings, {r['facts']} facts",
             f"{s['shared']:.1f} s per fact (shared computation, the default)", "; ".join(alt),
             f"{sp['shared']:.2f}x, same numbers within {short(diff)}"]]


if __name__ == "__main__":
    main()
