"""`compare_backends`: run one input through every backend; report its difference to eager and its time."""

from __future__ import annotations

import pandas as pd
import torch

from ..core.registry import ExpertsInterface
from ..core.config import MoEConfig
from ..core.dtypes import parse_dtype
from ..core.machine import bf16_note
from ..core.memory_guard import MemoryGuardError
from ..layer.moe import SparseMoE
from .analysis import FIXED_BACKENDS
from .env import resolve_clock
from .timing import measure_interleaved


def compare_backends(config: MoEConfig, num_tokens: int = 128, dtype="float32", backends=None, seed: int = 0,
                     min_run_time: float = 0.2, num_threads: int = 1, clock: str = "auto",
                     min_runs: int = 5) -> pd.DataFrame:
    """One row per backend (default `FIXED_BACKENDS`): max |output - eager output|, the largest |eager output|,
    median time in ms of one `SparseMoE` forward, its interquartile range and the number of timed calls; `skipped`:
    why a backend was not run (the memory guard's message: its intermediates would not fit), else "".

    Timed with `moelab.bench.timing.measure_interleaved`, the backends in turn (torch.utils.benchmark blocks), so
    a shared machine's drift lands in every backend alike; `clock` as in `moelab.bench.sweep` ("auto": this
    process's CPU time for one thread, else wall time). `table.attrs["bf16_note"]`: `moelab.core.machine.bf16_note`
    for `dtype` (None unless bfloat16 is emulated on this CPU), what a reader of the times should know.
    """
    dtype = parse_dtype(dtype)
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"num_tokens must be an int >= 1, got {num_tokens!r}")
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads must be an int >= 1, got {num_threads!r}")
    backends = list(backends or FIXED_BACKENDS)
    for name in backends:
        ExpertsInterface.validate(name)
    clock = resolve_clock(clock, "cpu", num_threads)
    # NOTE: one layer per backend (same seed: same weights), so that each timed statement runs its own backend
    layers = {name: SparseMoE(config, name, seed=seed, dtype=dtype) for name in backends}
    # NOTE: seed + 1: drawn from the weights' own seed, x would copy the router's rows and route degenerately
    x = torch.randn(num_tokens, config.hidden_size, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    skipped = {}  # backend -> the memory guard's message: it would not fit, so it is neither run nor timed
    with torch.no_grad():
        reference = SparseMoE(config, "eager", seed=seed, dtype=dtype)(x).float()
        diffs = {}
        for name, moe in layers.items():  # + warm-up
            try:
                diffs[name] = (moe(x).float() - reference).abs().max().item()
            except MemoryGuardError as err:
                skipped[name] = str(err)
        timed = [name for name in layers if name not in skipped]
        timings = dict(zip(timed, measure_interleaved([lambda moe=layers[name]: moe(x) for name in timed],
                                                      num_threads=num_threads, clock=clock,
                                                      min_run_time=min_run_time, min_runs=min_runs))) if timed else {}
    nan = float("nan")
    table = pd.DataFrame([{"backend": name, "max_abs_diff_to_eager": diffs.get(name, nan),
                           "max_abs_output": reference.abs().max().item(),
                           "median_ms": timings[name]["median_ms"] if name in timings else nan,
                           "iqr_ms": timings[name]["iqr_ms"] if name in timings else nan,
                           "runs": timings[name]["runs"] if name in timings else 0,
                           "skipped": skipped.get(name, "")}
                          for name in layers])
    table.attrs["bf16_note"] = bf16_note(dtype)
    return table
