"""`compare_backends`: run one input through every backend; report its difference to eager and its time."""

from __future__ import annotations

import pandas as pd
import torch
import torch.utils.benchmark as benchmark

from ..core.registry import ExpertsInterface
from ..core.config import MoEConfig
from ..core.dtypes import parse_dtype
from ..layer.moe import SparseMoE

def compare_backends(config: MoEConfig, num_tokens: int = 128, dtype="float32", backends=None, seed: int = 0,
                     min_run_time: float = 0.2, num_threads: int = 1) -> pd.DataFrame:
    """One row per backend: max |output - eager output|, median time in ms and its interquartile range."""
    dtype = parse_dtype(dtype)
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"num_tokens must be an int >= 1, got {num_tokens!r}")
    backends = list(backends or ["eager", "batched_mm", "grouped_mm"])
    for name in backends:
        ExpertsInterface.validate(name)
    moe = SparseMoE(config, seed=seed, dtype=dtype)
    # NOTE: seed + 1: drawn from the weights' own seed, x would copy the router's rows and route degenerately
    x = torch.randn(num_tokens, config.hidden_size, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    rows = []
    with torch.no_grad():
        moe.set_experts_implementation("eager")
        reference = moe(x).float()
        for name in backends:
            moe.set_experts_implementation(name)
            out = moe(x).float()
            timer = benchmark.Timer("moe(x)", globals={"moe": moe, "x": x}, num_threads=num_threads,
                                    label="SparseMoE forward", sub_label=name)
            m = timer.blocked_autorange(min_run_time=min_run_time)
            rows.append({"backend": name, "max_abs_diff_to_eager": (out - reference).abs().max().item(),
                         "max_abs_output": reference.abs().max().item(), "median_ms": m.median * 1e3,
                         "iqr_ms": m.iqr * 1e3, "runs": len(m.times)})
    return pd.DataFrame(rows)
