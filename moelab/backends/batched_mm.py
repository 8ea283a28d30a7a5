"""`batched_mm`: give every (token, expert) pair its own copy of the expert's weights, then one `torch.bmm`.

Simple and shape-static (so `torch.compile(fullgraph=True)` works), but the gather duplicates
`S * 3 * I * H` weight elements: memory grows with the number of tokens. Fastest on GPU for tiny inputs
(decode), slow on CPU where the copy dominates. Not drop-aware, on purpose: its point is static shapes, so a pair
dropped by capacity is computed like any other and weighed by its weight 0.
"""

import torch

from ..core.steps import record_step
from .autograd import needs_autograd, pair_matmul
from .footprint import Saved, call_sizes, existing_weights, with_backward


def batched_mm_experts(experts, hidden_states, top_k_index, top_k_weights):
    """hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k] -> [T, H]."""
    num_tokens, hidden_size = hidden_states.shape
    top_k = top_k_index.shape[-1]
    expert_ids = top_k_index.reshape(-1)  # [S]; pair s is token s // k, slot s % k

    repeated = hidden_states.repeat_interleave(top_k, dim=0)  # [S, H]
    record_step("repeat", "Repeat each token k times, one row per (token, expert) pair.", repeated=repeated)

    # NOTE: the gather copies: these are new [S, ...] tensors, not views of the parameters. (index_select is
    # weight[expert_ids] with a faster CPU kernel.)
    gate_up_weights = experts.gate_up_proj.index_select(0, expert_ids)  # [S, 2I, H]
    down_weights = experts.down_proj.index_select(0, expert_ids)  # [S, H, I]
    record_step("gather_weights", "Copy each pair's expert weights: the parameter duplication of batched_mm.",
                expert_ids=expert_ids, gate_up_weights=gate_up_weights, down_weights=down_weights,
                gate_up_proj=experts.gate_up_proj, down_proj=experts.down_proj)

    # NOTE: each pair is a row vector times its weight transposed ([1, H] @ [H, 2I]), not [2I, H] @ [H, 1]: the
    # same dot products, but the CPU bmm kernels run this orientation 2-5x faster.
    # Under autograd, pair_matmul runs this same bmm but its backward works per expert, never building the S
    # weight-sized gradients plain autograd would (moelab.backends.autograd.pair_matmul says why). Compiled calls
    # keep plain autograd: that backward loops over the experts after a host sync, which a graph cannot hold.
    training = needs_autograd(experts, hidden_states, top_k_weights) and not torch.compiler.is_compiling()
    if training:
        gate_up = pair_matmul(repeated, gate_up_weights, experts.gate_up_proj, expert_ids)  # [S, 2I]
    else:
        gate_up = torch.bmm(repeated.unsqueeze(1), gate_up_weights.transpose(1, 2)).squeeze(1)  # [S, 2I]
    record_step("up_proj", "One batched matmul projects every pair up through its own gate and up rows.",
                gate_up=gate_up)

    gate, up = gate_up.chunk(2, dim=-1)  # [S, I] each
    activated = experts.act_fn(gate) * up  # [S, I]
    record_step("act", "Gate the up projection: act(gate) * up.", activated=activated)

    if training:
        outputs = pair_matmul(activated, down_weights, experts.down_proj, expert_ids)  # [S, H]
    else:
        outputs = torch.bmm(activated.unsqueeze(1), down_weights.transpose(1, 2)).squeeze(1)  # [S, H]
    record_step("down_proj", "A second batched matmul projects every pair back down to the hidden size.",
                outputs=outputs)

    weighted = outputs * top_k_weights.reshape(-1, 1)  # [S, H]
    record_step("weigh", "Scale each pair's output by its router weight.", weighted=weighted)

    final = weighted.view(num_tokens, top_k, hidden_size).sum(dim=1)  # [T, H]
    record_step("reduce", "Sum each token's k weighted outputs.", output=final)
    return final


def batched_mm_memory(experts, hidden_states, top_k_index, dropped=None, backward=False) -> int:
    """Bytes of batched_mm's big intermediates (the guard's estimate, `moelab.core.memory_guard`): each pair's
    copy of its expert's weights, S * 3 * I * H elements, and its [S, ...] activations."""
    T, k, E, H, I, b = call_sizes(experts, hidden_states, top_k_index)
    S = T * k
    # repeated, gathered weights, gate_up, act(gate) and the product, outputs, weighted; the [T, H] sum
    forward = S * (3 * I * H + 3 * H + 4 * I) * b + S * 8 + T * H * b
    if not backward:
        return forward
    return with_backward(forward, batched_mm_saved(T, k, E, H, I, b, hidden_grad=hidden_states.requires_grad),
                         experts, b, S)


def batched_mm_saved(T, k, E, H, I, b, *, hidden_grad=True, weights_grad=True, w=None) -> list[Saved]:
    """What batched_mm's autograd graph keeps for backward: `pair_matmul` keeps each matmul's rows and the
    weight itself, never the gathered copies (they die with the forward). `w`: bytes per router weight."""
    S, w = T * k, (b if w is None else w)
    saved = [Saved("repeated", "[S, H]", S * H * b),  # pair_matmul's rows, whether or not x needs a gradient
             Saved("gate_up", "[S, 2I]", S * 2 * I * b),  # act_fn keeps gate, mul keeps up: views of it
             Saved("act_fn(gate)", "[S, I]", S * I * b),
             Saved("activated", "[S, I]", S * I * b)]
    if weights_grad:  # mul keeps the outputs only for the router weights' gradient
        saved.append(Saved("outputs", "[S, H]", S * H * b))
    return saved + existing_weights(E, H, I, b) + [
        Saved("expert_ids", "[S] int64", S * 8, existing=True),  # a view of top_k_index
        Saved("top_k_weights", "[T, k]", T * k * w, existing=True)]
