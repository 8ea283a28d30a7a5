"""`sweep`: time the experts backends over a grid and return a tidy table, one row per measurement.

A measurement is one (library, backend, compiled or not) on one configuration (tokens, num_experts, top_k,
hidden and intermediate size, dtype). The experts call is timed on its own: routing is computed once by the
layer's router and kept fixed, and both libraries get the same weights and the same routing. Every grid point
gives a row: measured (`status="ok"`), skipped by the memory guard or because it is not a valid configuration
(`"skipped"`, with the reason) or failed (`"error"`, with the exception); timings are NaN unless ok.

Per configuration and dtype the *dense limit* is measured in the same run: one dense matmul pair doing the same
useful FLOPs (`S = T*k` rows through `[H, 2I]` then `[I, H]`). `frac_dense = dense_median_ms / median_ms`.
"""

from __future__ import annotations

import itertools
import math
from typing import Iterable, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from .. import memory
from ..backends import ExpertsInterface, release_workspace
from ..backends.auto import choose
from ..core.dtypes import parse_dtype
from ..core.config import MoEConfig
from ..hf import require_transformers
from ..hf.inspect_adapter import NAMESAKE_BACKENDS
from ..layer.moe import SparseMoE
from . import guard, hf
from .baselines import dense_pair, grouped_gemm_pair, useful_flops
from .env import environment, load_average, resolve_clock
from .timing import measure_interleaved, native_stderr_silenced

DEFAULT_BACKENDS = ("eager", "batched_mm", "grouped_mm", "capacity", "block_aligned", "auto")
# compiled with fullgraph=False: eager loops over the experts hit (data-dependent), and the sweep calls capacity
# without a dropped mask, so its C is the largest group, a data-dependent size (docs/compile_table.md)
NOT_FULLGRAPH = ("eager", "capacity")
DEFAULT_GRID = {
    "tokens": (1, 16, 128, 512, 2048),
    "num_experts": (8, 64),
    "top_k": (2, 8),
    "hidden_size": (1024,),
    "intermediate_size": (512,),
    "dtypes": ("float32", "bfloat16"),
    "compiled": (False,),
}

COLUMNS = [
    "status", "reason", "library", "backend", "chosen", "compiled", "compile_mode", "fullgraph", "pass",
    "num_tokens", "batch_size", "seq_len", "num_experts", "top_k", "pairs", "hidden_size", "intermediate_size",
    "dtype", "device", "num_threads", "clock",
    "median_ms", "iqr_ms", "q1_ms", "q3_ms", "runs",
    "useful_gflop", "gflops", "dense_median_ms", "dense_iqr_ms", "frac_dense", "grouped_gemm_median_ms",
    "grouped_gemm_cached_median_ms",
    "peak_extra_bytes", "estimate_bytes", "budget_bytes", "max_abs_diff_to_eager",
]


def _as_tuple(value, name: str) -> tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        value = (value,)
    value = tuple(value)
    if not value:
        raise ValueError(f"{name} must not be empty")
    return value


def _positive_ints(values, name: str) -> tuple[int, ...]:
    values = _as_tuple(values, name)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be ints >= 1, got {v!r}")
    return values


def _token_shapes(tokens) -> list[tuple[int, int]]:
    """tokens: ints (T, as batch 1 x sequence T) or (batch_size, seq_len) pairs -> [(batch_size, seq_len)]."""
    shapes = []
    for t in _as_tuple(tokens, "tokens"):
        if isinstance(t, (tuple, list)) and len(t) == 2:
            b, s = t
        else:
            b, s = 1, t
        for v in (b, s):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"tokens must be ints >= 1 or (batch_size, seq_len) pairs of them, got {t!r}")
        shapes.append((b, s))
    return shapes


def _call(library: str, backend: str, moe: SparseMoE, hf_module, compiled: bool, fullgraph: bool, mode):
    """(fn(experts, hidden_states, top_k_index, top_k_weights) -> [T, H], experts) for one measurement."""
    if library == "moelab":
        experts, impl = moe.experts, ExpertsInterface.get(backend)
    else:
        experts, impl = hf_module, hf.backend(backend)
    if compiled:
        # NOTE: compile the backend function itself: each has its own code object, so the variants of one
        # configuration do not share (and exhaust) one code object's recompilation budget.
        impl = torch.compile(impl, fullgraph=fullgraph, mode=mode, dynamic=False)
    return impl, experts


