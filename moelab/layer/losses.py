"""The router's auxiliary losses: load balancing (Switch / DeepSeek / global batch) and the router z-loss.

Both read a `RouterOutput`; a model adds them to its LM loss with `MoEModelConfig.router_aux_loss_coef` and
`router_z_loss_coef`. Dimension letters as in `moelab.core`: T tokens, E experts, k top-k, B sequences, S positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .router import RouterOutput

SCOPES = ("batch", "sequence", "global")


def load_balancing_loss(router_output: RouterOutput, num_experts: int | None = None, *, scope: str = "batch",
                        batch_size: int | None = None, ignore_mask: torch.Tensor | None = None,
                        tokens_per_expert: torch.Tensor | None = None) -> torch.Tensor:
    """`E * sum_e f_e * P_e`, 1.0 when perfectly balanced (Switch Transformer, arXiv 2101.03961, eq. 4).

    f_e is the fraction of the (token, expert) pairs routed to expert e (chosen, before any capacity drop, as
    Switch counts them; not differentiable), P_e the mean over tokens of e's score, each token's scores first
    normalised to sum to 1 (a no-op for softmax; for sigmoid scores it is DeepSeek-V3's sequence-wise loss,
    arXiv 2412.19437, eq. 17-20), so a balanced router scores 1.0 either way. Only P_e carries a gradient, to the
    router alone. It equals transformers' `load_balancing_loss_func` divided by top_k (there balance scores k).

    scope: where f and P are counted.
      "batch": over the T tokens of this call (the micro-batch).
      "sequence": per sequence, then averaged (DeepSeek-V2/V3); `batch_size` B splits the T tokens into B
        sequences of T / B, as the model flattened them. At B = 1 it is the batch loss.
      "global": f from `tokens_per_expert` [E], the pairs counted over the whole global batch (every
        gradient-accumulation micro-batch so far, see `GlobalLoad`), P from this call (Qwen, "Demons in the
        Detail", arXiv 2501.11873, eq. 3: balance over the global batch leaves room to specialise).
    ignore_mask: optional bool [T] (or [B, S]); True leaves that token out of f and P (padding, say).
    """
    router_probs = router_output.router_probs  # [T, E]
    top_k_index = router_output.top_k_index  # [T, k]
    if num_experts is None:
        num_experts = router_probs.shape[-1]
    if router_probs.shape[-1] != num_experts:
        raise ValueError(f"num_experts={num_experts} but router_probs has {router_probs.shape[-1]} experts")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {list(SCOPES)}, got {scope!r}")
    num_tokens = router_probs.shape[0]
    keep = torch.ones(num_tokens, dtype=torch.bool, device=router_probs.device)  # [T]
    if ignore_mask is not None:
        if not isinstance(ignore_mask, torch.Tensor) or ignore_mask.dtype != torch.bool \
                or ignore_mask.numel() != num_tokens:
            raise ValueError(f"ignore_mask must be a bool tensor with one entry per token ({num_tokens}), got "
                             f"{getattr(ignore_mask, 'dtype', type(ignore_mask).__name__)} "
                             f"{list(getattr(ignore_mask, 'shape', []))}")
        keep = ~ignore_mask.reshape(-1).to(router_probs.device)
    probs = router_probs / router_probs.sum(dim=-1, keepdim=True)  # [T, E], each token's scores sum to 1
    weight = keep.to(probs.dtype)  # [T]
    # pairs[t, e] = how many of token t's k choices went to expert e (0 for a left-out token)
    pairs = F.one_hot(top_k_index, num_experts).sum(dim=1).to(probs.dtype) * weight[:, None]  # [T, E]
    probs = probs * weight[:, None]  # [T, E]

    if scope == "sequence":
        if batch_size is None or isinstance(batch_size, bool) or not isinstance(batch_size, int) \
                or batch_size < 1 or num_tokens % batch_size:
            raise ValueError(f"scope='sequence' needs batch_size, a positive int dividing the {num_tokens} "
                             f"tokens, got {batch_size!r}")
        pairs = pairs.view(batch_size, -1, num_experts)  # [B, S, E]
        probs = probs.view(batch_size, -1, num_experts)  # [B, S, E]
        kept_tokens = weight.view(batch_size, -1).sum(dim=1)  # [B]
        fraction_routed = pairs.sum(dim=1) / pairs.sum(dim=(1, 2)).clamp_min(1)[:, None]  # [B, E]
        mean_prob = probs.sum(dim=1) / kept_tokens.clamp_min(1)[:, None]  # [B, E]
        per_sequence = num_experts * (fraction_routed * mean_prob).sum(dim=-1)  # [B]
        has_tokens = kept_tokens > 0  # a sequence left out entirely does not count
        return per_sequence[has_tokens].sum() / has_tokens.sum().clamp_min(1)

    kept_tokens = weight.sum().clamp_min(1)
    mean_prob = probs.sum(dim=0) / kept_tokens  # [E], sums to 1
    if scope == "global":
        if not isinstance(tokens_per_expert, torch.Tensor) or tokens_per_expert.shape != (num_experts,):
            raise ValueError(f"scope='global' needs tokens_per_expert, a tensor [{num_experts}] of the pairs "
                             f"counted over the global batch (see moelab.layer.GlobalLoad), got "
                             f"{getattr(tokens_per_expert, 'shape', tokens_per_expert)!r}")
        counts = tokens_per_expert.to(device=probs.device, dtype=probs.dtype)  # [E]
    else:
        counts = pairs.sum(dim=0)  # [E]
    fraction_routed = counts / counts.sum().clamp_min(1)  # [E], sums to 1
    return num_experts * (fraction_routed.detach() * mean_prob).sum()


class GlobalLoad:
    """Pairs per expert, per layer, summed over the micro-batches of one optimizer step (the global batch).

    `add(layer, top_k_index, ignore_mask)` adds one micro-batch's choices and returns the running counts [E], which
    `load_balancing_loss(..., scope="global", tokens_per_expert=...)` takes. Make a new one per optimizer step.
    NOTE: micro-batch i sees the counts of micro-batches 1..i (its backward runs before the later ones exist), the
    running count Megatron-Core's global aux loss uses too; the last micro-batch sees the whole global batch.
    """

    def __init__(self):
        self.tokens_per_expert: dict[int, torch.Tensor] = {}  # layer -> [E]

    @torch.no_grad()
    def add(self, layer: int, top_k_index: torch.Tensor, num_experts: int,
            ignore_mask: torch.Tensor | None = None) -> torch.Tensor:
        expert_ids = top_k_index.reshape(top_k_index.shape[0], -1)  # [T, k]
        if ignore_mask is not None:
            expert_ids = expert_ids[~ignore_mask.reshape(-1)]
        counts = torch.bincount(expert_ids.reshape(-1), minlength=num_experts)  # [E]
        if layer in self.tokens_per_expert:
            counts = counts + self.tokens_per_expert[layer]
        self.tokens_per_expert[layer] = counts
        return counts


def router_z_loss(router_logits: torch.Tensor | RouterOutput, ignore_mask: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Mean over tokens of `logsumexp(router_logits)^2` (ST-MoE, arXiv 2202.08906, eq. 5), in float32.

    It penalises large router logits, which round badly in low precision and make the softmax brittle.
    `ignore_mask` (bool [T], True = leave out) as in `load_balancing_loss`.
    """
    if isinstance(router_logits, RouterOutput):
        router_logits = router_logits.router_logits
    if not isinstance(router_logits, torch.Tensor) or router_logits.dim() < 1:
        raise ValueError(f"router_logits must be a tensor [T, E] (or a RouterOutput), got "
                         f"{type(router_logits).__name__}")
    log_z = torch.logsumexp(router_logits.float().reshape(-1, router_logits.shape[-1]), dim=-1)  # [T]
    if ignore_mask is None:
        return (log_z ** 2).mean()
    keep = ~ignore_mask.reshape(-1).to(log_z.device)  # [T]
    if keep.numel() != log_z.numel():
        raise ValueError(f"ignore_mask must have one entry per token ({log_z.numel()}), got {keep.numel()}")
    return (log_z[keep] ** 2).sum() / keep.sum().clamp_min(1)
