"""Benchmark: head-activation collection and all-head probing on SmolLM2, against the usual ways.

One process, one model, the same TruthfulQA probe texts for every collector. Collection throughput
(examples/s) of `locaudit.localize.collect_activations` against:
  (a) one example at a time, reading every o_proj input at all positions (as ITI's baukit loop does),
  (b) nnsight wrapping the same model and saving every layer's o_proj input (same padded batches),
  (c) TransformerLens's bridge run_with_cache of attn.hook_z (per-head outputs), same batches,
  (d) a bare batched forward pass with no hooks (same batches; full model incl. the LM head).
Probing: all L*H heads as one batched Newton optimisation vs a loop of scikit-learn
LogisticRegression fits (same C), on the train/val split of real SmolLM2 activations.

Each collector runs `--repeats` times, interleaved, and its best time is kept (the machine is shared).
Every collector runs at one precision (`--precision`, default auto: bf16 only where this CPU runs it
faster, else fp32). Prints one JSON object with the CPU capability, the resolved precision and each
throughput as a fraction of the measured fp32 GEMM peak (benchmarks/machine.py). Goals: overhead over the bare forward <= 10%, >= 3x one-at-a-time,
probing >= 20x the scikit-learn loop at the same accuracy.

    python benchmarks/bench_collect_probe.py --n 48 --repeats 2
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import add_out_option, emit, short, fraction_of_peak, linear_params, machine_info  # noqa: E402

from locaudit.models.precision import resolve_precision  # noqa: E402
from locaudit.models.precision import resolve_precision as _P  # resolved once, as entry points do

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CSV = REPO.parent / "shared" / "data" / "truthfulqa" / "data" / "v1" / "TruthfulQA.csv"


def batches(lm, texts, batch_size):
    """The same length-sorted, right-padded batches locaudit uses, for the other batched collectors."""
    from locaudit.localize.activations import tokenize_texts

    ids, _ = tokenize_texts(lm.tokenizer, texts)
    order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i))
    pad = lm.tokenizer.pad_token_id
    out = []
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        T = max(len(ids[i]) for i in idx)
        x = torch.full((len(idx), T), pad, dtype=torch.long)
        m = torch.zeros((len(idx), T), dtype=torch.long)
        for r, i in enumerate(idx):
            x[r, : len(ids[i])] = torch.tensor(ids[i])
            m[r, : len(ids[i])] = 1
        out.append((idx, x, m, m.sum(1) - 1))
    return out


def run_locaudit(lm, texts, bs, **kw):
    from locaudit.localize.activations import collect_activations

    return collect_activations(lm, texts, bs, progress=False, **kw)


def run_bare(lm, texts, bs, prepared):
    with torch.inference_mode():
        for idx, x, m, last in prepared:
            lm.model(input_ids=x, attention_mask=m, use_cache=False)


def run_one_at_a_time(lm, texts, bs):
    """ITI's loop: one prompt per forward, keep every o_proj input (all positions), then take the last token."""
    from locaudit.models.hooks import o_proj_hooks

    L, H, D = lm.sites.shape
    out = torch.zeros(len(texts), L, H, D)
    for i, t in enumerate(texts):
        store = {}
        ids = lm.tokenizer(t, return_tensors="pt")["input_ids"]
        pre = {l: (lambda o, l=l: store.__setitem__(l, o.detach().clone())) for l in range(L)}
        with torch.inference_mode(), o_proj_hooks(lm.sites, pre=pre):
            lm.model(input_ids=ids, use_cache=False)
        out[i] = torch.stack([store[l][0, -1] for l in range(L)]).view(L, H, D)
    return out


def make_nnsight(lm):
    from nnsight import NNsight

    return NNsight(lm.model)


def run_nnsight(nn_model, lm, prepared, n):
    L, H, D = lm.sites.shape
    out = torch.zeros(n, L, H, D)
    layers = nn_model.model.layers
    for idx, x, m, last in prepared:
        saved = []
        with torch.inference_mode(), nn_model.trace(input_ids=x, attention_mask=m, use_cache=False):
            for l in range(L):  # nnsight re-runs this block's source: keep it a plain loop
                saved.append(layers[l].self_attn.o_proj.input.save())
        rows = torch.arange(len(idx))
        out[idx] = torch.stack([getattr(s, "value", s)[rows, last] for s in saved], 1).view(len(idx), L, H, D).float()
    return out


def make_tlens(name):
    """A TransformerLens bridge around a second copy of the model (the bridge rewires its model in place)."""
    from locaudit.models import load_model
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    lm2 = load_model(name)
    return build_bridge_from_module(lm2.model, "LlamaForCausalLM", hf_config=lm2.model.config, tokenizer=lm2.tokenizer)


