"""`auto`: pick eager, batched_mm, grouped_mm or capacity per call from the number of (token, expert) pairs S = T * k.

The choice reads the `CrossoverTable` that `moelab.backends.calibration.crossovers()` returns (set by hand,
calibrated for this machine, or the defaults; that module says how a table reads). While `torch.compile` traces,
the "compiled" rules apply, and large CPU inference calls of grouped_mm run as one opaque op
(`moelab.backends.cpu.compiled`).

The choice is visible: each call emits a step `auto` (keys `chosen`, `pairs`, `reason`) before delegating, so
`moelab.inspect` shows it, followed by the chosen backend's own steps.
"""

from __future__ import annotations

import torch

from ..core.registry import ExpertsInterface
from ..core.steps import is_recording, record_step
from .calibration import CrossoverTable, crossovers
from .cpu import compiled as cpu_compiled

_cached_table: CrossoverTable | None = None
_choices: dict = {}  # (pairs, dtype, device type, num_experts, drops) -> (backend, reason), for `_cached_table`


def choose(pairs: int, dtype, device="cpu", compiled: bool | None = None,
           num_experts: int | None = None, drops: bool = False) -> tuple[str, str]:
    """(backend, reason) that `auto` takes for S = `pairs` over `num_experts`; `compiled` defaults to "are we
    being traced"; drops: the call gets a dropped mask (then capacity is not chosen)."""
    if compiled is None:
        compiled = torch.compiler.is_compiling()
    return crossovers().choose(pairs, dtype, device, compiled, num_experts, drops)


def _cached_choice(pairs: int, dtype: torch.dtype, device: torch.device, num_experts: int,
                   drops: bool) -> tuple[str, str]:
    """`choose` for an eager call, cached while the table stays the same object."""
    global _cached_table
    table = crossovers()
    # NOTE: the cache holds the table itself, so a new table (set, used or reloaded) can never hit old answers
    if table is not _cached_table or len(_choices) > 4096:
        _choices.clear()
        _cached_table = table
    key = (pairs, dtype, device.type, num_experts, drops)
    hit = _choices.get(key)
    if hit is None:
        hit = _choices[key] = table.choose(pairs, dtype, device, False, num_experts, drops)
    return hit


def auto_experts(experts, hidden_states, top_k_index, top_k_weights, dropped=None):
    """hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k] -> [T, H], by the backend `choose` names.

    `dropped` (capacity) is handed on to a drop-aware choice; the others compute dropped pairs with weight 0.
    With a `dropped` mask the capacity backend is never the choice (the table's rule says so: `choose`).
    """
    pairs = top_k_index.numel()  # S = T * k
    num_experts = experts.gate_up_proj.shape[0]
    drops = dropped is not None
    if torch.compiler.is_compiling():
        chosen, reason = choose(pairs, hidden_states.dtype, hidden_states.device, True, num_experts, drops)
    else:
        # NOTE: a decode loop asks the same question every step; the answer is cached per table.
        chosen, reason = _cached_choice(pairs, hidden_states.dtype, hidden_states.device, num_experts, drops)
    if is_recording():
        record_step("auto", f"auto picks {chosen} for S = {pairs} (token, expert) pairs over {num_experts} "
                    f"experts: {reason}.", chosen=chosen, pairs=pairs, reason=reason)
    if dropped is not None and ExpertsInterface.accepts_dropped(chosen):
        return ExpertsInterface.get(chosen)(experts, hidden_states, top_k_index, top_k_weights, dropped=dropped)
    if chosen == "grouped_mm" and cpu_compiled.applies(experts, hidden_states, top_k_index, top_k_weights):
        # NOTE: compiled CPU inference with tens of MiB of buffers: the uncompiled lean path, as one opaque op
        # (fullgraph=True still holds), beats the graph's fresh buffers; below that the graph's fused kernels win.
        return cpu_compiled.grouped_mm_lean(experts, hidden_states, top_k_index, top_k_weights)
    return ExpertsInterface.get(chosen)(experts, hidden_states, top_k_index, top_k_weights)
