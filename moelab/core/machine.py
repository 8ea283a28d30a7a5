"""The machine this process runs on: the CPU, read once (model name, the kernels torch picked, cores; figures name
it), and the memory free now (`available_memory`, what memory guards size their budget from)."""

from __future__ import annotations

import functools
import os
import platform

import torch


@functools.lru_cache(maxsize=None)
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (e.g. 'AMD EPYC 9R45'), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is missing)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16() -> bool:
    """True when the CPU has bfloat16 dot-product instructions (AVX512_BF16 or AMX); without them bf16 GEMMs are
    emulated and run several times slower than float32."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def cpu_description() -> str:
    """One line for a figure or a table: model, torch's CPU capability, native bf16 or not, cores."""
    bf16 = "native bf16" if native_bf16() else "no native bf16"
    return (f"{cpu_model()}, {torch.backends.cpu.get_cpu_capability()} kernels, {bf16}, "
            f"{os.cpu_count()} cores")


def available_memory(device="cpu") -> int:
    """Bytes free for new tensors now: MemAvailable on Linux CPUs, free device memory on CUDA."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
