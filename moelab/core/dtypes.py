"""dtype names to `torch.dtype`: the one parser behind every `dtype=` argument and CLI flag."""

from __future__ import annotations

import torch

# the floating dtypes moelab runs in, by the names its CLI, widgets and saved folders use
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def parse_dtype(dtype, argument: str = "dtype", *, allow_auto: bool = False) -> torch.dtype | None:
    """'bfloat16', 'torch.bfloat16' or torch.bfloat16 -> torch.bfloat16.

    With `allow_auto`, None and "auto" give None (keep what is there, as `from_pretrained` does). Anything else is
    a ValueError naming `argument` and the valid names.
    """
    if allow_auto and (dtype is None or dtype == "auto"):
        return None
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    valid = list(DTYPES) + (["'auto'"] if allow_auto else [])
    raise ValueError(f"{argument} must be a floating torch.dtype or one of {valid}, got {dtype!r}")


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16'."""
    return str(dtype).removeprefix("torch.")
