"""The top-k router (OLMoE / Qwen2-MoE / DeepSeek-V3): scores, the top-k choice, the expert bias and the drops."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
import torch.nn.functional as F

from ..core.config import MoEConfig
from .capacity import drop_pairs


class RouterOutput(NamedTuple):
    router_logits: torch.Tensor  # [T, E], input dtype
    router_probs: torch.Tensor  # [T, E], float32 scores the choice is made from: softmax, or sigmoid (no sum to 1)
    top_k_index: torch.Tensor  # [T, k], int64 expert ids, best first (by score + expert_bias when it is on)
    top_k_weights: torch.Tensor  # [T, k], input dtype (float32 if top_k_weights_float32); 0 where dropped
    # [T, k] bool: pairs over their expert's capacity; the router always fills it (all False when dropless), the
    # default None keeps RouterOutputs built by hand with four fields working
    dropped: torch.Tensor | None = None


class TopKRouter(nn.Module):
    """Scores every expert for every token and keeps the top k.

    Scores are computed in float32 (bfloat16 probabilities tie and round badly); the kept weights are cast back to
    the input dtype, as OLMoE and Qwen2-MoE do, so the experts see one dtype. With `top_k_weights_float32` they stay
    float32, as Mixtral's do (its experts then weigh and sum the pairs in float32).

    The training mechanics of `MoEConfig`, each off by default:
    - `router_scoring="sigmoid"`: DeepSeek-V3 (arXiv 2412.19437, eq. 15) scores each expert with its own sigmoid.
    - `router_jitter`: Switch Transformer (arXiv 2101.03961, section 2.4) multiplies the router input by
      U(1 - eps, 1 + eps), in training mode only.
    - `expert_bias`: aux-loss-free balancing (Wang et al., arXiv 2408.15664, eq. 3-4; DeepSeek-V3 eq. 16): a
      float32 buffer `expert_bias [E]` added to the scores for the top-k choice only; the weights come from the
      unbiased scores. `update_expert_bias` moves it after each optimizer step.
    - capacity (`moelab.layer.capacity`): pairs over an expert's capacity get weight 0 and are marked in `dropped`.
      Kept weights are not renormalised.
    """

    def __init__(self, config: MoEConfig, dtype=None, device=None):
        super().__init__()
        self.config = config
        self.top_k = config.top_k
        self.num_experts = config.num_experts
        self.norm_topk_prob = config.norm_topk_prob
        self.top_k_weights_float32 = config.top_k_weights_float32
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size, dtype=dtype, device=device))
        # NOTE: only registered when on, so state dicts (and folders) saved without it still load.
        if config.expert_bias:
            self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32, device=device))
        else:
            self.expert_bias = None

    def _apply(self, fn, recurse=True):
        # NOTE: `.to(bfloat16)` casts every floating buffer; the bias moves by 1e-3 steps, which bfloat16 cannot
        # hold near 1, so it keeps its float32 values and follows only the device.
        bias = self.expert_bias
        super()._apply(fn, recurse)
        if bias is not None and self.expert_bias.dtype != torch.float32:
            self._buffers["expert_bias"] = bias.to(self.expert_bias.device)
        return self

    def scores(self, router_logits: torch.Tensor) -> torch.Tensor:
        """router_logits [T, E] -> float32 scores [T, E]: softmax over experts, or one sigmoid per expert."""
        if self.config.router_scoring == "sigmoid":
            return torch.sigmoid(router_logits.float())
        return torch.softmax(router_logits, dim=-1, dtype=torch.float32)

    def forward(self, hidden_states: torch.Tensor) -> RouterOutput:
        jitter = self.config.router_jitter
        if jitter and self.training:  # Switch: noise on the router input only, the experts see the clean tokens
            hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(1.0 - jitter, 1.0 + jitter)
        router_logits = F.linear(hidden_states, self.weight)  # [T, E]
        router_probs = self.scores(router_logits)  # [T, E]
        if self.expert_bias is None:
            top_k_scores, top_k_index = torch.topk(router_probs, self.top_k, dim=-1)  # [T, k] each
        else:  # the bias picks the experts; the weights stay the unbiased scores
            top_k_index = torch.topk(router_probs + self.expert_bias, self.top_k, dim=-1).indices  # [T, k]
            top_k_scores = router_probs.gather(-1, top_k_index)  # [T, k]
        top_k_weights = top_k_scores
        if self.norm_topk_prob:
            top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
        dropped = drop_pairs(top_k_index, top_k_scores, self.config.capacity_factor_for(self.training),
                             self.config.drop_policy, self.num_experts)  # [T, k]
        if self.has_capacity():
            top_k_weights = top_k_weights.masked_fill(dropped, 0.0)
        if not self.top_k_weights_float32:
            top_k_weights = top_k_weights.to(hidden_states.dtype)
        return RouterOutput(router_logits, router_probs, top_k_index, top_k_weights, dropped)

    def has_capacity(self) -> bool:
        """Whether a forward in the current mode (training or eval) can drop pairs."""
        return self.config.capacity_factor_for(self.training) is not None

    @torch.no_grad()
    def update_expert_bias(self, tokens_per_expert: torch.Tensor) -> None:
        """`expert_bias += rate * sign(mean_load - load)` (arXiv 2408.15664, Algorithm 1): under-loaded experts rise.

        tokens_per_expert [E]: the pairs each expert received since the last update (kept pairs, summed over the
        step's micro-batches). Call it after each optimizer step; `moelab.training.Trainer` does.
        """
        if self.expert_bias is None:
            raise ValueError("this router has no expert_bias; build the layer with MoEConfig(expert_bias=True)")
        if not isinstance(tokens_per_expert, torch.Tensor) or tokens_per_expert.shape != (self.num_experts,):
            got = list(tokens_per_expert.shape) if isinstance(tokens_per_expert, torch.Tensor) else \
                type(tokens_per_expert).__name__
            raise ValueError(f"tokens_per_expert must be a tensor of shape [{self.num_experts}], got {got}")
        load = tokens_per_expert.to(device=self.expert_bias.device, dtype=torch.float32)  # [E]
        self.expert_bias += self.config.expert_bias_update_rate * torch.sign(load.mean() - load)
