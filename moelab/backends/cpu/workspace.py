"""Reusable scratch buffers for the CPU inference path of `grouped_mm` (`moelab.backends.cpu.lean`).

Why: on CPU, PyTorch allocates with glibc `malloc`. A buffer of 32 MiB or more is always a fresh `mmap`, and
the heap above that is trimmed back to the OS on free, so each call's large intermediates ([S, H], [S, 2I])
are fresh pages: one page fault per 4 KiB page (about 1.7 us each on our VMs, ~27 ms per 64 MiB), paid again
on every call. A per-thread workspace keeps those buffers mapped between calls.

What it costs: the buffers stay allocated after a call (`workspace_bytes()` says how much;
`release_workspace()` frees them). They are used only when nothing can observe the intermediates afterwards:
no autograd graph, no inspection listening, not under `torch.compile` (see `lean.applies`).
"""

from __future__ import annotations

import contextlib
import threading

import torch

# A buffer is taken from the workspace only when it is at least this big: below it glibc's heap reuses freed
# memory anyway, and the fresh allocation is cheap.
MIN_BYTES = 4 * 2 ** 20
# A single call never makes the workspace hold more than this; larger calls allocate fresh tensors.
MAX_BYTES = 2 * 2 ** 30

_local = threading.local()
_enabled = True


def _slots() -> dict:
    slots = getattr(_local, "slots", None)
    if slots is None:
        slots = _local.slots = {}
    return slots


def buffer(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A contiguous [shape] view into this thread's slot `name`, grown when too small (contents undefined)."""
    numel = 1
    for size in shape:
        numel *= size
    key = (name, dtype, device)
    slots = _slots()
    flat = slots.get(key)
    if flat is None or flat.numel() < numel:
        slots.pop(key, None)  # free the old one before the new one is made
        flat = slots[key] = torch.empty(numel, dtype=dtype, device=device)
    return flat[:numel].view(shape)


def fits(nbytes_each: list[int]) -> bool:
    """Whether buffers of these sizes should come from the workspace: big enough to matter, small enough to keep."""
    return _enabled and max(nbytes_each) >= MIN_BYTES and sum(nbytes_each) <= MAX_BYTES


def workspace_bytes() -> int:
    """Bytes this thread's workspace holds now."""
    return sum(t.numel() * t.element_size() for t in _slots().values())


def release_workspace() -> None:
    """Free this thread's workspace (the next large call allocates it again)."""
    _slots().clear()


@contextlib.contextmanager
def use_workspace(enabled: bool = True):
    """Within this block the workspace is used (default) or not: `with use_workspace(False): ...`."""
    global _enabled
    previous, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = previous
