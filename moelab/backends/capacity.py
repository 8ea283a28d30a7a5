"""`capacity`: every expert gets exactly C rows of one static [E, C, H] buffer, then one batched matmul over E.

The layout of GShard, Switch Transformer, DeepSpeed-MoE and fairseq. Each kept (token, expert) pair is written
to row `slot` of its expert's C rows (its place among that expert's pairs, in token order); rows nobody fills
stay zero (padding). One `torch.bmm` runs the E experts at once, reading the weights in place (a transposed view,
no copy), and the combine reads every pair's row back and weighs it:

    positions -> dispatch -> up_proj -> act -> down_proj -> combine -> reduce

FLOPs and memory grow with E * C, not with the S = T * k pairs; with a capacity factor every shape is static
(friendly to `torch.compile(fullgraph=True)`, CUDA graphs and export).

C (`buffer_capacity`):
- the layer has a capacity factor in this mode: `C = min(ceil(capacity_factor * T * k / E), T)` (`expert_capacity`;
  no expert can hold more than T pairs, as the k choices of a token are distinct experts). The router's drops
  guarantee the kept pairs fit; a direct call whose groups do not fit raises (outside torch.compile, where the
  check would need the data).
- dropless: the largest group, `max(tokens_per_expert)`. Exact, but it depends on the data: one host sync per
  call, and under torch.compile a data-dependent shape (a graph break, or with `fullgraph=True` an error), which
  is why compiled runs of this backend want a capacity factor. With one hot expert C reaches T, and the buffer
  E * T rows: E / k times the rows of the pairs themselves.

Drop-aware: a dropped pair gets no row (it points at one spare row past the buffer that is never computed).
"""

from __future__ import annotations

import math

import torch

from ..core.steps import record_step
from ..core.memory_guard import MIN_CHECKED_BYTES
from .footprint import Saved, call_sizes, existing_weights, with_backward
from .pairs import sum_slots


