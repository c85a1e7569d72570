"""Benchmark: one IPO epoch of an optimal edit with locaudit vs TRL's DPOTrainer(loss_type="ipo") + PEFT.

Same model (SmolLM2-135M-Instruct), same TruthfulQA train pairs, same batch size, both at one precision
(`--precision`, default auto: bf16 only where this CPU runs it faster, else fp32; TRL gets bf16=True
exactly when that resolves to bf16). Each measurement runs in its own
subprocess so that peak RSS is comparable: the peak (VmHWM) is reset after loading the model (its
memory-mapped weights paged in) and the pairs, and the RSS at that point is subtracted.
Wall time and process CPU time are both reported (CPU time is steadier on a shared machine).

Reported (JSON on stdout, and --out FILE):
- trl vs locaudit at all heads (TRL: rank-1 LoRA on every o_proj): pairs/s for one epoch including the
  reference pass, and with the reference cached (every later epoch or trial on the same data), peak memory;
  at each tool's defaults (TRL turns gradient checkpointing on; locaudit's `auto` turns it on only where the
  batch's activations would not fit, reported as `locaudit_auto_checkpointing`), with checkpointing on in both,
  and with it off in both;
- frozen prefix: a single head at a late layer l, training loop with vs without the prefix cache
  (reference cached in both), against the ideal L / (L - l);
- multi-edit: 8 single heads, and 8 random 16-head sets, trained in one pass vs 8 sequential runs
  (reference cached in both).

Usage: python benchmarks/bench_optimal_edit.py [--pairs 32] [--batch-size 4] [--threads 2] [--repeats 1]
       [--only trl,prefix,multi,multi16] [--checkpointing on|off] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import add_out_option, emit, fraction_of_peak, linear_params, machine_info  # noqa: E402
from locaudit.models.precision import resolve_precision as _P  # noqa: E402  (resolved once, as entry points do)

REPO = Path(__file__).resolve().parents[1]
CSV = Path(os.environ.get("LOCAUDIT_SHARED_DATA", REPO.parent / "shared" / "data")) / "truthfulqa" / "data" / "v1" / "TruthfulQA.csv"


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def reset_peak_rss() -> float:
    """Current RSS (MB), after resetting the peak (VmHWM) to it, so that loading transients do not count."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """Peak RSS (MB) since the last reset (VmHWM), else ru_maxrss."""
    hwm = _status_mb("VmHWM")
    return hwm if hwm == hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def load_pairs(n: int):
    from locaudit.data.behaviour import load_behaviour
    from locaudit.data.types import PreferencePair

    if CSV.exists():
        pairs = load_behaviour(f"truthfulqa:{CSV}", seed=0).pairs("train")
        return random.Random(0).sample(pairs, n)
    return [PreferencePair(f"q{i}", f"What is fact number {i} about the world?", "It is not known.",
                           "Everyone knows it is true.") for i in range(n)]


class Clock:
    def __enter__(self):
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c


# ---------------------------------------------------------------------------------------------- workers
def worker(kind: str, n_pairs: int, batch_size: int) -> dict:
    import torch

    from locaudit.models import load_model

    if kind.startswith("trl"):  # library code is not training memory: import before the baseline
        import datasets, peft, trl  # noqa: F401,E401
    else:
        import locaudit.edit.multi  # noqa: F401
    lm = load_model("smollm2-135m-instruct")
    pairs = load_pairs(n_pairs)
    with torch.no_grad():  # page in the memory-mapped weights, so that the baseline holds the whole model
        for p in lm.model.parameters():
            p.sum()
    base_rss = reset_peak_rss()
    L, H = lm.sites.n_layers, lm.sites.n_heads
    out: dict = {"kind": kind, "pairs": n_pairs, "batch_size": batch_size, "threads": torch.get_num_threads()}
    if kind.startswith("trl"):
        out.update(run_trl(lm, pairs, batch_size, gradient_checkpointing=kind != "trl:nogc"))
    else:
        from locaudit.data.prompts import PromptFormat
        from locaudit.edit.config import TrainConfig
        from locaudit.edit.encoded import encode_pairs
        from locaudit.edit.multi import train_edits
        from locaudit.edit.reference import reference_logps
        from locaudit.edit.train import checkpointing_needed, choose_layout

        def layout(lm, enc, cfg) -> dict:
            tiled, packed = choose_layout(lm, enc, cfg, _P(cfg.precision))
            return {"tiled": tiled, "packed": packed}
        from locaudit.heads import HeadSet

        cfg = TrainConfig(epochs=1, batch_size=batch_size, progress=False, eval_each_epoch=False,
                          reference_disk_cache=False, precision=PREC,
                          gradient_checkpointing=os.environ.get("BENCH_CHECKPOINTING", "on") == "on")
        enc = encode_pairs(lm.tokenizer, pairs, PromptFormat("plain"), cfg.max_length, lm.fingerprint)
        if kind.startswith("locaudit_all"):
            heads = [HeadSet.all(L, H)]
            cfg = cfg.model_copy(update={"gradient_checkpointing": kind != "locaudit_all:nogc"})
            with Clock() as ref_clock:  # in the layout training uses (tiled head, packed pairs where checked)
                tiled, packed = choose_layout(lm, enc, cfg, _P(cfg.precision))
                reference_logps(lm, enc, _P(PREC), cfg.eval_batch_size, disk=False, tiled=tiled, packed=packed)
            auto = cfg.model_copy(update={"gradient_checkpointing": "auto"})
            out.update(tiled=tiled, packed=packed,
                       auto_checkpointing=checkpointing_needed(lm, auto, enc, len(heads), L, packed))
            with Clock() as c:
                train_edits(lm, heads, pairs, None, config=cfg)
            out.update(reference_wall=ref_clock.wall, reference_cpu=ref_clock.cpu, loop_wall=c.wall, loop_cpu=c.cpu,
                       wall=ref_clock.wall + c.wall, cpu=ref_clock.cpu + c.cpu)
        elif kind.startswith("prefix"):
            layer = int(kind.split(":")[1])
            use = kind.startswith("prefix_on")
            heads = [HeadSet.parse(f"L{layer}H3")]
            reference_logps(lm, enc, _P(PREC), cfg.eval_batch_size, disk=False, **layout(lm, enc, cfg))
            c0 = cfg.model_copy(update={"frozen_prefix": use})
            if use:  # one-time state collection, reported apart (shared by every trial at this layer)
                from locaudit.edit.prefix import PREFIX_CACHE
                from locaudit.models.fastcast import frozen_bf16_weights
                with Clock() as sc, frozen_bf16_weights(lm.model, PREC == "bf16"):
                    PREFIX_CACHE.get(lm, enc, layer, _P(PREC), c0.eval_batch_size)
                out.update(states_wall=sc.wall, states_cpu=sc.cpu)
            with Clock() as c:
                train_edits(lm, heads, pairs, None, config=c0)
            out.update(wall=c.wall, cpu=c.cpu, layer=layer, n_layers=L)
        elif kind.startswith("multi"):
            n_edits = 8
            size = 16 if kind.startswith("multi16") else 1
            heads = [HeadSet.parse(f"random{size}@{s}", L, H) for s in range(n_edits)]
            reference_logps(lm, enc, PREC, cfg.eval_batch_size, disk=False, **layout(lm, enc, cfg))
            together = kind.endswith("one_pass")
            with Clock() as c:
                if together:
                    train_edits(lm, heads, pairs, None, config=cfg.model_copy(update={"max_parallel": n_edits}))
                else:
                    for hs in heads:
                        train_edits(lm, [hs], pairs, None, config=cfg)
            out.update(wall=c.wall, cpu=c.cpu, heads=[hs.name for hs in heads],
                       lowest_layers=sorted(min(hs.layers) for hs in heads))
        else:
            raise SystemExit(f"unknown worker kind {kind!r}")
    out["peak_rss_mb"] = peak_rss_mb()
    out["peak_rss_delta_mb"] = out["peak_rss_mb"] - base_rss
    return out


def run_trl(lm, pairs, batch_size: int, gradient_checkpointing: bool = True) -> dict:
    import logging
    import warnings

    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    ds = Dataset.from_list([{"prompt": f"Q: {p.question}\nA:", "chosen": f" {p.chosen}", "rejected": f" {p.rejected}"}
                            for p in pairs])
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(output_dir=tmp, loss_type=["ipo"], beta=0.1, per_device_train_batch_size=batch_size,
                         num_train_epochs=1, learning_rate=1e-4, lr_scheduler_type="cosine", report_to=[],
                         use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True,
                         dataloader_num_workers=0, seed=0, gradient_checkpointing=gradient_checkpointing,
                         bf16=PREC == "bf16")
        peft_cfg = LoraConfig(r=1, lora_alpha=1, lora_dropout=0.0, target_modules=["o_proj"], task_type="CAUSAL_LM")
        trainer = DPOTrainer(model=lm.model, args=args, train_dataset=ds, processing_class=lm.tokenizer,
                             peft_config=peft_cfg)
        with Clock() as c:
            trainer.train()
    return {"wall": c.wall, "cpu": c.cpu, "bf16": bool(args.bf16), "gradient_checkpointing": gradient_checkpointing}


def training_flops(n_pairs: int) -> float:
    """An estimate of one epoch's model FLOPs: 3x the forward (forward + the backward through the
    activations; frozen weights get no gradient) of every chosen and rejected sequence, plus the reference
    forward: 4 x 2 x weights x tokens, each sequence with its whole prompt (TRL's concatenated forward).
    locaudit's packed pairs run each prompt once (about 1.5x fewer tokens on TruthfulQA), so its
    fraction of peak on this count can exceed what the hardware does: it is throughput in TRL's terms."""
    from locaudit.models import load_model

    lm = load_model("smollm2-135m-instruct")
    tok = lm.tokenizer
    n_tok = sum(len(tok(f"Q: {p.question}\nA: {ans}")["input_ids"]) for p in load_pairs(n_pairs)
                for ans in (p.chosen, p.rejected))
    return 4 * 2 * linear_params(lm.model) * n_tok


# ---------------------------------------------------------------------------------------------- driver
REPEATS = 1
PREC = os.environ.get("BENCH_PRECISION", "fp32")  # resolved once by the driver, passed to every worker


def spawn(kind: str, n_pairs: int, batch_size: int, threads: int) -> dict:
    """Run a worker REPEATS times; keep the fastest run's times (robust to other load on the machine)."""
    env = dict(os.environ, BENCH_PRECISION=PREC, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, __file__, "--worker", kind, "--pairs", str(n_pairs), "--batch-size", str(batch_size)]
    best = None
    for _ in range(REPEATS):
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"worker {kind} failed:\n{res.stderr[-3000:]}")
        out = json.loads(res.stdout.strip().splitlines()[-1])
        walls = (best or {}).get("all_walls", []) + [out["wall"]]
        if best is None or out["wall"] < best["wall"]:
            best = out
        best["all_walls"] = walls
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=32, help="training pairs (one epoch)")
    ap.add_argument("--batch-size", type=int, default=4, help="pairs per batch, both tools")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per worker")
    ap.add_argument("--layer", type=int, default=24, help="layer of the single head for the frozen-prefix run")
    ap.add_argument("--only", default="trl,prefix,multi,multi16",
                    help="comma list of parts: trl, prefix, multi (8 single heads), multi16 (8 random 16-head sets)")
    ap.add_argument("--checkpointing", choices=["on", "off"], default="on",
                    help="gradient checkpointing in the prefix and multi-edit parts (locaudit's default: on)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per measurement; the fastest is kept")
    add_out_option(ap, "bench_optimal_edit")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="precision of both tools")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.pairs, a.batch_size)))
        return
    global REPEATS, PREC
    REPEATS = max(1, a.repeats)
    machine = machine_info(a.precision)
    PREC = machine["precision"]
    os.environ["BENCH_CHECKPOINTING"] = a.checkpointing
    parts = set(a.only.split(","))
    runs: dict = {}
    result: dict = {"machine": machine, "pairs": a.pairs, "batch_size": a.batch_size, "threads": a.threads, "repeats": REPEATS,
                    "checkpointing_in_prefix_and_multi": a.checkpointing,
                    "model": "smollm2-135m-instruct", "cpu_load_at_start": os.getloadavg()[0]}
    if "trl" in parts:
        # each tool with and without gradient checkpointing (TRL's default: on; locaudit's: auto)
        for kind in ("locaudit_all", "trl", "locaudit_all:nogc", "trl:nogc"):
            runs[kind] = spawn(kind, a.pairs, a.batch_size, a.threads)

        flops = training_flops(a.pairs)
        peak = machine["fp32_gemm_peak_gflops"]

        def compare(loc: dict, trl: dict) -> dict:
            return {"trl_fraction_of_fp32_peak": fraction_of_peak(flops, trl["wall"], peak),
                    "locaudit_fraction_of_fp32_peak": fraction_of_peak(flops, loc["wall"], peak),
                    "trl_pairs_per_s": a.pairs / trl["wall"], "locaudit_pairs_per_s": a.pairs / loc["wall"],
                    "locaudit_pairs_per_s_reference_cached": a.pairs / loc["loop_wall"],
                    "speedup_wall": trl["wall"] / loc["wall"], "speedup_cpu": trl["cpu"] / loc["cpu"],
                    "speedup_wall_reference_cached": trl["wall"] / loc["loop_wall"],
                    "speedup_cpu_reference_cached": trl["cpu"] / loc["loop_cpu"],
                    "trl_peak_rss_delta_mb": trl["peak_rss_delta_mb"],
                    "locaudit_peak_rss_delta_mb": loc["peak_rss_delta_mb"]}

        auto = runs["locaudit_all"]["auto_checkpointing"]
        result["locaudit_auto_checkpointing"] = auto
        result["vs_trl_all_heads"] = {
            "each tool's default (TRL: checkpointing on; locaudit: auto)":
                compare(runs["locaudit_all" if auto else "locaudit_all:nogc"], runs["trl"]),
            "both with gradient checkpointing": compare(runs["locaudit_all"], runs["trl"]),
            "neither with gradient checkpointing": compare(runs["locaudit_all:nogc"], runs["trl:nogc"]),
        }
    if "prefix" in parts:
        on = runs["prefix_on"] = spawn(f"prefix_on:{a.layer}", a.pairs, a.batch_size, a.threads)
        off = runs["prefix_off"] = spawn(f"prefix_off:{a.layer}", a.pairs, a.batch_size, a.threads)
        L = on["n_layers"]
        # Below the lowest edited layer nothing needs gradients, so without the cache those layers cost one
        # no-grad forward per epoch (about what collecting the states costs, once); the cache can remove
        # that and no more. L / (L - l) would hold only if the lower layers also ran backward.
        result["frozen_prefix"] = {"layer": a.layer, "n_layers": L, "ideal_L_over_L_minus_l": L / (L - a.layer),
                                   "removed_wall": off["wall"] - on["wall"],
                                   "lower_layers_forward_wall": on["states_wall"],
                                   "speedup_wall": off["wall"] / on["wall"], "speedup_cpu": off["cpu"] / on["cpu"],
                                   "one_time_states_wall": on["states_wall"],
                                   "peak_rss_delta_mb_on": on["peak_rss_delta_mb"],
                                   "peak_rss_delta_mb_off": off["peak_rss_delta_mb"]}
    for part, label in (("multi", "multi_edit_8_single_heads"), ("multi16", "multi_edit_8_random16_sets")):
        if part not in parts:
            continue
        # "one_pass": train_edits with max_parallel 8, which plans the passes (edit/multi.py plan_groups)
        one = runs[f"{part}_one_pass"] = spawn(f"{part}_one_pass", a.pairs, a.batch_size, a.threads)
        seq = runs[f"{part}_sequential"] = spawn(f"{part}_sequential", a.pairs, a.batch_size, a.threads)
        result[label] = {"speedup_wall": seq["wall"] / one["wall"], "speedup_cpu": seq["cpu"] / one["cpu"],
                         "heads": one["heads"], "lowest_layers": one["lowest_layers"],
                         "peak_rss_delta_mb_one_pass": one["peak_rss_delta_mb"],
                         "peak_rss_delta_mb_sequential": seq["peak_rss_delta_mb"]}
    result["runs"] = runs
    emit(a.out, "bench_optimal_edit", "IPO training of optimal edits on SmolLM2 against TRL + PEFT, the frozen prefix "
         "and edits trained together", machine, result, table_rows(result))


