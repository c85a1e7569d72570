"""What every benchmark prints about the machine: CPU capability, the resolved precision, threads, load,
and the measured fp32 GEMM peak, so that throughputs can be read as a fraction of what the machine can do.

A model's work is counted as 2 * (weights it multiplies) FLOPs per token (the linear layers; attention
scores and element-wise work are left out), so `fraction_of_peak` is a lower bound of the real fraction.
"""

from __future__ import annotations

import os
import time

import torch


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
