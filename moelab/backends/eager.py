"""`eager`: loop over the experts that received tokens; the readable reference.

For each hit expert: find its (token, slot) pairs in the expert mask, gather those tokens, run the expert's
gated MLP on them (two small matmuls), weight by the router and add back into the tokens' rows.
The loop length depends on the data (which experts were hit), so `torch.compile(fullgraph=True)` cannot
capture it, as the transformers reference documents. Drop-aware: a pair marked in `dropped` (capacity) is taken out
of the mask, so no expert computes it.
"""

import torch
import torch.nn.functional as F

from ..core.steps import is_recording, record_step
from .autograd import needs_autograd
from .footprint import Saved, call_sizes, existing_weights, with_backward


def eager_experts(experts, hidden_states, top_k_index, top_k_weights, dropped=None):
    """hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k], dropped None or bool [T, k] -> [T, H]."""
    num_experts = experts.gate_up_proj.shape[0]
    final = torch.zeros_like(hidden_states)  # [T, H]

    # expert_mask[e, j, t] = 1 when token t sent its j-th choice to expert e
    expert_mask = F.one_hot(top_k_index, num_experts).permute(2, 1, 0)  # [E, k, T]
    if dropped is not None:
        expert_mask = expert_mask.masked_fill(dropped.t(), 0)  # a dropped pair belongs to no expert
    # NOTE: nonzero + tolist sync with the host and make the loop data-dependent: this is what breaks fullgraph.
    expert_hit = (expert_mask.sum(dim=(1, 2)) > 0).nonzero().flatten()  # [n_hit]
    record_step("expert_mask", "One-hot the routing into an [E, k, T] mask and list the experts that got tokens.",
                expert_mask=expert_mask, expert_hit=expert_hit)

    recording = is_recording()  # NOTE: checked once: the per-expert step would otherwise cost a call per expert
    # NOTE: unbind once rather than index gate_up_proj[e] per expert: under autograd each indexed slice's backward
    # is a zero tensor the size of the whole parameter, so E slices would move O(E^2) bytes; unbind's backward
    # stacks the E gradients once. Without autograd the views cost microseconds.
    gate_up_proj, down_proj = experts.gate_up_proj.unbind(0), experts.down_proj.unbind(0)  # E x [2I, H], [H, I]
    for expert_id in expert_hit.tolist():
        top_k_pos, token_idx = torch.where(expert_mask[expert_id])  # [n], [n]: slot and token of each pair
        tokens = hidden_states.index_select(0, token_idx)  # [n, H]: hidden_states[token_idx], a faster kernel
        gate, up = F.linear(tokens, gate_up_proj[expert_id]).chunk(2, dim=-1)  # [n, I] each
        outputs = F.linear(experts.act_fn(gate) * up, down_proj[expert_id])  # [n, H]
        outputs = outputs * top_k_weights[token_idx, top_k_pos, None]  # [n, H]
        if recording:
            record_step("expert",
                        f"Expert {expert_id} runs its gated MLP on the {len(token_idx)} tokens routed to it.",
                        expert_id=expert_id, token_idx=token_idx, top_k_pos=top_k_pos, tokens=tokens,
                        outputs=outputs)
        final.index_add_(0, token_idx, outputs.to(final.dtype))

    if not expert_hit.numel() and needs_autograd(experts, hidden_states, top_k_weights):
        # NOTE: no expert ran (T = 0, or every pair dropped), yet the output must stay in the autograd graph, so
        # that backward gives zero gradients as every other backend does, not "does not require grad"
        inputs = (hidden_states, top_k_weights, experts.gate_up_proj, experts.down_proj)
        final = final + sum(t.sum() for t in inputs if t.requires_grad) * 0
    record_step("reduce", "Each token's row now holds the weighted sum of its experts' outputs.", output=final)
    return final


def eager_memory(experts, hidden_states, top_k_index, dropped=None, backward=False) -> int:
    """Bytes of eager's big intermediates (the guard's estimate, `moelab.core.memory_guard`): the [E, k, T]
    int64 mask, the output, and the busiest expert's rows, at most T (a token's k choices are distinct experts)."""
    T, k, E, H, I, b = call_sizes(experts, hidden_states, top_k_index)
    per_row = (3 * H + 4 * I) * b  # tokens, gate_up, act(gate) and the product, outputs, weighted
    forward = E * k * T * 8 + T * H * b + T * per_row
    if not backward:
        return forward
    return with_backward(forward, eager_saved(T, k, E, H, I, b, hidden_grad=hidden_states.requires_grad), experts,
                         b, T, gradient_copies=2)


def eager_saved(T, k, E, H, I, b, *, kept=None, hidden_grad=True, weights_grad=True, w=None) -> list[Saved]:
    """What eager's autograd graph keeps for backward, summed over its experts (each expert's n rows; the sum of n
    is S, or `kept` pairs with drops). `w`: bytes per router weight (default b). hidden_grad does not change it:
    the up projection keeps its rows for the weight gradient either way."""
    S, w = (T * k if kept is None else kept), (b if w is None else w)
    saved = [Saved("token_idx, top_k_pos", "[S, 2] int64", S * 2 * 8),  # torch.where's one [n, 2] per expert
             Saved("tokens", "[S, H]", S * H * b),  # F.linear keeps its input for the weight gradient
             Saved("gate_up", "[S, 2I]", S * 2 * I * b),  # act_fn keeps gate, mul keeps up: views of it
             Saved("act_fn(gate)", "[S, I]", S * I * b),
             Saved("act_fn(gate) * up", "[S, I]", S * I * b),  # the down projection's input
             Saved("top_k_weights of the pairs", "[S, 1]", S * w)]
    if weights_grad:  # mul keeps the outputs only for the router weights' gradient
        saved.append(Saved("outputs (before weighting)", "[S, H]", S * H * b))
    saved.append(Saved("outputs", "[S, H]", S * H * b))  # index_add_ keeps its source (its shape for backward)
    return saved + existing_weights(E, H, I, b)  # gate_up_proj[e], down_proj[e]: views of the weights
