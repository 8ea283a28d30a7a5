"""The memory guard: estimate a measurement's memory before running it; over the budget it is skipped, with why.

The estimate is what stays resident (the layer's weights, a transformers copy of them when comparing, the
inputs) plus the analytic peak of extra memory of one call from `moelab.memory.analytic`. With backward, the
autograd graph keeps the forward's intermediates alive and the weights get gradients: we count twice the forward
peak plus one more copy of the weights, a deliberately generous figure.

The guard runs before the routing exists, so a backend whose memory depends on how the pairs spread over the
experts (`ROUTING_DEPENDENT`) is sized for the worst routing (`worst_case_counts`), never for a balanced one:
eager's busiest expert then has all T tokens, and dropless `capacity`'s C (its largest group) is T, a buffer of
E * T rows, E / k times the pairs. `block_aligned` needs no such bound: its buffer has the static S + E * (M - 1) rows.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from .. import memory
from ..memory.estimate import capacity_factor_of
from ..core.machine import available_memory  # noqa: F401  (bytes free now; moelab.bench exports it)
from ..backends.auto import choose
from ..core.registry import ExpertsInterface

DEFAULT_FRACTION = 0.5  # of the memory available when the sweep starts
_UNITS = {"": 1, "b": 1, "k": 2 ** 10, "kb": 10 ** 3, "kib": 2 ** 10, "m": 2 ** 20, "mb": 10 ** 6, "mib": 2 ** 20,
          "g": 2 ** 30, "gb": 10 ** 9, "gib": 2 ** 30, "t": 2 ** 40, "tb": 10 ** 12, "tib": 2 ** 40}


def parse_bytes(text: str) -> int | float:
    """'4GiB' -> 4294967296, '512MB' -> 512000000, '0.5' -> 0.5 (a fraction of the available memory)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"memory budget must look like '8GiB', '512MB', '1e9' or a fraction such as '0.5', "
                         f"got {text!r}")
    value, unit = float(match.group(1)), match.group(2).lower()
    if not unit and "." in match.group(1) and "e" not in match.group(1).lower():
        if value <= 1:
            return value
        # NOTE: '2.0' read as 2 bytes would skip every measurement in silence; say what the point means instead
        raise ValueError(f"memory budget {text!r} is ambiguous: a number with a point and no unit is a fraction of "
                         f"the available memory, in (0, 1]; for bytes give a unit ('{text}GiB') or an integer")
    return int(value * _UNITS[unit])


def resolve_budget(budget=None, device="cpu") -> int:
    """None -> DEFAULT_FRACTION of the available memory; a float in (0, 1] -> that fraction; an int -> bytes."""
    if isinstance(budget, str):
        budget = parse_bytes(budget)
    if budget is None:
        return int(DEFAULT_FRACTION * available_memory(device))
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget < 0 or math.isnan(budget):
        raise ValueError(f"memory_budget must be None, bytes (int >= 0), a fraction in (0, 1] or a string such "
                         f"as '8GiB', got {budget!r}")
    if isinstance(budget, float):
        if not 0 < budget <= 1:
            raise ValueError(f"a float memory_budget is a fraction of the available memory, in (0, 1]; got {budget}")
        return int(budget * available_memory(device))
    return int(budget)


@dataclass(frozen=True)
class Estimate:
    """Bytes a measurement needs: resident (weights, inputs) + extra (the backend's peak); note says how."""

    resident_bytes: int
    extra_bytes: int
    note: str = ""

    @property
    def total_bytes(self) -> int:
        return self.resident_bytes + self.extra_bytes


# the backends whose peak depends on the pairs per expert: eager's per-expert intermediates grow with its busiest
# expert, and the sweep calls `capacity` without a dropped mask, so its C is the largest group (the data's)
ROUTING_DEPENDENT = ("eager", "capacity")


def worst_case_counts(num_tokens: int, top_k: int, num_experts: int) -> tuple[int, ...]:
    """Pairs per expert of the worst routing: every token picks the same k experts, T pairs each (a token's k
    choices are distinct experts, so no expert can get more than T). Sums to T * k, as `memory.analytic` wants."""
    return (num_tokens,) * top_k + (0,) * (num_experts - top_k)


