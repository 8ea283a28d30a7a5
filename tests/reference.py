"""An independent float64 MoE, written for the tests only: a plain per-(token, slot) loop, no moelab backend; and
the odd-shape table (`ODD_SHAPES`, `routing_for`) the correctness tests share."""

import torch
import torch.nn.functional as F

ACTS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


def reference_experts(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, act="silu"):
    """float64 [T, H] output of the experts for a given routing; differentiable."""
    x = hidden_states.double()
    w_gu, w_d, w_k = gate_up_proj.double(), down_proj.double(), top_k_weights.double()
    inter = down_proj.shape[-1]
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros(x.shape[1], dtype=torch.float64)
        for j in range(top_k_index.shape[1]):
            e = int(top_k_index[t, j])
            gu = w_gu[e] @ x[t]  # [2I]
            hidden = ACTS[act](gu[:inter]) * gu[inter:]  # [I]
            acc = acc + w_k[t, j] * (w_d[e] @ hidden)
        rows.append(acc)
    return torch.stack(rows) if rows else x.new_zeros(0, x.shape[1])


def reference_router(hidden_states, router_weight, top_k, norm_topk_prob=True):
    logits = hidden_states.double() @ router_weight.double().T  # [T, E]
    probs = torch.softmax(logits, dim=-1)
    weights, index = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True)
    return logits, probs, index, weights


def reference_moe(hidden_states, router_weight, gate_up_proj, down_proj, top_k, norm_topk_prob=True, act="silu"):
    _, _, index, weights = reference_router(hidden_states, router_weight, top_k, norm_topk_prob)
    return reference_experts(hidden_states, index, weights, gate_up_proj, down_proj, act)


# The odd-shape table every correctness test runs on: (T, H, I, E, k, routing), routing "router" (the layer's own
# router) or "same" (every token on the same k experts, the others empty).
ODD_SHAPES = {
    "T=1": (1, 16, 32, 4, 2, "router"),
    "k=1, empty experts": (1, 16, 32, 8, 1, "router"),
    "k=E": (9, 16, 32, 4, 4, "router"),
    "sizes not a multiple of 8": (13, 6, 5, 4, 2, "router"),
    "all tokens on the same experts": (10, 12, 20, 5, 2, "same"),
    "larger": (33, 24, 40, 8, 3, "router"),
}


def routing_for(moe, x, kind):
    """(top_k_index [T, k], top_k_weights [T, k]) for `x`, detached; the weights in the dtype the router hands on."""
    with torch.no_grad():
        out = moe.router(x)
    if kind == "router":
        return out.top_k_index, out.top_k_weights
    T, k, E = x.shape[0], moe.config.top_k, moe.config.num_experts
    top_k_index = torch.tensor([E - 1 - j for j in range(k)]).expand(T, k).contiguous()  # every token -> same k
    top_k_weights = torch.softmax(torch.randn(T, k), dim=-1).to(out.top_k_weights.dtype)
    return top_k_index, top_k_weights
