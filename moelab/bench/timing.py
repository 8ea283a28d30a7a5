"""Timing for the sweeps: `torch.utils.benchmark` blocks, several statements interleaved so that a shared
machine's drift lands in every variant's IQR alike, and a median/IQR summary per statement."""

from __future__ import annotations

import contextlib
import os
import sys

import numpy as np
from torch.utils import benchmark

from .env import timer_fn


@contextlib.contextmanager
def native_stderr_silenced():
    """Hide what C++ writes straight to fd 2 (the profiler's 'USDT ... profiler_start' lines) meanwhile."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real fd 2 (some notebooks): nothing to hide
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


TOP_UP_LIMIT_S = 3.0  # no more blocks for min_runs once a measurement has spent this long in timed calls
BLOCK_S = 0.01  # a timed block repeats a fast call until it lasts about this long


def _summary(block_times: list[float], number: int) -> dict:
    times = np.asarray(block_times) * 1e3  # ms per call, one value per block
    q1, q3 = np.percentile(times, [25, 75])
    return {"median_ms": float(np.median(times)), "iqr_ms": float(q3 - q1), "q1_ms": float(q1), "q3_ms": float(q3),
            "runs": int(len(block_times) * number)}


def measure_time(stmt_fn, *, num_threads: int, clock: str, min_run_time: float, min_runs: int = 5) -> dict:
    """One statement alone: torch.utils.benchmark's blocked_autorange, topped up to `min_runs` blocks."""
    return measure_interleaved([stmt_fn], num_threads=num_threads, clock=clock, min_run_time=min_run_time,
                                min_runs=min_runs)[0]


def measure_interleaved(stmt_fns, *, num_threads: int, clock: str, min_run_time: float, min_runs: int) -> list:
    """Time several statements block by block in turn (round robin, the order rotating each round).

    NOTE: on a shared machine the speed drifts by several percent over minutes; timing the variants of one
    configuration in alternating blocks puts the drift into every variant's IQR alike instead of into the
    ratios between them. Each block is a `torch.utils.benchmark.Timer.timeit(number)`, with `number` sized
    once so that a block lasts about BLOCK_S; each statement gets >= min_run_time of blocks and >= min_runs
    blocks (the latter capped at TOP_UP_LIMIT_S of calls, so a multi-second call gets fewer; see `runs`).
    """
    timers, numbers, blocks = [], [], []
    for fn in stmt_fns:
        timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=num_threads, timer=timer_fn(clock))
        once = timer.timeit(1).median  # the caller has warmed it up; this sizes the block
        timers.append(timer)
        numbers.append(max(1, int(BLOCK_S / max(once, 1e-9))))
        blocks.append([])

    def wanted(i):
        spent = sum(blocks[i]) * numbers[i]
        return spent < min_run_time or (len(blocks[i]) < min_runs and spent < TOP_UP_LIMIT_S)
    round_index = 0
    while True:
        todo = [i for i in range(len(timers)) if wanted(i)]
        if not todo:
            break
        shift = round_index % len(todo)
        for i in todo[shift:] + todo[:shift]:
            blocks[i].extend(timers[i].timeit(numbers[i]).times)
        round_index += 1
    return [_summary(b, n) for b, n in zip(blocks, numbers)]
