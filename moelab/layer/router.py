"""The top-k router (OLMoE / Qwen2-MoE) and the Switch-Transformer load-balancing loss."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
import torch.nn.functional as F

from ..core.config import MoEConfig


class RouterOutput(NamedTuple):
    router_logits: torch.Tensor  # [T, E], input dtype
    router_probs: torch.Tensor  # [T, E], float32 softmax over all experts
    top_k_index: torch.Tensor  # [T, k], int64 expert ids, most probable first
    top_k_weights: torch.Tensor  # [T, k], input dtype (float32 if top_k_weights_float32); renormed if norm_topk_prob


class TopKRouter(nn.Module):
    """Scores every expert for every token and keeps the top k.

    Softmax runs in float32 (bfloat16 probabilities tie and round badly); the kept weights are cast back to the
    input dtype, as OLMoE and Qwen2-MoE do, so the experts see one dtype. With `top_k_weights_float32` they stay
    float32, as Mixtral's do (its experts then weigh and sum the pairs in float32).
    """

    def __init__(self, config: MoEConfig, dtype=None, device=None):
        super().__init__()
        self.top_k = config.top_k
        self.num_experts = config.num_experts
        self.norm_topk_prob = config.norm_topk_prob
        self.top_k_weights_float32 = config.top_k_weights_float32
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size, dtype=dtype, device=device))

    def forward(self, hidden_states: torch.Tensor) -> RouterOutput:
        router_logits = F.linear(hidden_states, self.weight)  # [T, E]
        router_probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)  # [T, E]
        top_k_weights, top_k_index = torch.topk(router_probs, self.top_k, dim=-1)  # [T, k] each
        if self.norm_topk_prob:
            top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
        if not self.top_k_weights_float32:
            top_k_weights = top_k_weights.to(hidden_states.dtype)
        return RouterOutput(router_logits, router_probs, top_k_index, top_k_weights)


def load_balancing_loss(router_output: RouterOutput, num_experts: int | None = None) -> torch.Tensor:
    """Switch-Transformer auxiliary loss: `E * sum_e f_e * P_e`, 1.0 when perfectly balanced.

    f_e is the fraction of the T*k (token, expert) assignments that went to expert e, P_e the mean router
    probability of e. It equals transformers' `load_balancing_loss_func` divided by top_k (there a balanced
    router scores k); differentiable through P_e, so it can be added to a training loss.
    """
    router_probs = router_output.router_probs  # [T, E]
    if num_experts is None:
        num_experts = router_probs.shape[-1]
    if router_probs.shape[-1] != num_experts:
        raise ValueError(f"num_experts={num_experts} but router_probs has {router_probs.shape[-1]} experts")
    top_k_index = router_output.top_k_index  # [T, k]
    assignments = F.one_hot(top_k_index.reshape(-1), num_experts).to(router_probs.dtype)  # [T*k, E]
    fraction_routed = assignments.mean(dim=0)  # [E], sums to 1
    mean_prob = router_probs.reshape(-1, num_experts).mean(dim=0)  # [E], sums to 1
    return num_experts * (fraction_routed * mean_prob).sum()
