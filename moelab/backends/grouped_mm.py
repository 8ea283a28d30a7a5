"""`grouped_mm`: sort the (token, expert) pairs by expert, then one grouped matmul up and one down.

No weight is copied: after the sort, each expert's pairs are contiguous rows, delimited by `offsets` (the
cumulative tokens per expert), and a single grouped GEMM walks the groups. The cost is a sort and two
permutations of activations. The small named steps below can each be tested alone.

Two ways through the same steps:
- the plain path: every step makes a new tensor, as the trace shows it; taken whenever anything could look at the
  intermediates afterwards (autograd, an inspection, `torch.compile`, a device other than CPU);
- the lean path (CPU inference): the same steps and values, but dead intermediates are overwritten in place and
  the large ones live in a reusable `workspace`, because on CPU fresh multi-MiB buffers cost a page fault per
  4 KiB page on every call. `lean_path()` says which one a call takes.
"""

import torch
import torch.nn.functional as F

from ..core.steps import is_recording, record_step
from .cpu import workspace
from .grouped_matmul import grouped_linear, matmul_path

# activations with an exact in-place form: the lean path applies them to the gate half of gate_up
_INPLACE_ACT = {F.silu: lambda t: F.silu(t, inplace=True), F.relu: torch.relu_}


def sort_by_expert(top_k_index):
    """top_k_index [T, k] -> perm [S] (pairs in expert order, stable), sorted_expert_ids [S]."""
    expert_ids = top_k_index.reshape(-1)  # [S]
    perm = torch.argsort(expert_ids, stable=True)  # [S]
    return perm, expert_ids[perm]


def expert_offsets(sorted_expert_ids, num_experts):
    """sorted_expert_ids [S] -> offsets [E] int32: offsets[e] = pairs routed to experts 0..e (group e's end)."""
    expert_range = torch.arange(num_experts, device=sorted_expert_ids.device, dtype=sorted_expert_ids.dtype)
    return torch.searchsorted(sorted_expert_ids, expert_range, right=True).to(torch.int32)  # [E]


def inverse_permutation(perm):
    """perm [S] -> inv [S] with inv[perm[i]] = i, so `x_sorted[inv]` restores the original order."""
    inv = torch.empty_like(perm)
    return inv.scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))


def sum_slots(per_token):
    """per_token [T, k, H] -> [T, H]: each token's k weighted outputs summed."""
    top_k = per_token.shape[1]
    if top_k == 2 or (top_k > 2 and torch.compiler.is_compiling()):
        # NOTE: slot by slot, not .sum(dim=1). Eager bf16: the strided reduction is several times slower than one
        # add. Compiled: inductor fuses sum(dim=1) with the unsort gather into a kernel that walks the k rows
        # innermost (16 ms instead of 0.4 ms at T=512, k=8, bf16); a chain of adds compiles to one fast pass.
        final = per_token[:, 0] + per_token[:, 1]
        for slot in range(2, top_k):
            final = final + per_token[:, slot]
        return final
    return per_token.sum(dim=1)


def lean_path(experts, hidden_states, top_k_weights) -> bool:
    """True when a call may reuse its intermediates: CPU, no autograd graph, no inspection, not compiling."""
    if torch.compiler.is_compiling() or is_recording() or hidden_states.device.type != "cpu":
        return False
    if torch.is_grad_enabled() and (hidden_states.requires_grad or top_k_weights.requires_grad
                                    or experts.gate_up_proj.requires_grad or experts.down_proj.requires_grad):
        return False
    return True


