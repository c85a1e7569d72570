"""What every benchmark prints about the machine: CPU capability, the resolved precision, threads, load,
and the measured fp32 GEMM peak, so that throughputs can be read as a fraction of what the machine can do;
and the measurement file a benchmark writes with `--out` (`make bench`: docs/measurements/NAME.json), from
which `make docs` (scripts/gen_docs.py) renders the README's benchmark table.

A model's work is counted as 2 * (weights it multiplies) FLOPs per token (the linear layers; attention
scores and element-wise work are left out), so `fraction_of_peak` is a lower bound of the real fraction.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

SCHEMA = "locaudit-measurement/1"
# The columns of every benchmark's table (README.md, "Benchmarks"): one row per comparison.
COLUMNS = ["benchmark", "locaudit", "the alternative", "ratio"]
REPO = Path(__file__).resolve().parents[1]


def gemm_peak_gflops(size: int = 1024, repeats: int = 5) -> float:
    """Best-of-`repeats` fp32 GEMM throughput of a size^3 matmul, in GFLOP/s, at the current thread count."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best / 1e9


def machine_info(precision: str = "auto") -> dict:
    """CPU capability, resolved precision (models/precision.py), threads, load and fp32 GEMM peak."""
    from locaudit.models.precision import resolve_precision

    p = resolve_precision(precision, "cpu")
    return {"cpu_capability": p.meta()["cpu_capability"], "precision": p.name, "precision_requested": p.requested,
            "precision_reason": p.reason, "threads": torch.get_num_threads(),
            "cpu_load_at_start": round(os.getloadavg()[0], 2), "fp32_gemm_peak_gflops": round(gemm_peak_gflops(), 1)}


def linear_params(model: torch.nn.Module, upto_layer: int | None = None, lm_head: bool = True) -> int:
    """Weights of the linear layers a forward multiplies (decoder layers [0, upto_layer), and the LM head)."""
    n = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            if "lm_head" in name:
                n += mod.weight.numel() if lm_head else 0
                continue
            if upto_layer is not None:
                parts = name.split(".")
                idx = next((int(x) for x in parts if x.isdigit()), None)
                if idx is not None and idx >= upto_layer:
                    continue
            n += mod.weight.numel()
    return n


def fraction_of_peak(flops: float, seconds: float, peak_gflops: float) -> float:
    return round(flops / seconds / 1e9 / peak_gflops, 3)


# ---------------------------------------------------------------------------------------------- provenance
def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform reports."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """The checkout's commit, with "+dirty" when tracked files differ from it; None outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=REPO, capture_output=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.returncode == 1 else "")
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(machine: dict) -> dict:
    """Where and when a benchmark ran: the date (UTC), the CPU and its capability (locaudit's own check,
    models/precision.py), the resolved precision, torch, threads, load, the command and the commit."""
    from locaudit import __version__

    return {"kind": "run", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{cpu_model()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.machine()}",
            "cpu_capability": machine["cpu_capability"], "precision": machine["precision"],
            "torch": torch.__version__, "locaudit": __version__, "threads": machine["threads"],
            "cpu_load_at_start": machine["cpu_load_at_start"],
            "fp32_gemm_peak_gflops": machine["fp32_gemm_peak_gflops"],
            "command": " ".join(["python", *sys.argv]), "commit": git_commit()}


def short(x: float) -> str:
    """A small difference in one significant digit: 3e-7, 0.002."""
    return f"{x:.1g}".replace("e-0", "e-").replace("e+0", "e+")


def table(rows: list[list[str]]) -> dict:
    """A benchmark's table in COLUMNS; every cell text, every row complete."""
    for r in rows:
        if len(r) != len(COLUMNS) or not all(isinstance(c, str) for c in r):
            raise ValueError(f"a benchmark table row needs {len(COLUMNS)} text cells ({COLUMNS}): {r!r}")
    return {"columns": list(COLUMNS), "rows": rows}


def add_out_option(ap: argparse.ArgumentParser, name: str) -> None:
    ap.add_argument("--out", type=Path, default=None,
                    help=f"also write the results, the table the README shows and their provenance here as strict "
                         f"JSON (make bench: docs/measurements/{name}.json; `make docs` renders it)")


def emit(out: Path | None, benchmark: str, what: str, machine: dict, results: dict, rows: list[list[str]]) -> dict:
    """Print `results` as JSON; with `out`, also write the measurement file (atomic, strict JSON: NaN and
    infinities as null): {schema, benchmark, what, provenance, table, results}."""
    from locaudit.io import strict_json, write_json_atomic

    print(json.dumps(strict_json(results), indent=2, allow_nan=False))
    record = {"schema": SCHEMA, "benchmark": benchmark, "what": what, "provenance": provenance(machine),
              "table": table(rows), "results": results}
    if out is not None:
        write_json_atomic(out, record)
        print(f"wrote {out}", file=sys.stderr)
    return record
