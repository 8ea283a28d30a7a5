"""The steps of one expert-parallel MoE layer as small pure functions: no process group, testable on hand-made counts.

A rank holds the contiguous block of L = E / ep experts `r*L ... (r+1)*L - 1`, so sorting a rank's pairs by expert
id sorts them by destination rank too (rank-major), with the experts of one destination in order inside its block.
What a rank receives is rank-major as well (everything from rank 0, then rank 1, ...); its experts want it
expert-major (every row for local expert 0, from all ranks, then local expert 1, ...). Dimension letters:
    T tokens of this rank    k experts per token    E experts    H hidden size    ep ranks    L = E / ep
    S = T * k pairs          S_kept the pairs sent (not dropped)  N the rows a rank receives
"""

from __future__ import annotations

import torch

from ..backends.pairs import inverse_permutation, sort_by_expert, sum_slots


def tokens_per_expert(top_k_index: torch.Tensor, num_experts: int, dropped: torch.Tensor | None = None) -> torch.Tensor:
    """top_k_index [T, k], dropped None or bool [T, k] -> pairs per expert [E] (kept pairs only: a drop is not sent)."""
    expert_ids = top_k_index.reshape(-1)  # [S]
    if dropped is not None:
        expert_ids = expert_ids[~dropped.reshape(-1)]  # [S_kept]
    return torch.bincount(expert_ids, minlength=num_experts)


def send_counts(counts: torch.Tensor, ep: int) -> torch.Tensor:
    """counts [E] -> pairs sent to each rank [ep]: the sum over each rank's block of E / ep experts."""
    return counts.view(ep, -1).sum(dim=1)


def rank_major_perm(top_k_index: torch.Tensor, dropped: torch.Tensor | None = None) -> torch.Tensor:
    """top_k_index [T, k] -> perm [S_kept]: the flat pair ids (pair s is token s // k) sorted by expert, stable.

    Contiguous expert blocks make this rank-major (by destination) and expert-major inside each destination, so
    the rows go out in the order the counts of `send_counts` describe. Dropped pairs are left out: never sent.
    """
    return sort_by_expert(top_k_index, dropped)[0]  # grouped_mm's sort: on one device it groups, here it routes


def expert_major_perm(received_counts: torch.Tensor) -> torch.Tensor:
    """received_counts [ep, L] (rows source rank i sent for local expert l) -> perm [N], N = received_counts.sum().

    `received[perm]` is expert-major: local expert 0's rows from rank 0, 1, ..., then local expert 1's. Example:
    counts [[2, 3], [1, 4]] -> [0, 1, 5, 2, 3, 4, 6, 7, 8, 9].
    """
    ep, local = received_counts.shape
    blocks = torch.arange(ep * local, device=received_counts.device)  # rank-major block b = i * L + l
    block_of_row = torch.repeat_interleave(blocks, received_counts.reshape(-1))  # [N]
    expert_major_key = (block_of_row % local) * ep + block_of_row // local  # [N]: block l * ep + i
    return torch.argsort(expert_major_key, stable=True)


def local_expert_ids(received_counts: torch.Tensor) -> torch.Tensor:
    """received_counts [ep, L] -> the local expert id of each expert-major row [N]: 0 ... 0, 1 ... 1, ..."""
    local = received_counts.shape[1]
    return torch.repeat_interleave(torch.arange(local, device=received_counts.device), received_counts.sum(dim=0))


def inverse_perm(perm: torch.Tensor) -> torch.Tensor:
    """perm [N] -> inverse [N] with inverse[perm] = arange(N): `x[perm][inverse]` is `x` again."""
    return inverse_permutation(perm)


def unpermute_weigh_sum(pair_outputs: torch.Tensor, perm: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """pair_outputs [S_kept, H] in `perm` order, top_k_weights [T, k] -> output [T, H].

    Unpermute: each row back to its pair's place in a [T * k, H] buffer (a dropped pair's row stays zero). Weigh by
    the router weight of the pair, sum each token's k rows, in slot order as the single-device backends do.
    """
    num_tokens, top_k = top_k_weights.shape
    hidden_size = pair_outputs.shape[-1]
    dtype = torch.promote_types(pair_outputs.dtype, top_k_weights.dtype)  # float32 weights (Mixtral) weigh in float32
    rows = pair_outputs.new_zeros(num_tokens * top_k, hidden_size, dtype=dtype)  # [S, H]
    rows = rows.index_copy(0, perm, pair_outputs.to(dtype))  # [S, H], pair order
    weighted = rows.view(num_tokens, top_k, hidden_size) * top_k_weights.to(dtype).unsqueeze(-1)  # [T, k, H]
    return sum_slots(weighted)  # [T, H]