def grouped_mm_experts(experts, hidden_states, top_k_index, top_k_weights):
    """hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k] -> [T, H]."""
    num_tokens, hidden_size = hidden_states.shape
    top_k = top_k_index.shape[-1]
    num_experts, double_inter, _ = experts.gate_up_proj.shape
    num_pairs = num_tokens * top_k
    dtype, device = hidden_states.dtype, hidden_states.device
    lean = lean_path(experts, hidden_states, top_k_weights)
    itemsize = hidden_states.element_size()
    use_ws = lean and workspace.fits([num_pairs * hidden_size * itemsize, num_pairs * double_inter * itemsize,
                                      num_pairs * hidden_size * itemsize])

    perm, sorted_expert_ids = sort_by_expert(top_k_index)  # [S], [S]
    record_step("sort", "Sort the (token, expert) pairs by expert id so each expert's pairs are contiguous.",
                perm=perm, sorted_expert_ids=sorted_expert_ids)

    offsets = expert_offsets(sorted_expert_ids, num_experts)  # [E]
    record_step("offsets", "Cumulative pair counts mark where each expert's group of rows ends.", offsets=offsets,
                derived={"tokens_per_expert": lambda: torch.diff(offsets, prepend=offsets.new_zeros(1))})

    token_idx = perm // top_k  # [S]: pair s belongs to token s // k
    # NOTE: index_select, not hidden_states[token_idx]: same rows, but advanced indexing is ~3x slower on CPU.
    rows = workspace.buffer("rows", (num_pairs, hidden_size), dtype, device) if use_ws else None
    sorted_states = torch.index_select(hidden_states, 0, token_idx, out=rows)  # [S, H]
    record_step("gather", "Gather the tokens into expert order (activations move, weights stay put).",
                token_idx=token_idx, sorted_states=sorted_states)

    up_path, up_reason = matmul_path(sorted_states, experts.gate_up_proj)
    gate_up_out = workspace.buffer("gate_up", (num_pairs, double_inter), dtype, device) if use_ws else None
    gate_up = grouped_linear(sorted_states, experts.gate_up_proj, offsets, up_path, out=gate_up_out)  # [S, 2I]
    record_step("up_proj", "One grouped matmul multiplies each expert's rows by that expert's gate_up_proj.",
                gate_up=gate_up, path=up_path, path_reason=up_reason)

    gate, up = gate_up.chunk(2, dim=-1)  # [S, I] each
    if lean and experts.act_fn in _INPLACE_ACT:
        activated = _INPLACE_ACT[experts.act_fn](gate).mul_(up)  # [S, I], written over the gate half of gate_up
    else:
        activated = experts.act_fn(gate) * up  # [S, I]
    record_step("act", "Gate the up projection: act(gate) * up.", activated=activated)

    down_path, down_reason = matmul_path(activated, experts.down_proj)
    # the lean path writes the down projection over sorted_states, dead once gate_up exists
    outputs = grouped_linear(activated, experts.down_proj, offsets, down_path,
                             out=sorted_states if use_ws else None)  # [S, H]
    record_step("down_proj", "A second grouped matmul projects each group back down with its expert's down_proj.",
                outputs=outputs, path=down_path, path_reason=down_reason)

    pair_weights = top_k_weights.reshape(-1).index_select(0, perm).unsqueeze(-1)  # [S, 1], in sorted order
    weighted = outputs.mul_(pair_weights) if lean else outputs * pair_weights  # [S, H]
    record_step("weigh", "Scale each pair's output by its router weight (looked up in sorted order).",
                weighted=weighted)

    inv_perm = inverse_permutation(perm)  # [S]
    if use_ws:
        unsort_out = workspace.buffer("unsorted", (num_pairs, hidden_size), dtype, device)
    else:
        unsort_out = sorted_states if lean else None  # lean: sorted_states is dead, reuse its memory
    unsorted = torch.index_select(weighted, 0, inv_perm, out=unsort_out)  # [S, H], back in (token, slot) order
    record_step("unsort", "The inverse permutation puts every pair back in token order.",
                inv_perm=inv_perm, unsorted=unsorted)

    final = sum_slots(unsorted.view(num_tokens, top_k, hidden_size))  # [T, H]
    record_step("reduce", "Sum each token's k weighted outputs.", output=final)
    return final
