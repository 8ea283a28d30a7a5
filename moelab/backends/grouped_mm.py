"""`grouped_mm`: sort the (token, expert) pairs by expert, then one grouped matmul up and one down.

No weight is copied: after the sort, each expert's pairs are contiguous rows, delimited by `offsets` (the
cumulative tokens per expert), and a single grouped GEMM walks the groups. The cost is a sort and two
permutations of activations. Every step below makes a new tensor and shows it with `record_step`:

    sort -> offsets -> gather -> up_proj -> act -> down_proj -> weigh -> unsort -> reduce

CPU inference runs the same steps with the same values in `moelab.backends.cpu.lean`, overwriting what is dead.
Drop-aware: with a `dropped` mask (capacity) only the kept pairs are sorted and computed; the dropped ones add 0.
"""

import torch

from ..core.steps import record_step
from .cpu import lean
from .grouped_matmul import grouped_linear, matmul_path
from .pairs import expert_offsets, inverse_permutation, sort_by_expert, sum_slots, tokens_per_expert
from .footprint import Saved, call_sizes, existing_weights, with_backward


def grouped_mm_experts(experts, hidden_states, top_k_index, top_k_weights, dropped=None):
    """hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k], dropped None or bool [T, k] -> [T, H]."""
    # NOTE: on CPU, fresh multi-MiB buffers page-fault on every call (glibc mmaps those >= 32 MiB and gives them
    # back on free), so inference, with no autograd graph to keep the intermediates, takes the same steps in place.
    if dropped is None and lean.applies(experts, hidden_states, top_k_weights):
        return lean.lean_grouped_mm(experts, hidden_states, top_k_index, top_k_weights)

    num_tokens, hidden_size = hidden_states.shape
    top_k = top_k_index.shape[-1]
    num_experts = experts.gate_up_proj.shape[0]

    perm, sorted_expert_ids = sort_by_expert(top_k_index, dropped)  # [S], [S] (S_kept rows with drops)
    record_step("sort", "Sort the (token, expert) pairs by expert id so each expert's pairs are contiguous.",
                perm=perm, sorted_expert_ids=sorted_expert_ids, code_path="plain")

    offsets = expert_offsets(sorted_expert_ids, num_experts)  # [E]
    record_step("offsets", "Cumulative pair counts mark where each expert's group of rows ends.", offsets=offsets,
                derived={"tokens_per_expert": lambda: tokens_per_expert(offsets)}, code_path="plain")

    token_idx = perm // top_k  # [S]: pair s belongs to token s // k
    # NOTE: index_select, not hidden_states[token_idx]: same rows, but advanced indexing is ~3x slower on CPU.
    sorted_states = torch.index_select(hidden_states, 0, token_idx)  # [S, H]
    record_step("gather", "Gather the tokens into expert order (activations move, weights stay put).",
                token_idx=token_idx, sorted_states=sorted_states, code_path="plain")

    up_path, up_reason = matmul_path(sorted_states, experts.gate_up_proj)
    gate_up = grouped_linear(sorted_states, experts.gate_up_proj, offsets, up_path)  # [S, 2I]
    record_step("up_proj", "One grouped matmul multiplies each expert's rows by that expert's gate_up_proj.",
                gate_up=gate_up, path=up_path, path_reason=up_reason, code_path="plain")

    gate, up = gate_up.chunk(2, dim=-1)  # [S, I] each
    activated = experts.act_fn(gate) * up  # [S, I]
    record_step("act", "Gate the up projection: act(gate) * up.", activated=activated, code_path="plain")

    down_path, down_reason = matmul_path(activated, experts.down_proj)
    outputs = grouped_linear(activated, experts.down_proj, offsets, down_path)  # [S, H]
    record_step("down_proj", "A second grouped matmul projects each group back down with its expert's down_proj.",
                outputs=outputs, path=down_path, path_reason=down_reason, code_path="plain")

    pair_weights = top_k_weights.reshape(-1).index_select(0, perm).unsqueeze(-1)  # [S, 1], in sorted order
    weighted = outputs * pair_weights  # [S, H]; float32 when the router hands on float32 weights
    record_step("weigh", "Scale each pair's output by its router weight (looked up in sorted order).",
                weighted=weighted, code_path="plain")

    if dropped is None:
        inv_perm = inverse_permutation(perm)  # [S]
        unsorted = torch.index_select(weighted, 0, inv_perm)  # [S, H], back in (token, slot) order
        record_step("unsort", "The inverse permutation puts every pair back in token order.",
                    inv_perm=inv_perm, unsorted=unsorted, code_path="plain")
    else:  # the kept rows go back to their pairs' places; a dropped pair's row stays 0
        unsorted = weighted.new_zeros(num_tokens * top_k, hidden_size).index_copy(0, perm, weighted)  # [S, H]
        record_step("unsort", "The kept pairs go back to their places in token order; dropped pairs add 0.",
                    unsorted=unsorted, code_path="plain")

    final = sum_slots(unsorted.view(num_tokens, top_k, hidden_size))  # [T, H]
    record_step("reduce", "Sum each token's k weighted outputs.", output=final, code_path="plain")
    return final


def grouped_mm_memory(experts, hidden_states, top_k_index, dropped=None, backward=False) -> int:
    """Bytes of grouped_mm's big intermediates (the guard's estimate, `moelab.core.memory_guard`): the sort's
    int64 indices and the [S, ...] rows of the plain path (the CPU fast path makes fewer)."""
    T, k, E, H, I, b = call_sizes(experts, hidden_states, top_k_index)
    S = T * k
    # perm, sorted ids, token ids; sorted rows, gate_up, act(gate) and the product, outputs, weighted, unsorted
    forward = 4 * S * 8 + S * (4 * H + 4 * I) * b + T * H * b
    if not backward:
        return forward
    return with_backward(forward, grouped_mm_saved(T, k, E, H, I, b, hidden_grad=hidden_states.requires_grad),
                         experts, b, S)


def grouped_mm_saved(T, k, E, H, I, b, *, hidden_grad=True, weights_grad=True, w=None) -> list[Saved]:
    """What grouped_mm's plain path keeps for backward (a call with autograd never takes the CPU fast path):
    the sorted rows and activations, the grouped matmuls' offsets and the permutations. `w`: bytes per router
    weight (default b). Dropless; with drops the same list over the kept rows is an upper bound."""
    S, w = T * k, (b if w is None else w)
    saved = []
    if weights_grad:  # index_select keeps its index only where its input needs a gradient
        saved.append(Saved("perm", "[S] int64", S * 8))
    if hidden_grad:
        saved.append(Saved("token_idx", "[S] int64", S * 8))
    saved += [Saved("offsets", "[E] int32", E * 4),
              Saved("sorted_states", "[S, H]", S * H * b),  # the up projection's input, for its weight gradient
              Saved("gate_up", "[S, 2I]", S * 2 * I * b),  # act_fn keeps gate, mul keeps up: views of it
              Saved("act_fn(gate)", "[S, I]", S * I * b),
              Saved("activated", "[S, I]", S * I * b),
              Saved("pair_weights", "[S, 1]", S * w)]  # for the outputs' gradient
    if weights_grad:
        saved.append(Saved("outputs", "[S, H]", S * H * b))
    return saved + [Saved("inv_perm", "[S] int64", S * 8)] + existing_weights(E, H, I, b)