def expert_capacity(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int:
    """C = ceil(capacity_factor * T * k / E): the pairs each expert keeps at most (GShard, Switch eq. 3)."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def slot_in_expert(top_k_index, dropped, num_experts):
    """top_k_index [T, k], dropped None or bool [T, k] -> (slot [T, k], tokens_per_expert [E]).

    slot[t, j]: how many kept pairs before pair (t, j) in token order went to the same expert. Static shapes: the
    pairs are sorted with the dropped ones last (key E), never sliced.
    """
    keys = top_k_index.reshape(-1)  # [S]
    if dropped is not None:
        keys = keys.masked_fill(dropped.reshape(-1), num_experts)  # dropped pairs sort after every expert
    perm = torch.argsort(keys, stable=True)  # [S]: expert-major, token order inside each expert
    sorted_keys = keys[perm]  # [S]
    group_ids = torch.arange(num_experts + 1, device=keys.device, dtype=keys.dtype)  # [E + 1]
    group_end = torch.searchsorted(sorted_keys, group_ids, right=True)  # [E + 1]
    tokens_per_expert = torch.diff(group_end[:num_experts], prepend=group_end.new_zeros(1))  # [E], kept pairs
    group_start = group_end - torch.diff(group_end, prepend=group_end.new_zeros(1))  # [E + 1]
    sorted_slot = torch.arange(keys.numel(), device=keys.device) - group_start[sorted_keys]  # [S]
    slot = torch.empty_like(sorted_slot).scatter_(0, perm, sorted_slot)  # [S], back in pair order
    return slot.view(top_k_index.shape), tokens_per_expert


def buffer_capacity(experts, num_tokens, top_k, tokens_per_expert, dropped) -> int:
    """C of this call: from the layer's capacity factor when pairs can drop, else the largest group (see above)."""
    num_experts = tokens_per_expert.shape[0]
    capacity_factor_for = getattr(experts, "capacity_factor_for", None)
    factor = capacity_factor_for(experts.training) if (dropped is not None and capacity_factor_for) else None
    if factor is None:
        return int(tokens_per_expert.max()) if tokens_per_expert.numel() else 0  # NOTE: the host sync of dropless
    capacity = min(expert_capacity(factor, num_tokens, top_k, num_experts), num_tokens)
    if not torch.compiler.is_compiling():
        largest = int(tokens_per_expert.max())
        if largest > capacity:
            raise ValueError(f"an expert has {largest} kept pairs but the capacity is C = {capacity} "
                             f"(capacity_factor = {factor}, T = {num_tokens}, k = {top_k}, E = {num_experts}); "
                             f"pass the router's dropped mask, which keeps at most C pairs per expert")
    return capacity


def capacity_experts(experts, hidden_states, top_k_index, top_k_weights, dropped=None):
    """hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k], dropped None or bool [T, k] -> [T, H]."""
    num_tokens, hidden_size = hidden_states.shape
    top_k = top_k_index.shape[-1]
    num_experts = experts.gate_up_proj.shape[0]

    slot, tokens_per_expert = slot_in_expert(top_k_index, dropped, num_experts)  # [T, k], [E]
    capacity = buffer_capacity(experts, num_tokens, top_k, tokens_per_expert, dropped)  # C
    spare_row = num_experts * capacity  # where a dropped pair points: one row past the buffer
    buffer_rows = top_k_index * capacity + slot  # [T, k]: row e * C + slot of the flat [E * C] buffer
    if dropped is not None:
        buffer_rows = buffer_rows.masked_fill(dropped, spare_row)
    record_step("positions", lambda: f"Each kept pair gets a row of its expert's C = {capacity} rows: its place "
                "among the expert's pairs, in token order.", slot=slot, buffer_rows=buffer_rows, capacity=capacity,
                tokens_per_expert=tokens_per_expert)

    pair_states = hidden_states.repeat_interleave(top_k, dim=0)  # [S, H]: pair s is token s // k
    flat_rows = buffer_rows.reshape(-1)  # [S]
    buffer = hidden_states.new_zeros(spare_row + 1, hidden_size).index_copy(0, flat_rows, pair_states)
    expert_inputs = buffer[:spare_row].view(num_experts, capacity, hidden_size)  # [E, C, H]
    padding = torch.arange(capacity, device=slot.device) >= tokens_per_expert[:, None]  # [E, C]: rows left empty
    record_step("dispatch", "Write the pairs into the static [E, C, H] buffer; unfilled rows are zero padding.",
                expert_inputs=expert_inputs, padding=padding)

    # NOTE: the transposes are views of the parameters: bmm reads the weights in place, it copies none
    gate_up = torch.bmm(expert_inputs, experts.gate_up_proj.transpose(1, 2))  # [E, C, 2I]
    record_step("up_proj", "One batched matmul: each expert's C rows times its gate_up_proj (weights in place).",
                gate_up=gate_up)

    gate, up = gate_up.chunk(2, dim=-1)  # [E, C, I] each
    activated = experts.act_fn(gate) * up  # [E, C, I]
    record_step("act", "Gate the up projection: act(gate) * up.", activated=activated)

    expert_outputs = torch.bmm(activated, experts.down_proj.transpose(1, 2))  # [E, C, H]
    record_step("down_proj", "A second batched matmul projects every expert's rows back down.",
                expert_outputs=expert_outputs)

    # the spare row reads as zeros, so a dropped pair contributes nothing
    rows_out = torch.cat([expert_outputs.reshape(spare_row, hidden_size), expert_outputs.new_zeros(1, hidden_size)])
    pair_outputs = rows_out.index_select(0, flat_rows) * top_k_weights.reshape(-1, 1)  # [S, H]
    record_step("combine", "Read every pair's row back out of the buffer and scale it by its router weight.",
                pair_outputs=pair_outputs)

    final = sum_slots(pair_outputs.view(num_tokens, top_k, hidden_size))  # [T, H]
    record_step("reduce", "Sum each token's k weighted outputs.", output=final)
    return final


def capacity_memory(experts, hidden_states, top_k_index, dropped=None, backward=False) -> int:
    """Bytes of capacity's big intermediates (the guard's estimate, `moelab.core.memory_guard`): the [E, C, ...]
    buffer and its activations, plus the [S, ...] pair rows. Dropless, C is the largest group: bounded by T, and
    counted from the data only when that bound would be checked (a bincount, cheaper than the call)."""
    T, k, E, H, I, b = call_sizes(experts, hidden_states, top_k_index)
    S = T * k

    def total(capacity: int) -> int:
        rows = E * capacity + 1  # the buffer and its spare row
        forward = rows * (3 * H + 4 * I) * b + S * (2 * H * b + 4 * 8) + T * H * b
        if not backward:
            return forward
        saved = capacity_saved(T, k, E, H, I, b, capacity=capacity, hidden_grad=hidden_states.requires_grad)
        return with_backward(forward, saved, experts, b, rows, gradient_copies=2)

    factor = experts.capacity_factor_for(experts.training) if hasattr(experts, "capacity_factor_for") else None
    if dropped is not None and factor is not None:
        return total(min(expert_capacity(factor, T, k, E), T))
    bound = total(T)
    if bound < MIN_CHECKED_BYTES or top_k_index.device.type == "meta" or not top_k_index.numel():
        return bound
    counts = torch.bincount(top_k_index.reshape(-1), minlength=E)  # [E]
    return total(int(counts.max()))


def capacity_saved(T, k, E, H, I, b, *, capacity, hidden_grad=True, weights_grad=True, w=None) -> list[Saved]:
    """What capacity's autograd graph keeps for backward: the whole [E, C, ...] buffer and its activations,
    padding rows included (`capacity`: C). `w`: bytes per router weight (default b)."""
    S, w, rows = T * k, (b if w is None else w), E * capacity
    saved = [Saved("buffer_rows", "[T, k] int64", S * 8)]  # dispatch's and combine's index
    if hidden_grad:  # index_copy keeps its source where the source needs a gradient
        saved.append(Saved("pair_states", "[S, H]", S * H * b))
    saved += [Saved("buffer", "[E*C+1, H]", (rows + 1) * H * b),  # expert_inputs is a view of it
              Saved("gate_up", "[E, C, 2I]", rows * 2 * I * b),
              Saved("act_fn(gate)", "[E, C, I]", rows * I * b),
              Saved("activated", "[E, C, I]", rows * I * b)]
    if weights_grad:  # the pairs' rows, read back out of the buffer, for the router weights' gradient
        saved.append(Saved("pair rows (before weighting)", "[S, H]", S * H * b))
    return saved + existing_weights(E, H, I, b) + [Saved("top_k_weights", "[T, k]", T * k * w, existing=True)]
