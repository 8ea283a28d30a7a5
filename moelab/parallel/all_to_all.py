"""The two exchanges of expert parallelism on `torch.distributed`: the counts, and the rows with their gradients.

`all_to_all(rows, output_splits, input_splits, group)`: rank r sends `input_splits[j]` rows to rank j and receives
`output_splits[i]` rows from rank i, uneven splits (gloo on CPU, NCCL on GPUs). Its backward is the same exchange
the other way: the gradient of what a rank received goes back to the rank that sent it, splits swapped.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _exchange(rows: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    """rows [sum(input_splits), ...] -> [sum(output_splits), ...]: one uneven `all_to_all_single`."""
    output = rows.new_empty((sum(output_splits), *rows.shape[1:]))
    dist.all_to_all_single(output, rows.contiguous(), output_splits, input_splits, group=group)
    return output


class AllToAll(torch.autograd.Function):
    """Differentiable uneven all-to-all; backward is the reverse exchange (input and output splits swapped).

    NOTE: written here on the public `dist.all_to_all_single` because `torch.distributed.nn.functional
    .all_to_all_single` is deprecated in torch 2.13 and its replacement (functional collectives) is private API.
    The backward is a collective too: every rank of the group must run backward through it, in the same order.
    """

    @staticmethod
    def forward(ctx, rows, output_splits, input_splits, group):
        ctx.splits = (list(output_splits), list(input_splits))
        ctx.group = group
        return _exchange(rows, list(output_splits), list(input_splits), group)

    @staticmethod
    def backward(ctx, grad_output):
        output_splits, input_splits = ctx.splits
        # the gradient of the rows rank i sent goes back to rank i: what was received is now sent
        grad_rows = _exchange(grad_output, input_splits, output_splits, ctx.group)
        return grad_rows, None, None, None


def all_to_all(rows: torch.Tensor, output_splits: list[int], input_splits: list[int], group=None) -> torch.Tensor:
    """rows [sum(input_splits), H] -> [sum(output_splits), H], differentiable (see `AllToAll`)."""
    return AllToAll.apply(rows, output_splits, input_splits, group)


def exchange_counts(counts: torch.Tensor, group=None) -> torch.Tensor:
    """counts [E] (this rank's pairs per expert) -> received_counts [ep, L]: row i is what rank i sends here.

    Rank r sends the counts of rank j's L = E / ep experts to rank j (equal splits), so each rank learns how many
    rows it will receive, per source rank and local expert, before the rows themselves travel.
    """
    ep = dist.get_world_size(group)
    received = torch.empty_like(counts)  # [E] = [ep * L]
    dist.all_to_all_single(received, counts.contiguous(), group=group)
    return received.view(ep, -1)
