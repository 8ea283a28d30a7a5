"""The measured side: `measure(fn)` runs a call and reports the peak of the extra memory it took
(`MemoryMeasurement`), `quiet_stderr` keeps torch.profiler's C-level chatter out of notebook output, and
`compare` puts `analytic` and `measure` side by side per backend.

`measure` on CPU walks `torch.profiler`'s memory events (every allocation and free of PyTorch's CPU allocator,
in order) and returns the highest running total: the reliable tensor-level figure. The process's peak RSS agrees
with it for large allocations (32 MiB and more) but also counts memory outside PyTorch's allocator (the profiler's
own, libraries' workspaces) and pages never touched are not resident. On CUDA it reads
`torch.cuda.max_memory_allocated` around the call. Both exclude memory allocated before the call.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from ..core.dtypes import parse_dtype
from ..layer.moe import SparseMoE
from .estimate import BACKENDS, analytic
from .records import format_bytes


@dataclass
class MemoryMeasurement:
    """What `measure` returns.

    peak_bytes: the highest extra live bytes during the call (above what was allocated before it);
    retained_bytes: extra bytes still live when `fn` returned, its result included; device; method: how it was
    measured; timeline: (nanoseconds since the first event, live extra bytes) after each allocation or free
    (CPU only, else empty); result: what `fn` returned.
    """

    peak_bytes: int
    retained_bytes: int
    device: str
    method: str
    timeline: list = field(default_factory=list, repr=False)
    result: Any = field(default=None, repr=False)

    def __str__(self) -> str:
        return (f"measured peak {format_bytes(self.peak_bytes)} (retained {format_bytes(self.retained_bytes)}) "
                f"on {self.device}, by {self.method}")


@contextlib.contextmanager
def quiet_stderr():
    """Silence C-level writes to file descriptor 2 for the block (torch.profiler's kineto prints
    `USDT: ... profiler_start` lines there, with timestamps, which would land in a notebook's output).
    Python-level `sys.stderr` (warnings, tracebacks) is not affected inside a kernel."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable fd 2: nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def measure(fn: Callable[[], Any], device: str | torch.device = "cpu") -> MemoryMeasurement:
    """Run `fn()` once and measure the peak of the extra memory it takes on `device` ("cpu" or "cuda[:i]").

    Wrap the call in `torch.no_grad()` to compare with `analytic` (an autograd graph keeps more alive).
    CPU: `torch.profiler` memory events, summed in order (a profiled run is slower; the bytes are exact).
    CUDA: `torch.cuda.max_memory_allocated` minus the allocated bytes before the call.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        retained = torch.cuda.memory_allocated(device) - before
        return MemoryMeasurement(max(peak, 0), retained, str(device), "torch.cuda.max_memory_allocated",
                                 [], result)
    if device.type != "cpu":
        raise ValueError(f"measure supports 'cpu' and 'cuda' devices, got {device}")

    from torch.profiler import ProfilerActivity, profile

    # NOTE: kineto prints `USDT: ... profiler_start/stop` lines straight to fd 2; in a notebook they would land in
    # some cell's output, so the profiler's start and stop run with fd 2 silenced (fn itself is not).
    # NOTE: a free during the call of a block allocated before it (a tensor of an earlier, profiled call that the
    # cyclic garbage collector reaches now) is a negative event that lowers the running total: collect first
    # and keep the collector off for the call, so only fn's own frees are counted
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    with quiet_stderr():
        prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        prof.__enter__()
    try:
        result = fn()  # kept until profiling stops, so retained_bytes includes it
    finally:
        with quiet_stderr():
            prof.__exit__(None, None, None)
        if gc_was_enabled:
            gc.enable()
    # NOTE: `prof.events()` attributes allocations to the op that made them and keeps only unattributed frees
    # as "[memory]" events; the raw kineto events keep every allocation and free, in order.
    try:
        raw = prof.profiler.kineto_results.events()
    except AttributeError:  # pragma: no cover - a torch whose profiler moved its results
        raise RuntimeError(f"torch {torch.__version__}'s profiler does not expose its raw memory events "
                           "(profiler.kineto_results); moelab.memory.measure cannot measure CPU memory") from None
    events = [e for e in raw if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    events.sort(key=lambda e: e.start_ns())  # stable: same-timestamp events keep their record order
    live = peak = 0
    timeline = []
    start = events[0].start_ns() if events else 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
        timeline.append((event.start_ns() - start, live))
    return MemoryMeasurement(peak, live, "cpu", "torch.profiler memory events", timeline, result)


def compare(config, num_tokens: int, dtype=torch.float32, backends: Sequence[str] = BACKENDS, seed: int = 0):
    """Analytic vs measured peak of one `SparseMoE` call per backend, as a pandas table (CPU, no_grad).

    Each layer runs once first (a warm-up that also makes grouped_mm's workspace), then is measured; the analytic
    figures use the call's real (kept) tokens per expert, which eager's loop, capacity's dropless C and, with a
    capacity factor, grouped_mm's kept rows follow, and the layer's mode (`training`, which picks the factor).
    Columns: backend, num_tokens, path, analytic_peak_bytes (workspace included), workspace_bytes,
    analytic_extra_peak_bytes (without it), measured_peak_bytes, measured_over_analytic (measured /
    analytic_extra_peak_bytes).
    """
    dtype = parse_dtype(dtype)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, config.hidden_size, generator=generator).to(dtype)
    rows = []
    for backend in backends:
        moe = SparseMoE(config, backend, dtype=dtype, seed=seed)
        with torch.no_grad():
            _, routing = moe(x, return_router_output=True)  # warm-up, and the routing the models need
            kept = routing.top_k_index[~routing.dropped] if moe.router.has_capacity() else routing.top_k_index
            counts = torch.bincount(kept.reshape(-1), minlength=config.num_experts)
            del routing, kept
            measured = measure(lambda: moe(x)).peak_bytes
        estimate = analytic(config, num_tokens, backend, dtype, tokens_per_expert=counts, training=moe.training)
        rows.append({"backend": backend, "num_tokens": num_tokens, "path": estimate.path,
                     "analytic_peak_bytes": estimate.peak_bytes, "workspace_bytes": estimate.workspace_bytes,
                     "analytic_extra_peak_bytes": estimate.extra_peak_bytes, "measured_peak_bytes": measured,
                     "measured_over_analytic": measured / estimate.extra_peak_bytes})
    return pd.DataFrame(rows)
