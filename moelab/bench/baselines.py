"""What a backend is measured against: the useful FLOPs of the experts, the dense limit (one dense matmul pair
doing those FLOPs) and the bare grouped GEMMs of a routing (as they are, and with the weights cached)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backends.grouped_matmul import grouped_linear
from ..backends.pairs import expert_offsets, sort_by_expert


def useful_flops(num_tokens: int, top_k: int, hidden_size: int, intermediate_size: int, backward: bool = False) -> int:
    """FLOPs the experts must do: per pair 2*H*2I (up) + 2*I*H (down) = 6*H*I; backward adds twice that."""
    forward = 6 * num_tokens * top_k * hidden_size * intermediate_size
    return 3 * forward if backward else forward


def dense_pair(num_pairs: int, hidden: int, inter: int, dtype, device, backward: bool, generator):
    """The dense limit: x [S, H] through w_up [2I, H], then a [S, I] through w_down [H, I] (nn.Linear layout)."""
    def rand(*shape):
        return torch.randn(*shape, generator=generator).to(dtype=dtype, device=device)

    x, a = rand(num_pairs, hidden), rand(num_pairs, inter)
    w_up, w_down = rand(2 * inter, hidden) * hidden ** -0.5, rand(hidden, inter) * inter ** -0.5
    if not backward:
        return lambda: (F.linear(x, w_up), F.linear(a, w_down))
    leaves = [t.requires_grad_() for t in (x, w_up, a, w_down)]
    g_up, g_down = rand(num_pairs, 2 * inter), rand(num_pairs, hidden)

    def step():
        return torch.autograd.grad([F.linear(x, w_up), F.linear(a, w_down)], leaves, [g_up, g_down])
    return step


def grouped_gemm_pair(experts, top_k_index, dtype, device, generator, cached: bool = False):
    """The two bare grouped GEMMs of this routing on pre-sorted inputs: what no expert backend can undercut.

    cached: every group multiplies by expert 0's weights (a stride-0 view), so the weights stay in cache: the
    same FLOPs and group sizes without streaming E experts' weights from memory on every call.
    """
    _, sorted_ids = sort_by_expert(top_k_index)
    offsets = expert_offsets(sorted_ids, experts.num_experts)
    S = top_k_index.numel()
    x = torch.randn(S, experts.hidden_size, generator=generator).to(dtype=dtype, device=device)
    a = torch.randn(S, experts.intermediate_size, generator=generator).to(dtype=dtype, device=device)
    gate_up_proj, down_proj = experts.gate_up_proj, experts.down_proj  # [E, 2I, H], [E, H, I]
    if cached:
        gate_up_proj, down_proj = gate_up_proj[:1].expand_as(gate_up_proj), down_proj[:1].expand_as(down_proj)
    return lambda: (grouped_linear(x, gate_up_proj, offsets), grouped_linear(a, down_proj, offsets))
