"""Where one experts call spends its time, operator by operator (torch.profiler, one thread, CPU).

    python benchmarks/profile_steps.py --backend grouped_mm --dtype bfloat16 --experts 8 --top-k 2 --tokens 2048

Prints each aten operator's own CPU time per call (averaged over --calls calls after a warm-up) and its share of
the call: e.g. how much of grouped_mm is the GEMMs (`aten::mm`) and how much the sort, gathers, activation,
weighting and sum around them. BENCHMARKS.md's "other steps" column is the same split, measured by timing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moelab import ExpertsInterface, MoEConfig, SparseMoE  # noqa: E402
from moelab.bench.timing import native_stderr_silenced  # noqa: E402
from moelab.core.dtypes import parse_dtype  # noqa: E402


def profile_call(backend: str, dtype, num_experts: int, top_k: int, num_tokens: int, hidden_size: int,
                 intermediate_size: int, calls: int = 5, seed: int = 0) -> pd.DataFrame:
    """One row per operator: self CPU ms per call and share of the call, largest first."""
    torch.set_num_threads(1)
    config = MoEConfig(hidden_size=hidden_size, intermediate_size=intermediate_size, num_experts=num_experts,
                       top_k=top_k)
    moe = SparseMoE(config, dtype=dtype, seed=seed)
    x = torch.randn(num_tokens, hidden_size, generator=torch.Generator().manual_seed(seed)).to(dtype)
    fn = ExpertsInterface.get(backend)
    with torch.no_grad():
        routing = moe.router(x)  # fixed routing: only the experts call is profiled
        args = (moe.experts, x, routing.top_k_index, routing.top_k_weights)
        for _ in range(2):
            fn(*args)  # warm-up (and the workspace, where the backend has one)
        with native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                fn(*args)
    rows = [{"op": e.key, "calls_per_call": e.count / calls, "ms_per_call": e.self_cpu_time_total / 1e3 / calls}
            for e in prof.key_averages() if e.self_cpu_time_total > 0]
    table = pd.DataFrame(rows).sort_values("ms_per_call", ascending=False, ignore_index=True)
    table["share"] = table["ms_per_call"] / table["ms_per_call"].sum()
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="grouped_mm", choices=ExpertsInterface.names())
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--rows", type=int, default=12, help="operators to print (largest first)")
    args = p.parse_args(argv)
    table = profile_call(args.backend, parse_dtype(args.dtype), args.experts, args.top_k, args.tokens, args.hidden,
                         args.intermediate, args.calls)
    print(f"{args.backend} {args.dtype} E={args.experts} k={args.top_k} T={args.tokens} H={args.hidden} "
          f"I={args.intermediate}, one thread: {table['ms_per_call'].sum():.1f} ms per call")
    print(table.head(args.rows).to_string(index=False, formatters={"ms_per_call": "{:.2f}".format,
                                                                   "share": "{:.1%}".format,
                                                                   "calls_per_call": "{:g}".format}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