def sweep(backends: Sequence[str] | None = None, tokens=DEFAULT_GRID["tokens"],
          num_experts=DEFAULT_GRID["num_experts"], top_k=DEFAULT_GRID["top_k"],
          hidden_size=DEFAULT_GRID["hidden_size"], intermediate_size=DEFAULT_GRID["intermediate_size"],
          dtypes=DEFAULT_GRID["dtypes"], compiled=DEFAULT_GRID["compiled"], *,
          transformers: bool = False, device="cpu", num_threads: int = 1, backward: bool = False,
          min_run_time: float = 0.2, min_runs: int = 5, memory_budget=None, measure_memory: bool = True,
          dense_limit: bool = True, gemm_bound: bool = False, clock: str = "auto", compile_mode: str | None = None,
          hidden_act: str = "silu", seed: int = 0, progress: bool = True) -> pd.DataFrame:
    """Time `backends` over the grid tokens x num_experts x top_k x hidden_size x intermediate_size x dtypes x
    compiled; one row per measurement (see `COLUMNS` and the module docstring).

    tokens: ints T, or (batch_size, seq_len) pairs (T = their product). transformers: also time transformers'
    same-named backends on identical weights (needs `pip install -e .[hf]`). num_threads: torch threads (1:
    steadiest on a shared machine). backward: time forward + backward instead of forward only.
    min_run_time: seconds of timing per measurement (torch.utils.benchmark's blocked_autorange); min_runs: at
    least this many timed blocks, so that the median and IQR rest on several values even for slow calls.
    memory_budget: bytes, a fraction of the available memory, or a string such as "8GiB"; default half the
    available memory: a measurement estimated above it (`moelab.bench.guard`: before the routing exists, so a
    routing-dependent backend is sized for the worst routing) is skipped and recorded with the reason.
    measure_memory: also measure each call's peak extra bytes (one profiled call). dense_limit: measure the
    dense matmul pair; gemm_bound: also time the bare grouped GEMMs of the routing, as they are and with every
    group reading one expert's weights (kept in cache: what streaming E experts' weights costs). clock: "auto" (CPU time of
    this process for one CPU thread, else wall), "wall" or "process". compile_mode: torch.compile mode for the
    compiled variants (`fullgraph=True`, except `NOT_FULLGRAPH`, which cannot be captured whole).
    The table's `attrs["environment"]` records versions, device, threads, CPU capability and the clock.
    """
    backends = _as_tuple(backends or DEFAULT_BACKENDS, "backends")
    for name in backends:
        ExpertsInterface.validate(name)
    shapes = _token_shapes(tokens)
    num_experts = _positive_ints(num_experts, "num_experts")
    top_k = _positive_ints(top_k, "top_k")
    hidden_size = _positive_ints(hidden_size, "hidden_size")
    intermediate_size = _positive_ints(intermediate_size, "intermediate_size")
    dtypes = tuple(parse_dtype(d) for d in _as_tuple(dtypes, "dtypes"))
    compiled = tuple(bool(c) for c in _as_tuple(compiled, "compiled"))
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads must be an int >= 1, got {num_threads!r}")
    if (isinstance(min_run_time, bool) or not isinstance(min_run_time, (int, float)) or not math.isfinite(min_run_time)
            or min_run_time <= 0):
        raise ValueError(f"min_run_time must be a finite number > 0 (seconds), got {min_run_time!r}")
    if isinstance(min_runs, bool) or not isinstance(min_runs, int) or min_runs < 1:
        raise ValueError(f"min_runs must be an int >= 1, got {min_runs!r}")
    try:
        device = torch.device(device)
        torch.empty(0, device=device)  # NOTE: fails here, named, rather than deep inside the first measurement
    except (RuntimeError, TypeError, AssertionError) as err:  # AssertionError: torch built without CUDA
        raise ValueError(f"device {device!r} is not available on this machine ({err})") from None
    clock = resolve_clock(clock, device, num_threads)
    budget = guard.resolve_budget(memory_budget, device)
    libraries = ["moelab"]
    if transformers:
        require_transformers()
        libraries.append("transformers")
    measurements = [(lib, b) for lib in libraries for b in backends if lib == "moelab" or b in NAMESAKE_BACKENDS]

    grid = list(itertools.product(dtypes, hidden_size, intermediate_size, num_experts, top_k, shapes))
    total = len(grid) * len(compiled) * len(measurements)
    env = environment(device, num_threads, clock)
    rows: list[dict] = []
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    bar = tqdm(total=total, desc="moelab bench", unit="meas", disable=not progress)
    try:
        for (dtype, H, I, E, k), group in itertools.groupby(grid, key=lambda g: g[:5]):
            shapes_here = [g[5] for g in group]
            _sweep_config(rows, bar, dtype, H, I, E, k, shapes_here, compiled, measurements, device=device,
                          num_threads=num_threads, backward=backward, min_run_time=min_run_time, min_runs=min_runs,
                          budget=budget,
                          measure_memory=measure_memory, dense_limit=dense_limit, gemm_bound=gemm_bound,
                          clock=clock, compile_mode=compile_mode, hidden_act=hidden_act, seed=seed)
    finally:
        bar.close()
        torch.set_num_threads(previous_threads)
    table = pd.DataFrame(rows, columns=COLUMNS)
    env["load_average_after"] = load_average()
    env["budget_bytes"] = budget
    table.attrs["environment"] = env
    return table


