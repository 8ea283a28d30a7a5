"""`auto`: pick eager, batched_mm, grouped_mm or capacity per call from the number of (token, expert) pairs S = T * k.

The choice reads the `CrossoverTable` that `moelab.backends.calibration.crossovers()` returns (set by hand,
calibrated for this machine, or the defaults; that module says how a table reads). While `torch.compile` traces,
the "compiled" rules apply, and large CPU inference calls of grouped_mm run as one opaque op
(`moelab.backends.cpu.compiled`). An uncompiled call that needs gradients (`needs_autograd`: grad enabled and an
input or an expert weight requires grad, whatever `module.training` says) reads the "backward" rules, measured
forward + backward; any other call the "eager" ones.

The choice is visible: each call emits a step `auto` (keys `chosen`, `pairs`, `mode`, `reason`) before
delegating, so `moelab.inspect` shows it, followed by the chosen backend's own steps.
"""

from __future__ import annotations

import torch

from ..core.memory_guard import check_experts_call
from ..core.registry import ExpertsInterface
from ..core.steps import is_recording, record_step
from .autograd import needs_autograd
from .calibration import CrossoverTable, call_mode, crossovers
from .cpu import compiled as cpu_compiled

_cached_table: CrossoverTable | None = None
# (pairs, dtype, device type, num_experts, drops, backward) -> (backend, reason), for `_cached_table`
_choices: dict = {}


def choose(pairs: int, dtype, device="cpu", compiled: bool | None = None,
           num_experts: int | None = None, drops: bool = False, backward: bool = False) -> tuple[str, str]:
    """(backend, reason) that `auto` takes for S = `pairs` over `num_experts`; `compiled` defaults to "are we
    being traced"; drops: the call gets a dropped mask (then capacity is not chosen); backward: the call needs
    gradients (the "backward" rules, unless compiled)."""
    if compiled is None:
        compiled = torch.compiler.is_compiling()
    return crossovers().choose(pairs, dtype, device, compiled, num_experts, drops, backward)


def _cached_choice(pairs: int, dtype: torch.dtype, device: torch.device, num_experts: int,
                   drops: bool, backward: bool) -> tuple[str, str]:
    """`choose` for an eager call, cached while the table stays the same object."""
    global _cached_table
    table = crossovers()
    # NOTE: the cache holds the table itself, so a new table (set, used or reloaded) can never hit old answers
    if table is not _cached_table or len(_choices) > 4096:
        _choices.clear()
        _cached_table = table
    key = (pairs, dtype, device.type, num_experts, drops, backward)
    hit = _choices.get(key)
    if hit is None:
        hit = _choices[key] = table.choose(pairs, dtype, device, False, num_experts, drops, backward)
    return hit


def auto_experts(experts, hidden_states, top_k_index, top_k_weights, dropped=None):
    """hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k] -> [T, H], by the backend `choose` names.

    `dropped` (capacity) is handed on to a drop-aware choice; the others compute dropped pairs with weight 0.
    With a `dropped` mask the capacity backend is never the choice (the table's rule says so: `choose`).
    A call that needs gradients reads the "backward" rules (compiled calls keep the "compiled" ones).
    """
    pairs = top_k_index.numel()  # S = T * k
    num_experts = experts.gate_up_proj.shape[0]
    drops = dropped is not None
    compiling = torch.compiler.is_compiling()
    backward = not compiling and needs_autograd(experts, hidden_states, top_k_weights)
    if compiling:
        chosen, reason = choose(pairs, hidden_states.dtype, hidden_states.device, True, num_experts, drops)
    else:
        # NOTE: a decode loop asks the same question every step; the answer is cached per table.
        chosen, reason = _cached_choice(pairs, hidden_states.dtype, hidden_states.device, num_experts, drops,
                                        backward)
    if is_recording():
        mode = call_mode(compiling, backward)
        record_step("auto", f"auto picks {chosen} for S = {pairs} (token, expert) pairs over {num_experts} "
                    f"experts by the {mode} rules: {reason}.", chosen=chosen, pairs=pairs, mode=mode,
                    reason=reason)
    check_experts_call(chosen, experts, hidden_states, top_k_index, dropped, backward)  # the memory guard
    if dropped is not None and ExpertsInterface.accepts_dropped(chosen):
        return ExpertsInterface.get(chosen)(experts, hidden_states, top_k_index, top_k_weights, dropped=dropped)
    if chosen == "grouped_mm" and cpu_compiled.applies(experts, hidden_states, top_k_index, top_k_weights):
        # NOTE: compiled CPU inference with tens of MiB of buffers: the uncompiled lean path, as one opaque op
        # (fullgraph=True still holds), beats the graph's fresh buffers; below that the graph's fused kernels win.
        return cpu_compiled.grouped_mm_lean(experts, hidden_states, top_k_index, top_k_weights)
    return ExpertsInterface.get(chosen)(experts, hidden_states, top_k_index, top_k_weights)
