"""`skewed_routing`: a made-up routing with a chosen skew, from balanced to one hot expert, to feed the experts (and
the layouts' waste) without training a router into that state.

skew s in [0, 1] is the share of tokens whose first choice is forced to the hot expert (id 0); every other choice
is drawn uniformly among the experts the token has not chosen yet. s = 0: every expert gets T*k/E pairs in
expectation; s = 1: expert 0 gets all T tokens (the most any expert can hold, as a token's k choices are
distinct) and the other E - 1 share the T*(k-1) remaining pairs.
"""

from __future__ import annotations

import torch

HOT_EXPERT = 0  # the expert a skewed routing favours


def skewed_routing(num_tokens: int, num_experts: int, top_k: int, skew: float = 0.0, *, seed: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (top_k_index [T, k] int64, top_k_weights [T, k] float32, each row positive, summing to 1, descending).

    Seeded: the same arguments give the same routing on every machine (CPU generator).
    """
    for name, value, low in (("num_tokens", num_tokens, 0), ("num_experts", num_experts, 1), ("top_k", top_k, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if top_k > num_experts:
        raise ValueError(f"top_k ({top_k}) must be at most num_experts ({num_experts}): a token's k experts are distinct")
    if isinstance(skew, bool) or not isinstance(skew, (int, float)) or not 0.0 <= float(skew) <= 1.0:
        raise ValueError(f"skew must be a number in [0, 1] (0: balanced, 1: one hot expert), got {skew!r}")
    generator = torch.Generator().manual_seed(seed)
    # a random order of the experts per token: its first k are the token's choices, uniform and distinct
    order = torch.rand(num_tokens, num_experts, generator=generator).argsort(dim=1)  # [T, E]
    forced = torch.rand(num_tokens, generator=generator) < float(skew)  # [T]: first choice goes to the hot expert
    # a forced token swaps the hot expert to the front of its order, so its other k - 1 choices stay distinct
    hot_at = (order == HOT_EXPERT).int().argmax(dim=1)  # [T]: where the hot expert sits in each order
    rows = torch.nonzero(forced).squeeze(1)
    order[rows, hot_at[rows]] = order[rows, 0]
    order[rows, 0] = HOT_EXPERT
    top_k_index = order[:, :top_k].contiguous()  # [T, k]
    # weights as a router's would be: a softmax over k random logits, largest first
    logits = torch.randn(num_tokens, top_k, generator=generator).sort(dim=1, descending=True).values
    return top_k_index, logits.softmax(dim=1)