def _sweep_config(rows, bar, dtype, H, I, E, k, shapes, compiled, measurements, *, device, num_threads, backward,
                  min_run_time, min_runs, budget, measure_memory, dense_limit, gemm_bound, clock, compile_mode,
                  hidden_act, seed):
    dtype_name = str(dtype).removeprefix("torch.")
    base = {"num_experts": E, "top_k": k, "hidden_size": H, "intermediate_size": I, "dtype": dtype_name,
            "device": str(device), "num_threads": num_threads, "clock": clock, "budget_bytes": budget,
            "pass": "forward+backward" if backward else "forward"}
    if k > E:
        for (b, s), comp, (lib, name) in itertools.product(shapes, compiled, measurements):
            rows.append(_row(base, lib, name, comp, b, s, status="skipped",
                             reason=f"invalid configuration: top_k = {k} > num_experts = {E}"))
            bar.update()
        return
    config = MoEConfig(hidden_size=H, intermediate_size=I, num_experts=E, top_k=k, hidden_act=hidden_act,
                       initializer_range=H ** -0.5)
    weight_copies = 1 + any(lib == "transformers" for lib, _ in measurements)
    moe = hf_module = None
    for shape_index, (b, s) in enumerate(shapes):
        T = b * s
        S = T * k
        # the guard first: nothing is built or run for a configuration that does not fit
        plans = []
        for comp, (lib, name) in itertools.product(compiled, measurements):
            est = guard.estimate(config, T, name, dtype, device=device, compiled=comp, backward=backward,
                                 weight_copies=weight_copies)
            what = f"{lib} {name}{' compiled' if comp else ''} at T={T}, E={E}, k={k}, H={H}, I={I}, {dtype_name}"
            plans.append((comp, lib, name, est, guard.check(est, budget, what)))
        if all(reason for *_, reason in plans):
            for comp, lib, name, est, reason in plans:
                rows.append(_row(base, lib, name, comp, b, s, status="skipped", reason=reason,
                                 estimate_bytes=est.total_bytes))
                bar.update()
            continue
        if moe is None:
            moe = SparseMoE(config, seed=seed, dtype=dtype, device=device)
            if weight_copies == 2:
                hf_module = hf.transformers_experts(moe.experts)
        generator = torch.Generator().manual_seed(seed + T)
        x = torch.randn(T, H, generator=generator).to(dtype=dtype, device=device)
        with torch.no_grad():
            routing = moe.router(x)
        top_k_index, top_k_weights = routing.top_k_index, routing.top_k_weights
        reference = None
        eager_est = guard.estimate(config, T, "eager", dtype, device=device, weight_copies=weight_copies)
        if eager_est.total_bytes <= budget:
            with torch.no_grad():
                reference = ExpertsInterface.get("eager")(moe.experts, x, top_k_index, top_k_weights).float()
        shared = {"useful_gflop": useful_flops(T, k, H, I, backward) / 1e9}
        dense_est = guard.dense_estimate(config, T, dtype, backward)
        results: dict[int, dict] = {}
        prepared: dict[int, tuple] = {}
        if any(comp for comp, *_ in plans):
            torch._dynamo.reset()
        for i, (comp, lib, name, est, reason) in enumerate(plans):
            bar.set_postfix_str(f"{dtype_name} E={E} k={k} T={T} {lib}:{name}{'+compile' if comp else ''} (warm-up)")
            if reason:
                results[i] = _row(base, lib, name, comp, b, s, status="skipped", reason=reason,
                                  estimate_bytes=est.total_bytes)
                continue
            got = _prepare_one(base, lib, name, comp, b, s, moe, hf_module, x, top_k_index, top_k_weights,
                               reference, est, backward=backward, compile_mode=compile_mode)
            if isinstance(got, dict):  # an error row
                results[i] = got
            else:
                prepared[i] = got
        # every variant of this configuration, plus the dense limit and the bare grouped GEMMs, timed in turn
        timed = {("plan", i): stmt for i, (stmt, _) in prepared.items()}
        if prepared and dense_limit and dense_est.total_bytes <= budget:
            timed["dense"] = dense_pair(S, H, I, dtype, device, backward, generator)
        if prepared and gemm_bound and not backward and dense_est.total_bytes <= budget:
            timed["bound"] = grouped_gemm_pair(moe.experts, top_k_index, dtype, device, generator)
            timed["cached"] = grouped_gemm_pair(moe.experts, top_k_index, dtype, device, generator, cached=True)
        bar.set_postfix_str(f"{dtype_name} E={E} k={k} T={T}: timing {len(timed)} variants in turn")
        with torch.set_grad_enabled(backward):
            for stmt in timed.values():
                stmt()  # warm-up (the plans' were warmed up by _prepare_one)
            timings = dict(zip(timed, measure_interleaved(list(timed.values()), num_threads=num_threads,
                                                           clock=clock, min_run_time=min_run_time,
                                                           min_runs=min_runs)))
        if "dense" in timings:
            shared["dense_median_ms"], shared["dense_iqr_ms"] = (timings["dense"]["median_ms"],
                                                                 timings["dense"]["iqr_ms"])
        if "bound" in timings:
            shared["grouped_gemm_median_ms"] = timings["bound"]["median_ms"]
            shared["grouped_gemm_cached_median_ms"] = timings["cached"]["median_ms"]
        for i, (stmt, extra) in prepared.items():
            comp, lib, name, est, _ = plans[i]
            timing = timings[("plan", i)]
            if measure_memory:
                release_workspace()  # so a reused workspace counts in the peak, as on a first call
                try:
                    with native_stderr_silenced(), torch.set_grad_enabled(backward):
                        extra["peak_extra_bytes"] = memory.measure(stmt, device=x.device).peak_bytes
                except Exception as err:  # noqa: BLE001 - the timing stands; say why the memory is missing
                    extra["reason"] = f"memory not measured: {type(err).__name__}: {err}"[:300]
            gflops = shared["useful_gflop"] / (timing["median_ms"] / 1e3)
            results[i] = _row(base, lib, name, comp, b, s, status="ok", gflops=gflops, **timing, **extra, **shared)
        for i, row in results.items():
            if row["status"] != "ok":
                for key, value in shared.items():
                    row[key] = value
        rows.extend(results[i] for i in range(len(plans)))
        bar.update(len(plans))
        if any(comp for comp, *_ in plans):
            torch._dynamo.reset()