def table_rows(r: dict) -> list[list[str]]:
    """The README's rows (machine.COLUMNS) from this benchmark's results (each part that ran)."""
    rows, runs, n = [], r["runs"], r["pairs"]
    if "vs_trl_all_heads" in r:
        cmp = r["vs_trl_all_heads"]
        d = cmp["each tool's default (TRL: checkpointing on; locaudit: auto)"]
        on, off = cmp["both with gradient checkpointing"], cmp["neither with gradient checkpointing"]
        cached = [c["speedup_wall_reference_cached"] for c in cmp.values()]

        def mb(c: dict) -> str:
            return f"{c['locaudit_peak_rss_delta_mb']:.0f} vs {c['trl_peak_rss_delta_mb']:.0f} MB"

        rows.append([f"one IPO epoch of an all-heads rank-1 edit, {n} pairs, reference pass included",
                     f"{n / d['locaudit_pairs_per_s']:.1f} s (checkpointing "
                     f"{'on' if r['locaudit_auto_checkpointing'] else 'off'}: `auto` here)",
                     f"TRL DPOTrainer(ipo) + PEFT on o_proj {n / d['trl_pairs_per_s']:.1f} s (its default, checkpointing on)",
                     f"{d['speedup_wall']:.1f}x at both tools' defaults (peak memory {mb(d)}); {on['speedup_wall']:.1f}x "
                     f"with checkpointing in both ({mb(on)}), {off['speedup_wall']:.1f}x with it off in both ({mb(off)}); "
                     f"{min(cached):.1f}-{max(cached):.1f}x for every later epoch or edit on the same pairs, whose "
                     f"reference is cached"])
    parts = [(p, label) for p, label in (("multi", "single heads"), ("multi16", "random 16-head sets"))
             if f"{p}_one_pass" in runs]
    if parts:
        one = [runs[f"{p}_one_pass"] for p, _ in parts]
        seq = [runs[f"{p}_sequential"] for p, _ in parts]
        rows.append([f"{len(one[0]['heads'])} edits trained in one pass (reference cached)",
                     "; ".join(f"{len(o['heads'])} {label} {o['wall']:.1f} s" for o, (_, label) in zip(one, parts)),
                     "the same edits trained one after another: " + "; ".join(f"{s['wall']:.1f} s" for s in seq),
                     "; ".join(f"{s['wall'] / o['wall']:.2f}x" for o, s in zip(one, seq))])
    if "frozen_prefix" in r:
        fp, on_ = r["frozen_prefix"], runs["prefix_on"]
        rows.append([f"frozen prefix: one head at layer {fp['layer']} of {fp['n_layers']}",
                     f"{on_['wall']:.1f} s incl. {fp['one_time_states_wall']:.1f} s collecting the states once",
                     f"{runs['prefix_off']['wall']:.1f} s running the lower layers every step",
                     f"{fp['speedup_wall']:.2f}x"])
    return rows


if __name__ == "__main__":
    main()
