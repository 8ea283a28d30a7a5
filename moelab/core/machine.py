"""The machine this process runs on: the CPU, read once (model name, the kernels torch picked, cores, whether it
has bfloat16 instructions; figures name it), and the memory free now (`available_memory`, what memory guards size
their budget from)."""

from __future__ import annotations

import functools
import os
import platform

import torch

from .dtypes import parse_dtype


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
    """The CPU's feature flags: /proc/cpuinfo's `flags` (x86) or `Features` (ARM) line; empty where it is missing."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


# bfloat16 dot-product instructions: AVX512_BF16 and AMX on x86, the BF16 extension on ARM
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def native_bf16() -> bool | None:
    """True when the CPU has bfloat16 dot-product instructions (AVX512_BF16, AMX or ARM's BF16), False when its
    flags show none, None where the flags are unknown (no /proc/cpuinfo: torch's `get_cpu_capability` names only
    the vector width, not these). Without them bfloat16 is emulated and its matmuls run slower than float32's."""
    flags = cpu_flags()
    return bool(BF16_FLAGS & flags) if flags else None


def onednn_bf16() -> bool:
    """True when torch hands bfloat16 matmuls to oneDNN (x86 with AVX-512, or ARM with BF16); else torch runs them
    in its own loops, whose speed depends on the operands' layouts (see `bf16_note`)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
                    and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def bf16_emulation_note(onednn: bool | None = None) -> str:
    """The sentence for a CPU without bfloat16 instructions; `onednn`: whether torch ran bf16 matmuls through
    oneDNN there (`onednn_bf16`; None: not known, e.g. an old benchmark record)."""
    # NOTE: measured (one thread, 512x512x1024): oneDNN widens bf16 to float32 inside its kernels, layout-blind;
    # torch's own loops (what an AVX2-only CPU gets) ran 4-9x slower than float32, and another ~10x slower when
    # both operands had the same order (e.g. both row-major: x @ w with w stored [in, out])
    how = {True: "oneDNN widens it to float32 inside its matmuls, which then run slower than float32 ones",
           False: "torch runs its matmuls in its own loops, 4-9x slower than float32, and ~10x slower again for "
                  "some operand layouts (x @ w with w stored [in, out]; moelab's forward passes avoid them)",
           None: "its matmuls run slower than float32 ones (4-9x where torch has no oneDNN kernel for it)"}[onednn]
    return (f"bfloat16 is emulated on this CPU (no AVX512_BF16/AMX instructions): {how}. Time float32, or read "
            "bfloat16 figures as this machine's, not a GPU's or a newer CPU's.")


def bf16_note(dtype) -> str | None:
    """`bf16_emulation_note` for a user timing `dtype` on this CPU; None unless `dtype` is bfloat16 and the CPU
    lacks bfloat16 instructions (unknown flags count as not lacking: nothing is claimed that was not read)."""
    if parse_dtype(dtype) != torch.bfloat16 or native_bf16() is not False:
        return None
    return bf16_emulation_note(onednn_bf16())


def cpu_description() -> str:
    """One line for a figure or a table: model, torch's CPU capability, native bf16 or not, cores."""
    native = native_bf16()
    bf16 = "bf16 support unknown" if native is None else "native bf16" if native else "no native bf16"
    return (f"{cpu_model()}, {torch.backends.cpu.get_cpu_capability()} kernels, {bf16}, "
            f"{os.cpu_count()} cores")


def _read_int(path: str) -> int | None:
    """The integer in a one-line file (cgroup's memory.max), None when missing or 'max' (no limit)."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def cgroup_headroom(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """Bytes this process's memory cgroup may still take (limit - usage), None without a limit.

    cgroup v2 (`memory.max`, `memory.current` of the process's own cgroup, then the root), else v1's
    `memory.limit_in_bytes` - `memory.usage_in_bytes`; v1 writes a huge number for "no limit"."""
    candidates = []
    try:
        with open(proc_cgroup) as f:
            for line in f:
                if line.startswith("0::"):  # the v2 hierarchy
                    candidates.append(root + line.split("::", 1)[1].strip().rstrip("/"))
    except OSError:
        pass
    candidates.append(root)
    for group in candidates:
        limit = _read_int(f"{group}/memory.max")
        if limit is not None:
            return max(0, limit - (_read_int(f"{group}/memory.current") or 0))
    limit = _read_int(f"{root}/memory/memory.limit_in_bytes")
    if limit is not None and limit < 2 ** 60:
        return max(0, limit - (_read_int(f"{root}/memory/memory.usage_in_bytes") or 0))
    return None


def address_space_headroom() -> int | None:
    """Bytes of address space left under `RLIMIT_AS` (`ulimit -v`): the soft limit - VmSize, None without one.
    A big tensor fails there first, however much memory is free."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, ValueError, OSError):
        return None
    if soft == resource.RLIM_INFINITY or soft < 0:
        return None
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return max(0, soft - int(line.split()[1]) * 1024)
    except OSError:
        pass
    return soft


def system_available_memory() -> int:
    """MemAvailable on Linux (the kernel's estimate of what new allocations can take without swapping)."""
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


def available_memory(device="cpu") -> int:
    """Bytes this process can take for new tensors now: on a CPU the least of the system's available memory, the
    cgroup's headroom and the address space left under `ulimit -v`; on CUDA the device's free memory."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    limits = [system_available_memory(), cgroup_headroom(), address_space_headroom()]
    return min(v for v in limits if v is not None)
