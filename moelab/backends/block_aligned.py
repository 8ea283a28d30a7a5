"""`block_aligned`: sort the pairs by expert as grouped_mm does, then pad every expert's group to a multiple of M rows.

The layout of vLLM's `moe_align_block_size`, MegaBlocks' blocking and torchtitan's alignment padding for grouped
GEMMs: after the padding every M-row block belongs to exactly one expert, which is what a GPU kernel that tiles
its rows by M needs (and what grouped_mm's 16-byte alignment of group starts asks for). Padding rows hold no pair
(their pair id is the sentinel S, as in vLLM) and stay zero:

    sort -> align -> gather -> up_proj -> act -> down_proj -> combine -> reduce

The buffer has vLLM's static bound of `S + E * (M - 1)` rows, whatever the routing (each group wastes at most
M - 1 rows); the grouped matmul runs over the exact padded size, `sum(ceil(tokens_per_expert / M) * M)`, which the
`align` step shows. On a CPU the padding is pure cost (the matmul has no tiles to fill): the point is the layout.

`block_size` M defaults to `BLOCK_SIZE`; register another with
`ExpertsInterface.register("block_aligned_64", functools.partial(block_aligned_experts, block_size=64),
accepts_dropped=True)`. Drop-aware: a dropped pair sorts last and gets no row.
"""

from __future__ import annotations

import torch

from ..core.steps import record_step
from .grouped_matmul import grouped_linear, matmul_path
from .footprint import Saved, call_sizes, existing_weights, with_backward
from .pairs import sum_slots

BLOCK_SIZE = 16  # M: vLLM's smallest block for its fused MoE kernel; 16 rows of bf16 are 32 bytes, 16-byte aligned


def padded_rows_bound(num_pairs: int, num_experts: int, block_size: int) -> int:
    """The static buffer size S + E * (M - 1): every group padded to M rows wastes at most M - 1."""
    return num_pairs + num_experts * (block_size - 1)


def align_to_blocks(top_k_index, dropped, num_experts, block_size):
    """top_k_index [T, k] -> (buffer_rows [S], padded_offsets [E] int32, tokens_per_expert [E], padded_tokens [E]).

    buffer_rows[s]: the row of pair s in the padded buffer (the spare row R = S + E * (M - 1) when it dropped);
    padded_offsets: cumulative padded group ends, a multiple of M each.
    """
    keys = top_k_index.reshape(-1)  # [S]
    num_pairs = keys.numel()
    if dropped is not None:
        keys = keys.masked_fill(dropped.reshape(-1), num_experts)  # dropped pairs sort after every expert
    perm = torch.argsort(keys, stable=True)  # [S]: expert-major, token order inside each expert
    sorted_keys = keys[perm]  # [S]
    group_ids = torch.arange(num_experts + 1, device=keys.device, dtype=keys.dtype)  # [E + 1]
    group_end = torch.searchsorted(sorted_keys, group_ids, right=True)  # [E + 1]
    counts = torch.diff(group_end, prepend=group_end.new_zeros(1))  # [E + 1]; the last: dropped pairs
    tokens_per_expert = counts[:num_experts]  # [E]
    padded_tokens = (tokens_per_expert + block_size - 1) // block_size * block_size  # [E]: up to a multiple of M
    padded_end = torch.cumsum(padded_tokens, 0)  # [E]
    # the row of sorted pair i: its group's padded start plus its place in the group; dropped -> the spare row
    padded_start = torch.cat([padded_end.new_zeros(1), padded_end])  # [E + 1]; entry E unused but for indexing
    group_start = group_end - counts  # [E + 1]
    sorted_rows = padded_start[sorted_keys] + torch.arange(num_pairs, device=keys.device) - group_start[sorted_keys]
    spare_row = padded_rows_bound(num_pairs, num_experts, block_size)
    sorted_rows = sorted_rows.masked_fill(sorted_keys == num_experts, spare_row)  # [S]
    buffer_rows = torch.empty_like(sorted_rows).scatter_(0, perm, sorted_rows)  # [S], in pair order
    return buffer_rows, padded_end.to(torch.int32), tokens_per_expert, padded_tokens