def _row(base, library, backend, compiled, batch_size, seq_len, **values) -> dict:
    T = batch_size * seq_len
    row = dict.fromkeys(COLUMNS, math.nan)
    row.update(base)
    row.update({"library": library, "backend": backend, "compiled": compiled, "num_tokens": T,
                "batch_size": batch_size, "seq_len": seq_len, "pairs": T * base["top_k"], "reason": "",
                "chosen": "", "compile_mode": "", "fullgraph": math.nan})
    row.update(values)
    if "dense_median_ms" in values and "median_ms" in values:
        row["frac_dense"] = values["dense_median_ms"] / values["median_ms"]
    return row


def _prepare_one(base, lib, name, comp, b, s, moe, hf_module, x, top_k_index, top_k_weights, reference, est, *,
                 backward, compile_mode):
    """(stmt, extra columns) ready to time, warmed up (and compiled); or the error row if it cannot run."""
    fullgraph = name not in NOT_FULLGRAPH  # their data-dependent loop or size cannot be captured whole
    extra = {"estimate_bytes": est.total_bytes}
    if comp:
        extra.update(compile_mode=compile_mode or "default", fullgraph=fullgraph)
    if name == "auto":
        # timing forward + backward, the call needs gradients: auto reads its "backward" rules (unless compiled)
        extra["chosen"] = choose(top_k_index.numel(), x.dtype, x.device, comp, moe.config.num_experts,
                                 backward=backward)[0]
    try:
        fn, experts = _call(lib, name, moe, hf_module, comp, fullgraph, compile_mode)
        with torch.no_grad():
            out = fn(experts, x, top_k_index, top_k_weights)  # warm-up (and compilation)
        if reference is not None:
            extra["max_abs_diff_to_eager"] = (out.float() - reference).abs().max().item() if out.numel() else 0.0
        del out
        if backward:
            x_leaf = x.detach().clone().requires_grad_()
            leaves = [x_leaf, experts.gate_up_proj, experts.down_proj]
            grad_out = torch.randn_like(x)

            def stmt():
                return torch.autograd.grad(fn(experts, x_leaf, top_k_index, top_k_weights), leaves, grad_out)
            stmt()
        else:
            def stmt():
                return fn(experts, x, top_k_index, top_k_weights)
        return stmt, extra
    except Exception as err:  # a backend that cannot run here is a result, not a crash
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return _row(base, lib, name, comp, b, s, status="error", reason=f"{type(err).__name__}: {message}"[:500],
                    **extra)
