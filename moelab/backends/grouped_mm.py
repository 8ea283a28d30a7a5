"""`grouped_mm`: sort the (token, expert) pairs by expert, then one grouped matmul up and one down.

No weight is copied: after the sort, each expert's pairs are contiguous rows, delimited by `offsets` (the
cumulative tokens per expert), and a single grouped GEMM walks the groups. The cost is a sort and two
permutations of activations. The small named steps below can each be tested alone.
"""

import torch

from ..steps import record_step
from .grouped_matmul import grouped_linear, matmul_path


def sort_by_expert(top_k_index):
    """top_k_index [T, k] -> perm [S] (pairs in expert order, stable), sorted_expert_ids [S]."""
    expert_ids = top_k_index.reshape(-1)  # [S]
    perm = torch.argsort(expert_ids, stable=True)  # [S]
    return perm, expert_ids[perm]


def expert_offsets(sorted_expert_ids, num_experts):
    """sorted_expert_ids [S] -> offsets [E] int32: offsets[e] = pairs routed to experts 0..e (group e's end)."""
    expert_range = torch.arange(num_experts, device=sorted_expert_ids.device, dtype=sorted_expert_ids.dtype)
    return torch.searchsorted(sorted_expert_ids, expert_range, right=True).to(torch.int32)  # [E]


def inverse_permutation(perm):
    """perm [S] -> inv [S] with inv[perm[i]] = i, so `x_sorted[inv]` restores the original order."""
    inv = torch.empty_like(perm)
    return inv.scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))


def grouped_mm_experts(experts, hidden_states, top_k_index, top_k_weights):
    """hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k] -> [T, H]."""
    num_tokens, hidden_size = hidden_states.shape
    top_k = top_k_index.shape[-1]
    num_experts = experts.gate_up_proj.shape[0]

    perm, sorted_expert_ids = sort_by_expert(top_k_index)  # [S], [S]
    record_step("sort", "Sort the (token, expert) pairs by expert id so each expert's pairs are contiguous.",
                perm=perm, sorted_expert_ids=sorted_expert_ids)

    offsets = expert_offsets(sorted_expert_ids, num_experts)  # [E]
    record_step("offsets", "Cumulative pair counts mark where each expert's group of rows ends.", offsets=offsets,
                derived={"tokens_per_expert": lambda: torch.diff(offsets, prepend=offsets.new_zeros(1))})

    token_idx = perm // top_k  # [S]: pair s belongs to token s // k
    sorted_states = hidden_states[token_idx]  # [S, H]
    record_step("gather", "Gather the tokens into expert order (activations move, weights stay put).",
                token_idx=token_idx, sorted_states=sorted_states)

    up_path, up_reason = matmul_path(sorted_states, experts.gate_up_proj)
    gate_up = grouped_linear(sorted_states, experts.gate_up_proj, offsets, up_path)  # [S, 2I]
    record_step("up_proj", "One grouped matmul multiplies each expert's rows by that expert's gate_up_proj.",
                gate_up=gate_up, path=up_path, path_reason=up_reason)

    gate, up = gate_up.chunk(2, dim=-1)  # [S, I] each
    activated = experts.act_fn(gate) * up  # [S, I]
    record_step("act", "Gate the up projection: act(gate) * up.", activated=activated)

    down_path, down_reason = matmul_path(activated, experts.down_proj)
    outputs = grouped_linear(activated, experts.down_proj, offsets, down_path)  # [S, H]
    record_step("down_proj", "A second grouped matmul projects each group back down with its expert's down_proj.",
                outputs=outputs, path=down_path, path_reason=down_reason)

    weighted = outputs * top_k_weights.reshape(-1)[perm].unsqueeze(-1)  # [S, H]
    record_step("weigh", "Scale each pair's output by its router weight (looked up in sorted order).",
                weighted=weighted)

    inv_perm = inverse_permutation(perm)  # [S]
    unsorted = weighted[inv_perm]  # [S, H], back in (token, slot) order
    record_step("unsort", "The inverse permutation puts every pair back in token order.",
                inv_perm=inv_perm, unsorted=unsorted)

    final = unsorted.view(num_tokens, top_k, hidden_size).sum(dim=1)  # [T, H]
    record_step("reduce", "Sum each token's k weighted outputs.", output=final)
    return final