def backend_peak(config, num_tokens: int, backend: str, dtype, *, device="cpu",
                 compiled: bool = False) -> tuple[int, str]:
    """(analytic peak extra bytes of one experts call, how it was estimated)."""
    name = backend
    notes = []
    if backend == "auto":
        drops = capacity_factor_of(config, False) is not None  # as `memory.analytic` models the call
        name, _ = choose(num_tokens * config.top_k, dtype, device, compiled, config.num_experts, drops)
        notes.append(f"auto -> {name}")
    if name in memory.MODELLED_BACKENDS:
        counts = None
        if name in ROUTING_DEPENDENT:  # the routing is not known yet: the worst one, never a balanced guess
            counts = worst_case_counts(num_tokens, config.top_k, config.num_experts)
            notes.append(f"worst-case routing: {config.top_k} expert(s) with all T = {num_tokens} tokens"
                         + (f", so C = {num_tokens}" if name == "capacity" else ""))
        peak = memory.analytic(config, num_tokens, name, dtype, router=False, tokens_per_expert=counts).peak_bytes
        return int(peak), "; ".join(notes)
    registered = ExpertsInterface.memory_estimate(name) if name in ExpertsInterface.names() else None
    if registered is not None:  # a user's backend with its own estimate: asked on meta tensors, nothing allocated
        experts, hidden_states, top_k_index = meta_call(config, num_tokens, dtype)
        return int(registered(experts, hidden_states, top_k_index, None, False)), f"{backend!r}'s registered estimate"
    # NOTE: a user's backend without an estimate could allocate anything: size it as the hungriest built-in
    # (batched_mm's weight copies, eager's worst routing), never as a cheap one, so the guard errs on the safe side
    peak = max(backend_peak(config, num_tokens, b, dtype, device=device)[0] for b in memory.MODELLED_BACKENDS)
    return peak, (f"no memory estimate registered for {backend!r}: sized as the hungriest built-in backend "
                  "(register one: ExpertsInterface.register(..., memory_estimate=fn))")


def meta_call(config, num_tokens: int, dtype):
    """(experts, hidden_states [T, H], top_k_index [T, k]) on the meta device: the shapes of a call, no data."""
    E, H, I, k = config.num_experts, config.hidden_size, config.intermediate_size, config.top_k
    experts = SimpleNamespace(gate_up_proj=torch.empty(E, 2 * I, H, dtype=dtype, device="meta"),
                              down_proj=torch.empty(E, H, I, dtype=dtype, device="meta"), training=False,
                              capacity_factor_for=lambda training: capacity_factor_of(config, training))
    return (experts, torch.empty(num_tokens, H, dtype=dtype, device="meta"),
            torch.empty(num_tokens, k, dtype=torch.int64, device="meta"))


def estimate(config, num_tokens: int, backend: str, dtype, *, device="cpu", compiled: bool = False,
             backward: bool = False, weight_copies: int = 1) -> Estimate:
    """The guard's estimate for one measurement of `backend` (weight_copies: 2 when a transformers copy exists)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    E, H, I, k = config.num_experts, config.hidden_size, config.intermediate_size, config.top_k
    weights = E * 3 * I * H * itemsize
    inputs = num_tokens * H * itemsize + num_tokens * k * (8 + itemsize)
    peak, note = backend_peak(config, num_tokens, backend, dtype, device=device, compiled=compiled)
    extra = peak
    if backward:
        extra = 2 * peak + weights + num_tokens * H * itemsize
    return Estimate(weight_copies * weights + inputs, extra, note)


def dense_estimate(config, num_tokens: int, dtype, backward: bool = False) -> Estimate:
    """The dense limit's matmul pair: inputs [S, H] and [S, I], weights, outputs [S, 2I] and [S, H]."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    S, H, I = num_tokens * config.top_k, config.hidden_size, config.intermediate_size
    resident = (S * (H + I) + 3 * I * H) * itemsize
    extra = S * (2 * I + H) * itemsize
    if backward:
        extra = 2 * extra + resident
    return Estimate(resident, extra, "dense matmul pair")


def check(est: Estimate, budget: int, what: str) -> str | None:
    """None when `est` fits in `budget`, else the reason to record for the skipped measurement."""
    if est.total_bytes <= budget:
        return None
    detail = f" ({est.note})" if est.note else ""
    return (f"memory guard: {what} needs an estimated {memory.format_bytes(est.total_bytes)} "
            f"({memory.format_bytes(est.resident_bytes)} resident + {memory.format_bytes(est.extra_bytes)} peak "
            f"extra{detail}) > budget {memory.format_bytes(budget)}")
