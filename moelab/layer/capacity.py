"""Expert capacity (GShard, arXiv 2006.16668; Switch Transformer, arXiv 2101.03961): which pairs an expert drops.

With a capacity factor each expert takes at most `C = ceil(capacity_factor * T * k / E)` of the layer's S = T * k
(token, expert) pairs; the rest of its pairs are dropped. T is every token of the call: a [B, L] batch is
flattened to T = B * L first, so capacity is shared over the batch (as in GShard's group and Switch), not
reserved per sequence; a long sequence can take an expert's capacity from the others. A dropped pair keeps its
expert id and gets weight 0 (the router does that): the shapes stay [T, k], and a token whose every pair dropped
passes through the residual.

Two policies choose what an over-full expert keeps:
- "position" (GShard's priority order): every token's first choice before any token's second choice, and within
  one choice earlier tokens first. A late token's second choice is the first to go.
- "probs" (Megatron-Core, DeepSpeed-MoE): the C pairs with the highest router score at that expert.

Both sort once (O(S log S)), with no [S, E] one-hot, so the drop mask costs little beside the experts.
"""

from __future__ import annotations

import torch

from ..backends.capacity import expert_capacity  # the formula lives with the layout that sizes its buffer by it


def rank_within_expert(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """expert_ids [S] in priority order -> rank [S]: how many earlier pairs went to the same expert."""
    order = torch.argsort(expert_ids, stable=True)  # [S]: pairs grouped by expert, priority order kept inside
    tokens_per_expert = torch.bincount(expert_ids, minlength=num_experts)  # [E]
    group_start = torch.cumsum(tokens_per_expert, 0) - tokens_per_expert  # [E]: first sorted row of each expert
    sorted_rank = torch.arange(expert_ids.numel(), device=expert_ids.device) - group_start[expert_ids[order]]
    rank = torch.empty_like(sorted_rank)
    return rank.scatter_(0, order, sorted_rank)  # [S], back in priority order


def drop_by_position(top_k_index: torch.Tensor, capacity: int, num_experts: int) -> torch.Tensor:
    """top_k_index [T, k] -> dropped [T, k]: pairs past each expert's first `capacity` in GShard's order."""
    slot_major = top_k_index.t().reshape(-1)  # [k*T]: all first choices, then all second choices, ...
    rank = rank_within_expert(slot_major, num_experts)  # [k*T]
    return (rank >= capacity).view(top_k_index.shape[1], -1).t()  # [T, k]


def drop_by_probs(top_k_index: torch.Tensor, top_k_scores: torch.Tensor, capacity: int,
                  num_experts: int) -> torch.Tensor:
    """top_k_index, top_k_scores [T, k] -> dropped [T, k]: each expert keeps its `capacity` highest-scored pairs.

    Ties keep GShard's position order, so the two policies agree when every score is equal.
    """
    slot_major = top_k_index.t().reshape(-1)  # [k*T]
    scores = top_k_scores.t().reshape(-1)  # [k*T]
    by_score = torch.argsort(scores, descending=True, stable=True)  # [k*T]: best first, position order on ties
    rank_sorted = rank_within_expert(slot_major[by_score], num_experts)  # rank among the expert's pairs, by score
    rank = torch.empty_like(rank_sorted).scatter_(0, by_score, rank_sorted)  # [k*T], slot-major again
    return (rank >= capacity).view(top_k_index.shape[1], -1).t()  # [T, k]


def drop_pairs(top_k_index: torch.Tensor, top_k_scores: torch.Tensor, capacity_factor: float | None,
               drop_policy: str, num_experts: int) -> torch.Tensor:
    """The drop mask [T, k] of one layer's routing; all False when `capacity_factor` is None (dropless)."""
    if capacity_factor is None:
        return torch.zeros(top_k_index.shape, dtype=torch.bool, device=top_k_index.device)
    num_tokens, top_k = top_k_index.shape
    capacity = expert_capacity(capacity_factor, num_tokens, top_k, num_experts)
    if drop_policy == "position":
        return drop_by_position(top_k_index, capacity, num_experts)
    if drop_policy == "probs":
        return drop_by_probs(top_k_index, top_k_scores, capacity, num_experts)
    raise ValueError(f"drop_policy must be 'position' or 'probs', got {drop_policy!r}")
