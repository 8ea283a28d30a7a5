"""The backend explorer's measuring side, without any widget: the memory guard, the sweeps, the crossovers.

The explorer measures with `moelab.bench.sweep` (`bench_sweep`; `local_sweep` where `moelab.bench` is missing)
and refuses over-budget configurations with the bench's own memory guard (`guard`), so a learner's Run and a
headless benchmark agree on what they measure and refuse. A backend without a memory model (your own) is probed
at a few tokens and scaled (`probed_peak_bytes`). Everything here takes and returns plain values and DataFrames.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import pandas as pd
import torch

from ..core.dtypes import parse_dtype
from ..core.config import MoEConfig
from ..memory import BACKENDS as MODELLED
from ..memory import analytic, format_bytes, quiet_stderr

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
    from ..memory import measure
    from ..layer.moe import SparseMoE

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


def _bench():
    """`moelab.bench` when it imports (it is optional for the widgets), else None."""
    try:
        from .. import bench
    except ImportError:
        return None
    return bench


def estimate_peak_bytes(config: MoEConfig, num_tokens: int, backend: str, dtype) -> tuple[int, str]:
    """(peak bytes of one call, 'analytic' or 'probed'): the memory model where there is one, else a probe."""
    try:
        return analytic(config, num_tokens, backend, parse_dtype(dtype)).peak_bytes, "analytic"
    except ValueError:  # no memory model for this backend
        return probed_peak_bytes(config, num_tokens, backend, dtype), "probed"


def guard(config: MoEConfig, num_tokens: int, backends: Sequence[str], dtype, budget_bytes: int,
          compiled: bool = False) -> pd.DataFrame:
    """The memory guard: the bytes one measurement at `num_tokens` tokens needs, per backend, against the budget.

    For the backends with a memory model (and `auto`) this is `moelab.bench`'s own guard estimate (resident
    weights and inputs + the analytic peak of the call), so the explorer refuses exactly what a sweep would skip.
    A backend without a model (your own) is measured at a few tokens and scaled linearly (`probed_peak_bytes`).
    Nothing big ever runs to find out. Columns: backend, num_tokens, peak_bytes, estimate ('analytic' or
    'probed'), budget_bytes, fits, reason ('' when it fits).
    """
    bench = _bench()
    torch_dtype = parse_dtype(dtype)
    rows = []
    for name in backends:
        modelled = name in MODELLED or name == "auto"
        if modelled and bench is not None:
            est = bench.guard.estimate(config, num_tokens, name, torch_dtype, compiled=compiled)
            peak, how = est.total_bytes, "analytic"
            what = (f"{name}{' compiled' if compiled else ''} at T={num_tokens} tokens (E={config.num_experts}, "
                    f"k={config.top_k}, {str(torch_dtype).removeprefix('torch.')})")
            reason = bench.guard.check(est, budget_bytes, what) or ""
        else:
            peak, how = estimate_peak_bytes(config, num_tokens, "grouped_mm" if name == "auto" else name, torch_dtype)
            source = ("analytic peak" if how == "analytic"
                      else f"measured at T={min(num_tokens, PROBE_TOKENS)} and scaled linearly")
            reason = "" if peak <= budget_bytes else (
                f"{name} needs {format_bytes(peak)} at T={num_tokens} tokens ({source}), over the budget of "
                f"{format_bytes(budget_bytes)}")
        rows.append({"backend": name, "num_tokens": num_tokens, "peak_bytes": peak, "estimate": how,
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


def _time_call(fn: Callable[[], object], min_run_time: float) -> tuple[float, float]:
    import torch.utils.benchmark as benchmark

    m = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=1).blocked_autorange(min_run_time=min_run_time)
    return m.median * 1e3, m.iqr * 1e3


def bench_sweep(config: MoEConfig, batch_size: int, seq_lens: Sequence[int], backends: Sequence[str],
                dtype="float32", compile: bool = False, seed: int = 0, min_run_time: float = 0.02,
                budget_bytes: int = DEFAULT_BUDGET_BYTES) -> pd.DataFrame:
    """`moelab.bench.sweep` over the explorer's settings: one row per (backend, sequence length), every column of
    the sweep (status, reason, median_ms, peak_extra_bytes measured, estimate_bytes, ...) plus the explorer's
    `compile` (= compiled) and `peak_bytes` (= peak_extra_bytes, the measured peak of the experts call)."""
    from .. import bench

    with quiet_stderr():  # the memory measurement's profiler logs to fd 2
        table = bench.sweep(backends=tuple(backends), tokens=[(batch_size, s) for s in seq_lens],
                            num_experts=[config.num_experts], top_k=[config.top_k], hidden_size=[config.hidden_size],
                            intermediate_size=[config.intermediate_size], dtypes=[dtype], compiled=[bool(compile)],
                            min_run_time=min_run_time, memory_budget=int(budget_bytes), measure_memory=True,
                            dense_limit=False, hidden_act=config.hidden_act, seed=seed, progress=False)
    table["compile"] = table["compiled"].astype(bool)
    table["peak_bytes"] = table["peak_extra_bytes"]
    return table


@contextlib.contextmanager
def _one_thread():
    """Time on one thread (steadier on a shared machine), and keep it one thread for the whole sweep: a compiled
    module guards on the thread count, so switching it between warm-up and timing would recompile every call."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def local_sweep(config: MoEConfig, batch_size: int, seq_lens: Sequence[int], backends: Sequence[str],
                dtype="float32", compile: bool = False, seed: int = 0, min_run_time: float = 0.02) -> pd.DataFrame:
    """Time one `SparseMoE` call per backend at each sequence length; a tidy table, one row per (backend, point).

    Every backend runs the same weights (`seed`) on the same inputs; with `compile`, each backend gets one
    `torch.compile(..., dynamic=True)` module, compiled on its first call and reused across sequence lengths.
    Columns: backend, batch_size, seq_len, num_tokens, top_k, num_experts, dtype, compile, median_ms, iqr_ms,
    peak_bytes (analytic, or probed for a backend without a memory model: see `peak_estimate`),
    max_abs_diff_to_eager.
    """
    from ..layer.moe import SparseMoE

    torch_dtype = parse_dtype(dtype)
    inputs, references = {}, {}
    reference_moe = SparseMoE(config, "eager", dtype=torch_dtype, seed=seed)
    rows = []
    with torch.no_grad(), _one_thread():
        for seq_len in seq_lens:
            # not the weights' seed: x would copy the router's rows
            generator = torch.Generator().manual_seed(seed + 1 + seq_len)
            x = torch.randn(batch_size * seq_len, config.hidden_size, generator=generator).to(torch_dtype)
            inputs[seq_len], references[seq_len] = x, reference_moe(x).float()
        for name in backends:
            moe = SparseMoE(config, name, dtype=torch_dtype, seed=seed)
            fn = torch.compile(moe, dynamic=True) if compile else moe
            for seq_len in seq_lens:
                x, num_tokens = inputs[seq_len], batch_size * seq_len
                out = fn(x).float()  # also the warm-up (and the compile, on the first point)
                median_ms, iqr_ms = _time_call(lambda: fn(x), min_run_time)
                peak, how = estimate_peak_bytes(config, num_tokens, name, torch_dtype)
                rows.append({"backend": name, "batch_size": batch_size, "seq_len": seq_len,
                             "num_tokens": num_tokens, "top_k": config.top_k, "num_experts": config.num_experts,
                             "dtype": str(torch_dtype).removeprefix("torch."), "compile": bool(compile),
                             "median_ms": median_ms, "iqr_ms": iqr_ms, "peak_bytes": peak, "peak_estimate": how,
                             "max_abs_diff_to_eager": (out - references[seq_len]).abs().max().item()})
    return pd.DataFrame(rows)
