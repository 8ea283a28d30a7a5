"""The memory guard of a direct call: before an experts backend makes its big intermediates, the bytes it
registered an estimate for are checked against what this process may still take (`machine.available_memory`: the
least of the available memory, the cgroup's headroom and `ulimit -v`'s). Over it, `MemoryGuardError` says which
backend, how much, and what would fit, instead of a crash deep inside torch (or the OOM killer).

Each backend's estimate sits in its own module, beside the algorithm it describes, and is registered with
`ExpertsInterface.register(..., memory_estimate=fn)`; `Experts.forward` (and `auto`, for its choice) call
`check_experts_call` before the backend runs. A backend without an estimate is not guarded.

Off switch: `MOELAB_MEMORY_GUARD=0` in the environment (read at each check), or `set_memory_guard(False)` /
`with memory_guard(False): ...` in code.
"""

from __future__ import annotations

import contextlib
import os

import torch

from .machine import available_memory
from .registry import ExpertsInterface

GUARD_ENV = "MOELAB_MEMORY_GUARD"  # "0", "off", "false" or "no": the guard is off
# NOTE: below this an estimate is not checked: reading the budget (/proc, cgroup files) costs ~0.1 ms, more than a
# small call risks; a decode step must not pay it
MIN_CHECKED_BYTES = 64 * 2 ** 20

_enabled: bool | None = None  # set_memory_guard's setting; None: the environment decides


def format_bytes(num_bytes: float) -> str:
    """1536 -> '1.5 KiB'; binary units, as `torch.cuda.memory_summary` prints them."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def guard_enabled() -> bool:
    """Whether direct calls are checked: `set_memory_guard`'s setting, else `$MOELAB_MEMORY_GUARD` (default on)."""
    if _enabled is not None:
        return _enabled
    return os.environ.get(GUARD_ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def set_memory_guard(enabled: bool | None) -> None:
    """Turn the guard on (True) or off (False) for this process; None: back to `$MOELAB_MEMORY_GUARD`."""
    global _enabled
    if enabled is not None and not isinstance(enabled, bool):
        raise ValueError(f"enabled must be True, False or None, got {enabled!r}")
    _enabled = enabled


@contextlib.contextmanager
def memory_guard(enabled: bool):
    """`with memory_guard(False): ...` runs its body unguarded (True: guarded), then restores the setting."""
    if not isinstance(enabled, bool):
        raise ValueError(f"enabled must be True or False, got {enabled!r}")
    global _enabled
    before, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = before


class MemoryGuardError(MemoryError):
    """A backend call whose estimated intermediates exceed the memory this process may take.

    backend, needed_bytes, budget_bytes, num_tokens; fits: {other backend: its estimate} for those that fit;
    max_tokens: about how many tokens per call `backend` would fit (its estimate grows linearly in T)."""

    def __init__(self, backend: str, needed_bytes: int, budget_bytes: int, num_tokens: int,
                 fits: dict[str, int], max_tokens: int, backward: bool):
        self.backend, self.needed_bytes, self.budget_bytes = backend, needed_bytes, budget_bytes
        self.num_tokens, self.fits, self.max_tokens, self.backward = num_tokens, fits, max_tokens, backward
        options = []
        if fits:
            ranked = sorted(fits.items(), key=lambda item: item[1])
            options.append("use " + ", ".join(f"{other} (about {format_bytes(b)})" for other, b in ranked))
        if max_tokens >= 1:
            options.append(f"split the input into calls of T <= {max_tokens} tokens")
        what = "forward + backward" if backward else "call"
        super().__init__(
            f"experts backend {backend!r} would need about {format_bytes(needed_bytes)} for this {what} "
            f"(T = {num_tokens} tokens) but this process may take {format_bytes(budget_bytes)} now (the least of "
            f"the available memory, the cgroup limit and ulimit -v); "
            + (" or ".join(options) if options else "no backend fits: use fewer tokens per call") +
            f". To run it anyway: {GUARD_ENV}=0 or moelab.set_memory_guard(False).")


def check_experts_call(name: str, experts, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                       dropped: torch.Tensor | None = None, backward: bool = False) -> None:
    """Raise `MemoryGuardError` when backend `name`'s registered estimate of this call exceeds the budget."""
    estimate = ExpertsInterface.memory_estimate(name)
    if estimate is None or torch.compiler.is_compiling() or not guard_enabled():
        return
    needed = int(estimate(experts, hidden_states, top_k_index, dropped, backward))
    if needed < MIN_CHECKED_BYTES:
        return
    budget = available_memory(hidden_states.device)
    if needed <= budget:
        return
    fits = {}
    for other in ExpertsInterface.names():
        other_estimate = ExpertsInterface.memory_estimate(other)
        if other != name and other_estimate is not None:
            other_needed = int(other_estimate(experts, hidden_states, top_k_index, dropped, backward))
            if other_needed <= budget:
                fits[other] = other_needed
    num_tokens = hidden_states.shape[0]
    raise MemoryGuardError(name, needed, budget, num_tokens, fits, int(num_tokens * budget / needed), backward)
