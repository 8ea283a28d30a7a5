"""The backend explorer's measuring side, without any widget: the memory guard, the sweeps, the crossovers.

The explorer measures with `moelab.bench.sweep` (`bench_sweep`, and `local_sweep`, the same sweep without the
memory measurement) and refuses over-budget configurations with the bench's own memory guard (`guard`), so a
learner's Run and a headless benchmark agree on what they measure and refuse: there is one sweep and one timing
helper (`moelab.bench.timing`) in the package, and the widgets have none of their own. A backend without a memory
model (your own) is sized by its registered `memory_estimate`, else as the hungriest built-in; nothing big is
built to preview (`probed_peak_bytes` measures a real call, for a notebook that wants to). Everything here takes and returns
plain values and DataFrames.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd
import torch

from ..bench import guard as bench_guard
from ..bench.sweep import sweep
from ..core.config import MoEConfig
from ..core.dtypes import parse_dtype
from ..layer.moe import SparseMoE
from ..memory import MODELLED_BACKENDS, analytic, format_bytes, measure, quiet_stderr

DEFAULT_BUDGET_BYTES = 256 * 2**20  # per measurement; small on purpose: the machines are shared


def seq_len_points(seq_len: int) -> list[int]:
    """The sequence lengths a sweep visits: powers of two below `seq_len`, then `seq_len` itself."""
    points, p = [], 1
    while p < seq_len:
        points.append(p)
        p *= 2
    return points + [seq_len]


PROBE_TOKENS = 16
_probe_cache: dict = {}


def probed_peak_bytes(config: MoEConfig, num_tokens: int, backend: str, dtype, probe_tokens: int = PROBE_TOKENS) -> int:
    """For a backend without a memory model (your own): measure one call at `probe_tokens` tokens and scale it
    linearly to `num_tokens`. A linear guess: a backend whose memory grows faster than T is underestimated."""
    torch_dtype = parse_dtype(dtype)
    t0 = max(1, min(num_tokens, probe_tokens))
    key = (backend, config.num_experts, config.hidden_size, config.intermediate_size, config.top_k, torch_dtype, t0)
    if key not in _probe_cache:
        moe = SparseMoE(config, backend, dtype=torch_dtype, seed=0)
        x = torch.randn(t0, config.hidden_size, generator=torch.Generator().manual_seed(1)).to(torch_dtype)
        with torch.no_grad():
            moe(x)  # warm-up: one-time allocations are not the call's
            with quiet_stderr():
                _probe_cache[key] = measure(lambda: moe(x)).peak_bytes
    return math.ceil(_probe_cache[key] * num_tokens / t0)


def estimate_peak_bytes(config: MoEConfig, num_tokens: int, backend: str, dtype) -> tuple[int, str]:
    """(peak bytes of one call, how): 'analytic' (the memory model), 'registered' (the backend's own
    `memory_estimate`) or 'assumed' (neither: sized as the hungriest built-in). The bench guard's figure; nothing
    is allocated to find it."""
    if backend in MODELLED_BACKENDS or backend == "auto":
        return analytic(config, num_tokens, backend, parse_dtype(dtype)).peak_bytes, "analytic"
    peak, note = bench_guard.backend_peak(config, num_tokens, backend, parse_dtype(dtype))
    how = "assumed" if "no memory estimate" in note else "registered" if "registered" in note else "analytic"
    return peak, how


def guard(config: MoEConfig, num_tokens: int, backends: Sequence[str], dtype, budget_bytes: int,
          compiled: bool = False) -> pd.DataFrame:
    """The memory guard: the bytes one measurement at `num_tokens` tokens needs, per backend, against the budget.

    This is `moelab.bench`'s own guard estimate for every backend (resident weights and inputs + the peak of the
    call: analytic for the built-ins and `auto`, the backend's registered `memory_estimate` for yours, else the
    hungriest built-in's), so the explorer refuses exactly what a sweep would skip, and nothing is built or run to
    find out. Columns: backend, num_tokens, peak_bytes, estimate ('analytic', 'registered' or 'assumed'),
    budget_bytes, fits, reason ('' when it fits).
    """
    torch_dtype = parse_dtype(dtype)
    rows = []
    for name in backends:
        est = bench_guard.estimate(config, num_tokens, name, torch_dtype, compiled=compiled)
        _, how = estimate_peak_bytes(config, num_tokens, name, torch_dtype)
        what = (f"{name}{' compiled' if compiled else ''} at T={num_tokens} tokens (E={config.num_experts}, "
                f"k={config.top_k}, {str(torch_dtype).removeprefix('torch.')})")
        reason = bench_guard.check(est, budget_bytes, what) or ""
        rows.append({"backend": name, "num_tokens": num_tokens, "peak_bytes": est.total_bytes, "estimate": how,
                     "budget_bytes": budget_bytes, "fits": not reason, "reason": reason})
    return pd.DataFrame(rows)


def measured(results: pd.DataFrame) -> pd.DataFrame:
    """The rows that were measured: `status == "ok"` in a bench table (all rows of a table without status)."""
    return results[results["status"] == "ok"] if "status" in results else results


def crossovers(results: pd.DataFrame, metric: str = "median_ms", x: str = "num_tokens") -> pd.DataFrame:
    """Where two backends swap places on `metric` between two neighbouring `x` points.

    Returns one row per crossover: a, b (the pair), x_before, x_after, faster_before, faster_after.
    """
    wide = measured(results).pivot_table(index=x, columns="backend", values=metric).sort_index()
    names = list(wide.columns)
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            diff = (wide[a] - wide[b]).dropna()
            for (x0, d0), (x1, d1) in zip(diff.items(), list(diff.items())[1:]):
                if d0 != 0 and d1 != 0 and (d0 > 0) != (d1 > 0):
                    rows.append({"a": a, "b": b, "x_before": x0, "x_after": x1,
                                 "faster_before": a if d0 < 0 else b, "faster_after": a if d1 < 0 else b})
    return pd.DataFrame(rows, columns=["a", "b", "x_before", "x_after", "faster_before", "faster_after"])


def bench_sweep(config: MoEConfig, batch_size: int, seq_lens: Sequence[int], backends: Sequence[str],
                dtype="float32", compile: bool = False, seed: int = 0, min_run_time: float = 0.02,
                budget_bytes: int = DEFAULT_BUDGET_BYTES, measure_memory: bool = True) -> pd.DataFrame:
    """`moelab.bench.sweep` over the explorer's settings: one row per (backend, sequence length), every column of
    the sweep (status, reason, median_ms, iqr_ms, peak_extra_bytes, estimate_bytes, max_abs_diff_to_eager, ...)
    plus the explorer's `compile` (= compiled), `peak_bytes` and `peak_estimate`.

    Each measurement over `budget_bytes` (the bench's memory guard) is skipped, with the reason, and nothing of it
    runs. measure_memory: `peak_bytes` is the measured peak of the experts call (`peak_extra_bytes`,
    `peak_estimate = "measured"`); without it the sweep is faster and `peak_bytes` is `estimate_peak_bytes`'s
    figure ("analytic", or "probed" for a backend without a memory model).
    """
    with quiet_stderr():  # the memory measurement's profiler logs to fd 2
        table = sweep(backends=tuple(backends), tokens=[(batch_size, s) for s in seq_lens],
                      num_experts=[config.num_experts], top_k=[config.top_k], hidden_size=[config.hidden_size],
                      intermediate_size=[config.intermediate_size], dtypes=[dtype], compiled=[bool(compile)],
                      min_run_time=min_run_time, memory_budget=int(budget_bytes), measure_memory=measure_memory,
                      dense_limit=False, hidden_act=config.hidden_act, seed=seed, progress=False)
    table["compile"] = table["compiled"].astype(bool)
    if measure_memory:
        table["peak_bytes"] = table["peak_extra_bytes"]
        table["peak_estimate"] = ["measured" if v == v else "" for v in table["peak_bytes"]]
    else:
        estimates = [estimate_peak_bytes(config, int(t), name, dtype)
                     for t, name in zip(table["num_tokens"], table["backend"])]
        table["peak_bytes"] = [float(peak) for peak, _ in estimates]
        table["peak_estimate"] = [how for _, how in estimates]
    return table


def local_sweep(config: MoEConfig, batch_size: int, seq_lens: Sequence[int], backends: Sequence[str],
                dtype="float32", compile: bool = False, seed: int = 0, min_run_time: float = 0.02,
                budget_bytes: int = DEFAULT_BUDGET_BYTES) -> pd.DataFrame:
    """The explorer's sweep without the memory measurement: `bench_sweep(..., measure_memory=False)`.

    One row per (backend, sequence length), measured by `moelab.bench.sweep` (same weights under `seed` and the
    same routing for every backend; over-budget measurements skipped with the reason); `peak_bytes` is the
    analytic peak of one call, or the probed one for a backend without a memory model (`peak_estimate` says which).
    """
    return bench_sweep(config, batch_size, seq_lens, backends, dtype=dtype, compile=compile, seed=seed,
                       min_run_time=min_run_time, budget_bytes=budget_bytes, measure_memory=False)
