"""The environment a benchmark ran in: versions, device, threads, CPU model and features, and the clock it read."""

from __future__ import annotations

import os
import platform
import time

import torch

from ..core import machine
from ..hf import require_transformers
from ..models.io import package_version

CLOCKS = ("auto", "wall", "process")
# the CPU flags a record keeps: the vector and matrix instruction sets the kernels choose between
ISA_FLAG_PREFIXES = ("avx", "amx", "fma", "f16c", "sse4")


def resolve_clock(clock: str, device, num_threads: int) -> str:
    """'auto' -> 'process' (CPU time of this process) for one thread on CPU, else 'wall'.

    One thread's CPU time does not count the time other programs take the core away: on a shared machine it is
    far steadier than wall time, and equals it on an idle one. With several threads it would add them up, and a
    GPU works while the CPU waits, so there wall time is the only honest clock.
    """
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {list(CLOCKS)}, got {clock!r}")
    if clock == "auto":
        return "process" if torch.device(device).type == "cpu" and num_threads == 1 else "wall"
    return clock


def timer_fn(clock: str):
    return time.process_time if clock == "process" else time.perf_counter


def load_average() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


def environment(device="cpu", num_threads: int = 1, clock: str = "auto") -> dict:
    """A JSON-able record of where the numbers come from.

    The CPU facts come from `moelab.core.machine`: `cpu_model`, `cpu_capability` (the kernels torch picked),
    `cpu_flags` (the vector/matrix instruction-set flags, sorted), `native_bf16` (bfloat16 dot-product instructions,
    without which bf16 GEMMs are emulated; None where the flags are unknown), `onednn_bf16` (torch hands bf16
    matmuls to oneDNN rather than its own layout-sensitive loops) and `cpu_description` (all of it in one line).
    """
    device = torch.device(device)
    env = {
        "moelab_version": package_version(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else machine.cpu_model(),
        "cpu_model": machine.cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": sorted(flag for flag in machine.cpu_flags() if flag.startswith(ISA_FLAG_PREFIXES)),
        "native_bf16": machine.native_bf16(),
        "onednn_bf16": machine.onednn_bf16(),
        "cpu_description": machine.cpu_description(),
        "cpu_count": os.cpu_count(),
        "num_threads": num_threads,
        "clock": resolve_clock(clock, device, num_threads),
        "load_average": load_average(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        env["transformers_version"] = require_transformers().__version__
    except ImportError:  # not installed (or older than moelab.hf supports)
        env["transformers_version"] = None
    return env
