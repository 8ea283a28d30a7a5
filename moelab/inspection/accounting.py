"""Memory accounting of a trace: the bytes each step really allocated, beside the analytic model's bytes.

While recording, every tensor a step records is traced back to its storage; a storage first seen in a call (not
a parameter, not one of the layer's inputs) counts as that step's `new_bytes` (a copy the recorder took counts
where it was taken). Afterwards, a call's sizes (E, H, I, k, tokens, dtype, read from its module when it ran)
and the code path its steps name feed `moelab.memory.analytic`, and `memory_frame` sets the model's steps beside
the recorded ones, matched in order by name. A call that needed gradients also gets the bytes its autograd graph
keeps for backward (`call_saved`, `moelab.memory.saved_for_backward`): what a training step adds to the forward.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd
import torch
from torch import nn

from ..core.stage import stage_label
from ..memory import MODELLED_BACKENDS, MemoryEstimate, SavedForBackward, analytic, saved_for_backward

if TYPE_CHECKING:
    from .records import Call


# ---------------------------------------------------------------------------------------------------- recorded


def _storages(values: Iterable[torch.Tensor]):
    for t in values:
        if t.device.type == "meta" or isinstance(t, nn.Parameter):
            continue
        storage = t.untyped_storage()
        if storage.nbytes():
            yield storage.data_ptr(), storage.nbytes(), t


def seed_inputs(seen: dict, args) -> None:
    """Mark the layer's input tensors as already existing (they are not the call's new memory)."""
    for ptr, _, t in _storages(a for a in args if isinstance(a, torch.Tensor)):
        seen[ptr] = weakref.ref(t)


def new_storage_bytes(seen: dict, values: Iterable[torch.Tensor]) -> int:
    total = 0
    for ptr, nbytes, t in _storages(values):
        ref = seen.get(ptr)
        if ref is None or ref() is None:  # new, or the old owner died and the allocator reused its address
            total += nbytes
            seen[ptr] = weakref.ref(t)
    return total


# ---------------------------------------------------------------------------------------------------- analytic


@dataclass(frozen=True)
class SizesConfig:
    """The part of a MoEConfig the memory model reads, from a call's module."""

    num_experts: int
    hidden_size: int
    intermediate_size: int
    top_k: int
    norm_topk_prob: bool = True
    top_k_weights_float32: bool = False
    shared_expert_intermediate_size: int = 0
    hidden_act: str = "silu"
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    drop_policy: str = "position"

    @classmethod
    def from_sizes(cls, sizes: dict) -> SizesConfig:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in sizes.items() if k in known})


def layer_sizes(module: nn.Module) -> dict | None:
    config = getattr(module, "config", None)
    experts = getattr(module, "experts", module)
    try:
        sizes = {"num_experts": int(experts.num_experts), "hidden_size": int(experts.hidden_size),
                 "intermediate_size": int(experts.intermediate_size)}
    except (AttributeError, TypeError):
        return None
    if config is not None:
        for name in ("norm_topk_prob", "top_k_weights_float32", "shared_expert_intermediate_size", "hidden_act",
                     "capacity_factor", "eval_capacity_factor", "drop_policy"):
            if hasattr(config, name):
                sizes[name] = getattr(config, name)
    return sizes


def _values(tensor) -> list[int] | None:
    """A recorded tensor's values, or None when the trace kept only its shape (`keep_tensors=False`: meta)."""
    if tensor is None or tensor.device.type == "meta":
        return None
    return [int(v) for v in tensor.tolist()]


