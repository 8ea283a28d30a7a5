"""batched_mm's per-pair matmul under autograd: the forward the readable file shows, a backward grouped by expert.

`pair_matmul(inputs [S, K], gathered [S, N, K], weight [E, N, K], expert_ids [S]) -> [S, N]`: row s of `inputs`
times `gathered[s].T`, where `gathered[s]` is the copy of `weight[expert_ids[s]]` that batched_mm made.

Plain autograd would keep `gathered` alive for backward, return its gradient as S weight-sized outer products
(`[S, N, K]`, e.g. 1 GiB at S = 1024, N = K = 512, float32), then scatter-add them into `weight`: the weight
gradient written S times over. Here backward never builds a per-pair weight: it sorts the pairs by expert and, for
each expert's group of rows, `grad_inputs = grad @ weight[e]` and `grad_weight[e] = grad.T @ inputs`, one matmul
each, so every expert's gradient is written once. Saved for backward: `inputs` and `expert_ids` (and the weight,
which exists anyway); the gathered copy is freed when the forward ends.
"""

from __future__ import annotations

import torch

from ..grouped_matmul import group_ranges
from ..pairs import expert_offsets


class PairMatmul(torch.autograd.Function):
    """Forward: one bmm over the gathered weights; backward: per expert, reading `weight` in place."""

    @staticmethod
    def forward(ctx, inputs, gathered, weight, expert_ids):
        ctx.save_for_backward(inputs, weight, expert_ids)
        # NOTE: [1, K] @ [K, N] per pair, the orientation the CPU bmm kernels run fastest (see batched_mm.py)
        return torch.bmm(inputs.unsqueeze(1), gathered.transpose(1, 2)).squeeze(1)  # [S, N]

    @staticmethod
    def backward(ctx, grad):  # grad [S, N]
        inputs, weight, expert_ids = ctx.saved_tensors
        needs_inputs, _, needs_weight, _ = ctx.needs_input_grad
        perm = torch.argsort(expert_ids, stable=True)  # [S]: each expert's pairs contiguous
        ranges = group_ranges(expert_offsets(expert_ids[perm], weight.shape[0]))  # [(expert, start, end)]
        sorted_grad = grad.index_select(0, perm)  # [S, N]
        grad_inputs = grad_weight = None
        if needs_inputs:
            sorted_grad_inputs = grad.new_empty(inputs.shape)  # [S, K]
            for expert, start, end in ranges:
                torch.mm(sorted_grad[start:end], weight[expert], out=sorted_grad_inputs[start:end])
            grad_inputs = torch.empty_like(sorted_grad_inputs).index_copy_(0, perm, sorted_grad_inputs)
        if needs_weight:
            sorted_inputs = inputs.index_select(0, perm)  # [S, K]
            grad_weight = torch.zeros_like(weight)  # [E, N, K]: experts with no pairs get 0
            for expert, start, end in ranges:
                torch.mm(sorted_grad[start:end].t(), sorted_inputs[start:end], out=grad_weight[expert])
        return grad_inputs, None, grad_weight, None


def pair_matmul(inputs, gathered, weight, expert_ids):
    """inputs [S, K], gathered [S, N, K] (= weight[expert_ids]), weight [E, N, K], expert_ids [S] -> [S, N]."""
    return PairMatmul.apply(inputs, gathered, weight, expert_ids)
