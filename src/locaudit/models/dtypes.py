"""The one map between dtype names and torch dtypes.

Names accepted everywhere (CLI, studies, API): fp32/float32, bf16/bfloat16, fp16/float16 (and "none"
for "no autocast" = fp32 where a precision is meant). Canonical short names are fp32, bf16, fp16.
"""

from __future__ import annotations

import torch

from locaudit.errors import ConfigError

TORCH_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ALIASES: dict[str, str] = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16",
                           "float": "fp32", "none": "fp32"}
DTYPE_CHOICES: tuple[str, ...] = ("fp32", "float32", "bf16", "bfloat16", "fp16", "float16")


def dtype_name(value: str | torch.dtype | None) -> str:
    """Canonical short name (fp32, bf16, fp16) of a name, alias or torch dtype; None -> fp32."""
    if value is None:
        return "fp32"
    if isinstance(value, torch.dtype):
        for name, dt in TORCH_DTYPES.items():
            if dt == value:
                return name
        raise ConfigError(f"dtype {value} is not one of float32, bfloat16, float16")
    v = str(value).strip().lower().replace("torch.", "")
    v = ALIASES.get(v, v)
    if v not in TORCH_DTYPES:
        raise ConfigError(f"dtype {value!r} is not one of {', '.join(DTYPE_CHOICES)}")
    return v


def torch_dtype(value: str | torch.dtype | None) -> torch.dtype:
    """The torch dtype of a name, alias or dtype (None -> float32)."""
    return TORCH_DTYPES[dtype_name(value)]