def call_estimate(call: Call) -> MemoryEstimate | None:
    """The analytic memory model of `call` (None for a backend without one, or unknown sizes).

    What the model needs beyond the sizes comes from the call's steps: eager's pairs per expert (its `expert`
    steps), capacity's C (`positions`, `info["capacity"]`), block_aligned's M (`align`, `info["block_size"]`),
    whether a dropped mask reached the experts (SparseMoE's `route` shows `kept` exactly then; for an `Experts`
    call, grouped_mm's `unsort` without `inv_perm`, or kept counts below T*k) and the kept pairs of grouped_mm.
    An `Experts` call given an all-False mask reads as dropless (the same recorded bytes, a slightly lower peak).
    """
    backend = call.backend
    for step in call.find("auto"):  # `auto` says which backend it delegated to
        backend = step.info.get("chosen", backend)
    if (call.sizes is None or "top_k" not in call.sizes or call.num_tokens is None
            or backend not in MODELLED_BACKENDS):
        return None
    num_experts, pairs = call.sizes["num_experts"], call.num_tokens * call.sizes["top_k"]
    counts = drops = None
    layout = {}  # capacity's C, block_aligned's M: as the call's steps recorded them
    if backend == "eager":
        counts = [0] * num_experts
        for step in call.find("expert"):
            counts[step.info["expert_id"]] = int(step.tensors["token_idx"].shape[0])
    elif backend == "capacity" and call.find("positions"):
        layout["capacity"] = int(call["positions"].info["capacity"])
        counts = _values(call["positions"].tensors.get("tokens_per_expert"))
    elif backend == "block_aligned" and call.find("align"):
        layout["block_size"] = int(call["align"].info["block_size"])
        counts = _values(call["sort"].tensors.get("tokens_per_expert")) if call.find("sort") else None
    elif backend == "grouped_mm" and call.find("sort") and call.find("unsort"):
        if "inv_perm" not in call["unsort"].tensors:  # the drop path unsorts into zeros
            drops = True
            kept = int(call["sort"].tensors["sorted_expert_ids"].shape[0])
            offsets = _values(call["offsets"].tensors.get("offsets")) if call.find("offsets") else None
            # only their sum (the kept pairs) sizes grouped_mm's tensors: without the values, any split of it
            counts = ([b - a for a, b in zip([0] + offsets[:-1], offsets)] if offsets is not None
                      else [kept] + [0] * (num_experts - 1))
    if call.has_router and call.find("route"):
        drops = "kept" in call["route"].tensors
    elif drops is None and counts is not None:
        drops = sum(counts) < pairs
    config = SizesConfig.from_sizes(call.sizes)
    # the mode whose capacity factor matches what the call did (the call does not record its mode)
    training = (config.eval_capacity_factor is None) if drops else (config.eval_capacity_factor is not None)
    code_path = call.code_path if backend == "grouped_mm" else None
    act_in_place = None
    if code_path is not None and call.find("up_proj"):  # the fast path copies gate_up when it activates in place
        act_in_place = "gate_up" in call["up_proj"].copied
    try:
        return analytic(config, call.num_tokens, backend, call.dtype, tokens_per_expert=counts,
                        router=call.has_router, inspected=True, code_path=code_path, act_in_place=act_in_place,
                        training=training, drops=bool(drops), **layout)
    except ValueError:
        return None


def call_saved(call: Call) -> SavedForBackward | None:
    """What `call` kept for backward, by the model, when autograd recorded it: the sizes, routing and layout of its
    memory estimate (`call_estimate`), so both tables describe the same call."""
    if not call.needs_grad:
        return None
    estimate = call.memory_estimate()
    if estimate is None or "Sk" in estimate.sizes:  # no model, or a dropped mask (not modelled for backward)
        return None
    layout = {"capacity": estimate.sizes["C"]} if "C" in estimate.sizes else \
        {"block_size": estimate.sizes["M"]} if "M" in estimate.sizes else {}
    try:
        return saved_for_backward(SizesConfig.from_sizes(call.sizes), call.num_tokens, estimate.backend, call.dtype,
                                  tokens_per_expert=estimate.tokens_per_expert, router=call.has_router,
                                  hidden_grad=call.hidden_grad, weights_grad=call.weights_grad, **layout)
    except ValueError:
        return None


def memory_frame(calls: list[Call]):
    """The table `Trace.memory` returns (its docstring has the columns)."""
    rows, peaks, saved = [], {}, {}
    for call in calls:
        estimate = call.memory_estimate()
        kept = call_saved(call)
        if kept is not None:
            saved[call.index] = kept.saved_bytes
        pairs: dict[int, int] = {}  # trace step index -> model step index, matched in order by name
        recorded_at: dict[int, int] = {}
        if estimate is not None:
            names = [s.step for s in estimate.steps]
            at = 0
            for step in call.steps:  # steps the model does not know (e.g. `auto`) stay unmatched
                if at < len(names) and step.name == names[at]:
                    pairs[step.index] = at
                    at += 1
            if at == len(names):
                peaks[call.index] = estimate.peak_bytes
            else:
                pairs = {}
            for inter in estimate.intermediates if pairs else ():
                if inter.recorded_in is None:
                    continue
                where = inter.step_index
                if names[where] != inter.recorded_in:
                    where = names.index(inter.recorded_in, where)
                recorded_at[where] = recorded_at.get(where, 0) + inter.nbytes
        for step in call.steps:
            row = {"call": call.index, "layer": call.layer, "stage": stage_label(call.stage, call.decode_step),
                   "decode_step": call.decode_step,
                   "backend": call.backend, "index": step.index, "step": step.name,
                   "recorded_bytes": step.new_bytes, "analytic_bytes": float("nan"),
                   "analytic_new_bytes": float("nan"), "analytic_live_bytes": float("nan"),
                   "analytic_peak_bytes": float("nan")}
            if step.index in pairs:
                sm = estimate.steps[pairs[step.index]]
                row.update(analytic_bytes=recorded_at.get(sm.index, 0), analytic_new_bytes=sm.new_bytes,
                           analytic_live_bytes=sm.live_bytes, analytic_peak_bytes=sm.peak_bytes)
            rows.append(row)
    frame = pd.DataFrame(rows, columns=["call", "layer", "stage", "decode_step", "backend", "index", "step",
                                        "recorded_bytes", "analytic_bytes", "analytic_new_bytes",
                                        "analytic_live_bytes", "analytic_peak_bytes"])
    frame.attrs["analytic_peak_bytes"] = peaks
    frame.attrs["saved_for_backward_bytes"] = saved  # only the calls that needed gradients
    return frame
