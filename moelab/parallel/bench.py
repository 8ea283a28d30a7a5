"""The EP benchmark behind `python -m moelab ep`: one MoE layer at ep = 1, 2, ... on this machine, the time of a
forward split into compute and communication.

The global batch of T tokens is split evenly over the ranks (rank r gets T // ep, the first T % ep ranks one more).
ep = 1 runs the plain single-process `SparseMoE` in this process (no exchange, no group); ep > 1 the
`ExpertParallelMoE`, which times its own phases (`time_phases`, `last_phases`; not under `moelab.inspect`, whose
recording changes the backends' paths). Every rank runs with one thread, so ep ranks use ep cores: with more ranks
than free cores they take turns, the times mean little and only the bytes are exact.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import pandas as pd
import torch
import torch.distributed as dist

from ..core.config import MoEConfig
from ..core.dtypes import dtype_name, parse_dtype
from ..core.machine import cpu_description
from ..layer.moe import SparseMoE
from .launch import run_ranks
from .layer import ExpertParallelMoE

COLUMNS = ["ep", "rank", "tokens", "total_ms", "route_ms", "permute_ms", "dispatch_ms", "experts_ms", "combine_ms",
           "unpermute_ms", "compute_ms", "comm_ms", "bytes_sent", "bytes_received"]
PHASES = ("permute", "dispatch", "experts", "combine", "unpermute")  # as ExpertParallelMoE.last_phases names them


def available_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def split_tokens(num_tokens: int, ep: int) -> list[int]:
    """T tokens over ep ranks: T // ep each, the first T % ep ranks one more."""
    return [num_tokens // ep + (r < num_tokens % ep) for r in range(ep)]


def _time_rank(rank: int, config_dict: dict, num_tokens: int, repeat: int, warmup: int, seed: int, dtype: str,
               backend: str) -> dict:
    """One rank of `time_ep` (spawned): the medians of `repeat` timed forwards, in ms, and the bytes of one."""
    ep = dist.get_world_size() if dist.is_initialized() else 1
    config = MoEConfig.from_dict(config_dict)
    tokens = split_tokens(num_tokens, ep)
    generator = torch.Generator().manual_seed(seed + 1)
    xs = [torch.randn(t, config.hidden_size, generator=generator).to(parse_dtype(dtype)) for t in tokens]
    x = xs[rank]  # [T_r, H]
    moe = SparseMoE(config, backend, dtype=parse_dtype(dtype), seed=seed)
    samples = []
    with torch.no_grad():
        if ep == 1:  # the plain layer: the router, then every expert here; nothing to exchange
            for i in range(warmup + repeat):
                start = time.perf_counter()
                routing = moe.route(x)
                routed = time.perf_counter()
                moe.routed_experts(x, routing)
                end = time.perf_counter()
                if i >= warmup:
                    samples.append({"total": end - start, "route": routed - start, "experts": end - routed})
        else:
            layer = ExpertParallelMoE(moe)
            # NOTE: timed by the layer itself, not under moelab.inspect: a recording backend skips its workspace
            layer.time_phases = True
            for i in range(warmup + repeat):
                dist.barrier()  # every rank starts each forward together
                start = time.perf_counter()
                layer(x)
                end = time.perf_counter()
                phases = layer.last_phases
                sample = {phase: phases[phase]["seconds"] for phase in PHASES}
                sample["total"] = end - start
                sample["route"] = sample["total"] - sum(sample[p] for p in PHASES)  # the router and the rest
                if i >= warmup:
                    samples.append(sample)
            sent = phases["dispatch"]["bytes_sent"] + phases["combine"]["bytes_sent"]
            received = phases["dispatch"]["bytes_received"] + phases["combine"]["bytes_received"]
    row = {"ep": ep, "rank": rank, "tokens": tokens[rank]}
    for key in ("total", "route", *PHASES):
        values = [s[key] for s in samples if key in s]
        row[f"{key}_ms"] = statistics.median(values) * 1e3 if values else 0.0
    row["compute_ms"] = row["experts_ms"]
    row["comm_ms"] = row["dispatch_ms"] + row["combine_ms"]
    row["bytes_sent"], row["bytes_received"] = (sent, received) if ep > 1 else (0, 0)
    return row


def time_ep(config: MoEConfig, num_tokens: int, ranks=(1, 2), *, repeat: int = 5, warmup: int = 2, seed: int = 0,
            dtype="float32", backend: str = "grouped_mm", timeout: float = 300.0) -> pd.DataFrame:
    """One row per (ep, rank) with the median ms of each phase (`COLUMNS`): compute_ms is the local experts,
    comm_ms the dispatch + combine (the counts exchange, the rows, and any wait for a slower peer), route_ms the
    rest of the forward; bytes_* what leaves / reaches the rank in one forward. `table.attrs["oversubscribed"]`
    is True when some ep exceeds the cores this process may use."""
    if not isinstance(config, MoEConfig):
        raise ValueError(f"config must be a moelab.MoEConfig, got {type(config).__name__}")
    ranks = list(ranks)
    if not ranks or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ranks):
        raise ValueError(f"ranks must be a list of ints >= 1, got {ranks!r}")
    bad = [r for r in ranks if config.num_experts % r]
    if bad:
        raise ValueError(f"ranks {bad} do not divide num_experts = {config.num_experts}: each rank holds E / ep")
    for name, value, low in (("num_tokens", num_tokens, 1), ("repeat", repeat, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    dtype = dtype_name(parse_dtype(dtype))
    rows = []
    for ep in ranks:
        if ep == 1:  # the plain layer needs no group: timed here, on one thread as each rank is (no spawn to pay)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                rows.append(_time_rank(0, config.to_dict(), num_tokens, repeat, warmup, seed, dtype, backend))
            finally:
                torch.set_num_threads(threads)
            continue
        rows += run_ranks(_time_rank, ep, config.to_dict(), num_tokens, repeat, warmup, seed, dtype, backend,
                          timeout=timeout)
    table = pd.DataFrame(rows, columns=COLUMNS)
    table.attrs["oversubscribed"] = max(ranks) > available_cores()
    table.attrs["cores"] = available_cores()
    return table


# ------------------------------------------------------------------------------------------ python -m moelab ep

def add_ep(sub) -> None:
    """The `ep` sub-command of `python -m moelab`."""
    p = sub.add_parser("ep", help="time one MoE layer at ep = 1, 2, ... gloo ranks here: compute vs communication")
    p.add_argument("--tokens", type=int, default=4096, help="T, tokens of the global batch, split over the ranks "
                   "(default 4096)")
    p.add_argument("--experts", type=int, default=8, help="E, number of experts (default 8)")
    p.add_argument("--top-k", type=int, default=2, help="k, experts per token (default 2)")
    p.add_argument("--hidden", type=int, default=512, help="H, hidden size (default 512)")
    p.add_argument("--intermediate", type=int, default=256, help="I, expert intermediate size (default 256)")
    p.add_argument("--ranks", default="1,2", help="the EP degrees to time, comma-separated (default 1,2)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or float64 (default float32)")
    p.add_argument("--backend", default="grouped_mm", help="the local experts' backend (default grouped_mm)")
    p.add_argument("--repeat", type=int, default=5, help="timed forwards per ep; medians are shown (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed forwards first (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before the ranks of one ep are killed")
    p.set_defaults(func=run_ep)


def run_ep(args) -> int:
    try:
        ranks = [int(v) for v in args.ranks.split(",") if v.strip()]
    except ValueError:
        print(f"error: --ranks takes comma-separated ints (e.g. 1,2), got {args.ranks!r}", file=sys.stderr)
        return 2
    try:
        config = MoEConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_experts=args.experts,
                           top_k=args.top_k)
        table = time_ep(config, args.tokens, ranks, repeat=args.repeat, warmup=args.warmup, seed=args.seed,
                        dtype=args.dtype, backend=args.backend, timeout=args.timeout)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"torch {torch.__version__}, gloo on 127.0.0.1, one thread per rank, {table.attrs['cores']} core(s) "
          f"available")
    print(cpu_description())
    print(f"SparseMoE T={args.tokens} (global, split over the ranks) H={args.hidden} I={args.intermediate} "
          f"E={args.experts} k={args.top_k} {args.dtype}, backend {args.backend}; median of {args.repeat} forwards")
    print("compute = the local experts; comm = dispatch + combine (counts, rows, and waiting for the slowest "
          "peer); route = the router and the rest; ep=1 is the plain single-process layer")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > table.attrs["cores"]:  # other processes compete for the cores: the times carry their noise
        print(f"note: the load average is {load:.1f} on {table.attrs['cores']} core(s): other processes share "
              f"them, so the times are noisy")
    if table.attrs["oversubscribed"]:
        print(f"note: {max(ranks)} ranks on {table.attrs['cores']} core(s) oversubscribe this machine: the ranks "
              f"take turns on the cores, so the times mean little; only the bytes mean anything")
    return 0