def run_tlens(bridge, lm, prepared, n):
    L, H, D = lm.sites.shape
    out = torch.zeros(n, L, H, D)
    for idx, x, m, last in prepared:
        with torch.inference_mode():
            _, cache = bridge.run_with_cache(x, attention_mask=m, names_filter=lambda k: k.endswith("attn.hook_z"))
        rows = torch.arange(len(idx))
        out[idx] = torch.stack([cache[f"blocks.{l}.attn.hook_z"][rows, last] for l in range(L)], 1).float()
    return out


def timed(fn):
    t = time.perf_counter()
    r = fn()
    return time.perf_counter() - t, r


def bench_probe(acts):
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from locaudit.localize.probe import train_probes

    X, y = acts.heads, acts.labels
    tr, va = acts.indices("train"), acts.indices("val")
    t_ours, res = timed(lambda: train_probes(X, y, tr, va, l2=1.0))
    t_ours = min(t_ours, timed(lambda: train_probes(X, y, tr, va, l2=1.0))[0])
    N, L, H, D = X.shape
    acc = np.zeros((L, H))
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for l in range(L):
            for h in range(H):
                clf = LogisticRegression(C=1.0, max_iter=1000, random_state=0)  # ITI's settings
                clf.fit(X[tr, l, h].numpy(), y[tr].numpy())
                acc[l, h] = clf.score(X[va, l, h].numpy(), y[va].numpy())
    t_sk = time.perf_counter() - t
    ours = res.val_acc.double().numpy()
    return {
        "n_train": int(tr.numel()), "n_val": int(va.numel()), "heads": L * H,
        "batched_s": round(t_ours, 3), "sklearn_loop_s": round(t_sk, 3),
        "speedup_vs_sklearn": round(t_sk / t_ours, 1),
        "mean_val_acc_batched": round(float(ours.mean()), 4), "mean_val_acc_sklearn": round(float(acc.mean()), 4),
        "mean_abs_val_acc_diff": round(float(np.abs(ours - acc).mean()), 4),
        "best_head_batched": "L{}H{}".format(*res.ranking()[0]),
        "best_head_sklearn": "L{}H{}".format(*divmod(int(np.argmax(acc)), H)),
        "newton_iterations": res.meta["iterations"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model to benchmark")
    ap.add_argument("--csv", default=str(DEFAULT_CSV), help="TruthfulQA CSV")
    ap.add_argument("--n", type=int, default=48, help="probe texts timed per collector")
    ap.add_argument("--batch-size", type=int, default=16, help="batch size of the batched collectors")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per collector (best kept)")
    ap.add_argument("--probe-questions", type=int, default=60, help="questions whose activations are probed")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="precision of every collector (auto: bf16 only where this CPU runs it faster)")
    ap.add_argument("--skip", default="", help="comma list of collectors to skip: one_at_a_time,nnsight,tlens")
    add_out_option(ap, "bench_collect_probe")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    if args.threads:
        torch.set_num_threads(args.threads)

    from locaudit.data.behaviour import load_behaviour
    from locaudit.data.probing import probe_text
    from locaudit.localize.activations import collect_probe_activations
    from locaudit.models import load_model

    lm = load_model(args.model)
    machine = machine_info(args.precision)
    prec = resolve_precision(args.precision, "cpu")
    data = load_behaviour(f"truthfulqa:{args.csv}", seed=0)
    exs = data.probe_examples()
    texts = [probe_text(e, "plain") for e in random.Random(0).sample(exs, args.n)]
    bs = args.batch_size
    prepared = batches(lm, texts, bs)
    n_tokens = sum(int(m.sum()) for _, _, m, _ in prepared)
    padded = sum(m.numel() for _, _, m, _ in prepared)

    collectors = {  # each takes (texts, their prepared batches)
        "locaudit": lambda tx, pr: run_locaudit(lm, tx, bs, precision=prec),
        "locaudit_no_early_stop": lambda tx, pr: run_locaudit(lm, tx, bs, stop_early=False, precision=prec),
        "bare_forward": lambda tx, pr: run_bare(lm, tx, bs, pr),
    }
    notes = {}
    if "one_at_a_time" not in skip:
        collectors["one_at_a_time"] = lambda tx, pr: run_one_at_a_time(lm, tx, bs)
    if "nnsight" not in skip:
        try:
            nn_model = make_nnsight(lm)
            collectors["nnsight"] = lambda tx, pr: run_nnsight(nn_model, lm, pr, len(tx))
        except Exception as e:  # report, don't fail the benchmark
            notes["nnsight"] = f"unavailable: {type(e).__name__}: {e}"
    if "tlens" not in skip:
        try:
            bridge = make_tlens(args.model)
            collectors["transformer_lens"] = lambda tx, pr: run_tlens(bridge, lm, pr, len(tx))
            notes["transformer_lens"] = ("TransformerBridge built offline around a second copy of the HF model "
                                         "(build_bridge_from_module; it forces eager attention)")
        except Exception as e:
            notes["transformer_lens"] = f"unavailable: {type(e).__name__}: {e}"

    warm_texts = texts[: min(4, len(texts))]
    warm_prepared = batches(lm, warm_texts, bs)
    for name, fn in list(collectors.items()):  # warm-up: first-call costs are not throughput
        try:
            with prec.autocast(lm.dtype):
                fn(warm_texts, warm_prepared)
        except Exception as e:
            notes[name] = f"failed: {type(e).__name__}: {e}"
            collectors.pop(name)

    best: dict[str, float] = {}
    outputs: dict[str, torch.Tensor] = {}
    for rep in range(args.repeats):
        for name, fn in collectors.items():
            try:
                with prec.autocast(lm.dtype):  # every collector at the same precision
                    t, out = timed(lambda: fn(texts, prepared))
            except Exception as e:
                notes[name] = f"failed: {type(e).__name__}: {e}"
                continue
            best[name] = min(best.get(name, float("inf")), t)
            if isinstance(out, torch.Tensor):
                outputs[name] = out
            print(f"[rep {rep}] {name}: {t:.2f} s", file=sys.stderr)
    for name in list(best):
        if name in notes and notes[name].startswith("failed"):
            best.pop(name)

    ref = outputs["locaudit"]
    agree = {k: float((v - ref).abs().max()) for k, v in outputs.items() if k != "locaudit"}
    t0 = best["locaudit"]
    flops = 2 * linear_params(lm.model, lm.sites.n_layers, lm_head=False) * n_tokens
    result = {
        "machine": machine,
        "fraction_of_fp32_peak": {k: fraction_of_peak(flops, v, machine["fp32_gemm_peak_gflops"]) for k, v in best.items()},
        "model": args.model, "n_texts": len(texts), "batch_size": bs, "tokens": n_tokens,
        "padding_fraction": round(1 - n_tokens / padded, 3), "threads": torch.get_num_threads(),
        "seconds": {k: round(v, 3) for k, v in best.items()},
        "examples_per_s": {k: round(len(texts) / v, 2) for k, v in best.items()},
        "locaudit_speedup_vs": {k: round(v / t0, 2) for k, v in best.items() if k != "locaudit"},
        "overhead_vs_bare_forward": round(t0 / best["bare_forward"] - 1, 3),
        "max_abs_diff_vs_locaudit": {k: float(f"{v:.3g}") for k, v in agree.items()},
        "notes": notes,
    }
    acts = collect_probe_activations(lm, load_behaviour(f"truthfulqa:{args.csv}", seed=0,
                                                        max_questions=args.probe_questions),
                                     "plain", batch_size=bs, progress=False, precision=_P('fp32'))
    result["probing"] = bench_probe(acts)
    result["goals"] = {
        "overhead_le_10pct": result["overhead_vs_bare_forward"] <= 0.10,
        "ge_3x_one_at_a_time": result["locaudit_speedup_vs"].get("one_at_a_time", 0) >= 3,
        "probing_ge_20x_sklearn": result["probing"]["speedup_vs_sklearn"] >= 20,
        "probing_same_accuracy": result["probing"]["mean_abs_val_acc_diff"] < 0.02,
    }
    emit(args.out, "bench_collect_probe", "head-activation collection and all-head probing on SmolLM2", machine,
         result, table_rows(result))


LABELS = {"bare_forward": "bare batched forward", "nnsight": "nnsight", "transformer_lens": "TransformerLens",
          "one_at_a_time": "one at a time", "locaudit_no_early_stop": "locaudit without stopping early"}


def table_rows(r: dict) -> list[list[str]]:
    """The README's rows (machine.COLUMNS) from this benchmark's results."""
    eps, frac, vs = r["examples_per_s"], r["fraction_of_fp32_peak"], r["locaudit_speedup_vs"]
    others = [k for k in LABELS if k in eps]
    ratio = [f"{vs[k]:.2f}x {'the ' + LABELS[k] if k == 'bare_forward' else LABELS[k]}" for k in
             ("bare_forward", "one_at_a_time") if k in vs]
    pr = r["probing"]
    return [
        [f"head-activation collection, {r['n_texts']} TruthfulQA probe texts",
         f"{eps['locaudit']:.1f} examples/s ({frac['locaudit']:.2f} of peak)",
         "; ".join(f"{LABELS[k]} {eps[k]:.1f} ({frac[k]:.2f})" for k in others) or "-", ", ".join(ratio) or "-"],
        [f"all-head probing ({pr['heads']} heads)", f"{pr['batched_s']:.2f} s, one batched Newton fit",
         f"scikit-learn's LogisticRegression per head, {pr['sklearn_loop_s']:.1f} s",
         f"{pr['speedup_vs_sklearn']:.1f}x, mean validation accuracy {pr['mean_val_acc_batched']:.3f} vs "
         f"{pr['mean_val_acc_sklearn']:.3f} (diff {short(pr['mean_abs_val_acc_diff'])})"],
    ]


if __name__ == "__main__":
    main()