def block_aligned_experts(experts, hidden_states, top_k_index, top_k_weights, dropped=None, block_size=BLOCK_SIZE):
    """hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k], dropped None or bool [T, k] -> [T, H]."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1 (rows per block, M), got {block_size!r}")
    num_tokens, hidden_size = hidden_states.shape
    top_k = top_k_index.shape[-1]
    num_experts = experts.gate_up_proj.shape[0]
    num_pairs = num_tokens * top_k  # S

    buffer_rows, padded_offsets, tokens_per_expert, padded_tokens = align_to_blocks(
        top_k_index, dropped, num_experts, block_size)  # [S], [E], [E], [E]
    bound = padded_rows_bound(num_pairs, num_experts, block_size)  # R = S + E * (M - 1)
    record_step("sort", "Sort the pairs by expert (dropped pairs last, given no row), as grouped_mm does.",
                tokens_per_expert=tokens_per_expert)

    # vLLM's outputs: the pair in each row (sentinel S for padding) and the expert of each M-row block
    sorted_pair_ids = torch.full((bound + 1,), num_pairs, dtype=torch.long, device=buffer_rows.device)
    sorted_pair_ids.scatter_(0, buffer_rows, torch.arange(num_pairs, device=buffer_rows.device))
    sorted_pair_ids = sorted_pair_ids[:bound]  # [R]
    block_starts = torch.arange(0, bound, block_size, device=buffer_rows.device)  # [ceil(R / M)]
    block_expert_ids = torch.searchsorted(padded_offsets.long(), block_starts, right=True)  # E: past the used rows
    record_step("align", lambda: f"Pad each expert's group up to a multiple of M = {block_size} rows, so every "
                "block of M rows belongs to one expert; padding rows hold the sentinel pair id S.",
                padded_tokens_per_expert=padded_tokens, padded_offsets=padded_offsets, buffer_rows=buffer_rows,
                sorted_pair_ids=sorted_pair_ids, block_expert_ids=block_expert_ids, block_size=block_size,
                derived={"padding_per_expert": lambda: padded_tokens - tokens_per_expert})

    pair_states = hidden_states.repeat_interleave(top_k, dim=0)  # [S, H]: pair s is token s // k
    buffer = hidden_states.new_zeros(bound + 1, hidden_size).index_copy(0, buffer_rows, pair_states)
    padded_states = buffer[:bound]  # [R, H]; rows past padded_offsets[-1] belong to no group
    record_step("gather", "Write each pair's token into its row of the padded buffer; padding rows stay zero.",
                padded_states=padded_states)

    up_path, up_reason = matmul_path(padded_states, experts.gate_up_proj)
    gate_up = grouped_linear(padded_states, experts.gate_up_proj, padded_offsets, up_path)  # [R, 2I]
    record_step("up_proj", "One grouped matmul over the padded groups: each expert's rows times its gate_up_proj.",
                gate_up=gate_up, path=up_path, path_reason=up_reason)

    gate, up = gate_up.chunk(2, dim=-1)  # [R, I] each
    activated = experts.act_fn(gate) * up  # [R, I]
    record_step("act", "Gate the up projection: act(gate) * up.", activated=activated)

    down_path, down_reason = matmul_path(activated, experts.down_proj)
    outputs = grouped_linear(activated, experts.down_proj, padded_offsets, down_path)  # [R, H]
    record_step("down_proj", "A second grouped matmul projects each padded group back down.", outputs=outputs,
                path=down_path, path_reason=down_reason)

    # NOTE: rows past the last offset are not computed (the native kernel leaves them unset): only pair rows and
    # the zero spare row are read back
    rows_out = torch.cat([outputs, outputs.new_zeros(1, hidden_size)])  # [R + 1, H]
    pair_outputs = rows_out.index_select(0, buffer_rows) * top_k_weights.reshape(-1, 1)  # [S, H]
    record_step("combine", "Read every pair's row back (the padding is left behind) and scale it by its router "
                "weight.", pair_outputs=pair_outputs)

    final = sum_slots(pair_outputs.view(num_tokens, top_k, hidden_size))  # [T, H]
    record_step("reduce", "Sum each token's k weighted outputs.", output=final)
    return final


def block_aligned_memory(experts, hidden_states, top_k_index, dropped=None, backward=False,
                         block_size=BLOCK_SIZE) -> int:
    """Bytes of block_aligned's big intermediates (the guard's estimate, `moelab.core.memory_guard`): the static
    buffer of R = S + E * (M - 1) rows and its activations, plus the sort's int64 indices."""
    T, k, E, H, I, b = call_sizes(experts, hidden_states, top_k_index)
    S = T * k
    rows = padded_rows_bound(S, E, block_size) + 1  # with the spare row
    # buffer, gate_up, act(gate) and the product, outputs, their rows with the spare; pair rows in and out
    forward = rows * (4 * H + 4 * I) * b + S * (2 * H * b + 6 * 8) + T * H * b
    if not backward:
        return forward
    saved = block_aligned_saved(T, k, E, H, I, b, block_size=block_size, hidden_grad=hidden_states.requires_grad)
    return with_backward(forward, saved, experts, b, rows)


def block_aligned_saved(T, k, E, H, I, b, *, block_size=BLOCK_SIZE, hidden_grad=True, weights_grad=True,
                        w=None) -> list[Saved]:
    """What block_aligned's autograd graph keeps for backward: the padded buffer of R = S + E * (M - 1) rows
    (its static bound, whatever the routing) and its activations. `w`: bytes per router weight (default b)."""
    S, w = T * k, (b if w is None else w)
    R = padded_rows_bound(S, E, block_size)
    saved = [Saved("buffer_rows", "[S] int64", S * 8)]  # gather's and combine's index
    if hidden_grad:  # index_copy keeps its source where the source needs a gradient
        saved.append(Saved("pair_states", "[S, H]", S * H * b))
    saved += [Saved("padded_offsets", "[E] int32", E * 4),
              Saved("buffer", "[R+1, H]", (R + 1) * H * b),  # padded_states is a view of it
              Saved("gate_up", "[R, 2I]", R * 2 * I * b),
              Saved("act_fn(gate)", "[R, I]", R * I * b),
              Saved("activated", "[R, I]", R * I * b)]
    if weights_grad:  # the pairs' rows, read back out of the buffer, for the router weights' gradient
        saved.append(Saved("pair rows (before weighting)", "[S, H]", S * H * b))
    return saved + existing_weights(E, H, I, b) + [Saved("top_k_weights", "[T, k]", T * k * w, existing=True)]
