"""The (token, expert) pairs in expert order: the small steps both grouped_mm paths share.

A token routed to k experts makes k pairs; pair s is token s // k, slot s % k (the flattened `top_k_index`).
Sorting the pairs by expert makes each expert's pairs contiguous rows; `offsets` marks where each group ends.
"""

import torch


def sort_by_expert(top_k_index, dropped=None):
    """top_k_index [T, k] -> perm [S] (pairs in expert order, stable), sorted_expert_ids [S].

    With `dropped` (bool [T, k]) only the kept pairs: perm [S_kept]. Their number depends on the data (one host
    sync), the price of computing no dropped pair.
    """
    expert_ids = top_k_index.reshape(-1)  # [S]
    if dropped is None:
        perm = torch.argsort(expert_ids, stable=True)  # [S]
        return perm, expert_ids[perm]
    # NOTE: dropped pairs get an id past every expert, so they sort last and the slice cuts them off
    past_every_expert = torch.iinfo(expert_ids.dtype).max
    perm = torch.argsort(expert_ids.masked_fill(dropped.reshape(-1), past_every_expert), stable=True)  # [S]
    perm = perm[: int((~dropped).sum())]  # [S_kept]
    return perm, expert_ids[perm]


def expert_offsets(sorted_expert_ids, num_experts):
    """sorted_expert_ids [S] -> offsets [E] int32: offsets[e] = pairs routed to experts 0..e (group e's end)."""
    expert_range = torch.arange(num_experts, device=sorted_expert_ids.device, dtype=sorted_expert_ids.dtype)
    return torch.searchsorted(sorted_expert_ids, expert_range, right=True).to(torch.int32)  # [E]


def tokens_per_expert(offsets):
    """offsets [E] -> tokens_per_expert [E]: the size of each group (a view for display)."""
    return torch.diff(offsets, prepend=offsets.new_zeros(1))


def inverse_permutation(perm):
    """perm [S] -> inv [S] with inv[perm[i]] = i, so `x_sorted[inv]` restores the original order."""
    inv = torch.empty_like(perm)
    return inv.scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))


def sum_slots(per_token):
    """per_token [T, k, H] -> [T, H]: each token's k weighted outputs summed."""
    top_k = per_token.shape[1]
    if top_k == 2 or (top_k > 2 and torch.compiler.is_compiling()):
        # NOTE: slot by slot, not .sum(dim=1). Eager bf16: the strided reduction is several times slower than one
        # add. Compiled: inductor fuses sum(dim=1) with the unsort gather into a kernel that walks the k rows
        # innermost (16 ms instead of 0.4 ms at T=512, k=8, bf16); a chain of adds compiles to one fast pass.
        final = per_token[:, 0] + per_token[:, 1]
        for slot in range(2, top_k):
            final = final + per_token[:, slot]
        return final
    return per_token.sum(dim=1)
