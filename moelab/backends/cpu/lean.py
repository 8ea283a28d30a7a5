"""grouped_mm's CPU inference path: the steps of `moelab.backends.grouped_mm`, the same values bit for bit, but
dead intermediates are overwritten in place and the large buffers come from a reusable `workspace`.

Why: on CPU, fresh multi-MiB buffers cost a page fault per 4 KiB page on every call (see `workspace`). What is
reused, in program order:
- the activation runs in place on the gate half of gate_up (for the activations in `IN_PLACE_ACTIVATIONS`); the
  product with the up half goes to its own contiguous [S, I] buffer, as in the plain path (a strided input
  can change the down projection's rounding);
- with the workspace, the down projection is written over sorted_states (dead once gate_up exists);
- the weighing multiplies outputs in place (when the router weights have the layer's dtype: float32 weights
  make a float32 product, as the plain path's `outputs * pair_weights` does);
- without the workspace, the unsort writes over the dead sorted_states.

An inspection does not change the path: where a step's tensor is overwritten later, `record_step` keeps a copy
taken at that step (`copy=`), so the trace shows each step's values. An inspected call takes no workspace
buffers (the next call would overwrite what the trace holds).
"""

import torch
import torch.nn.functional as F

from ...core.steps import is_recording, record_step
from ..autograd import needs_autograd
from ..grouped_matmul import grouped_linear, matmul_path
from ..pairs import expert_offsets, inverse_permutation, sort_by_expert, sum_slots, tokens_per_expert
from . import workspace

CODE_PATH = "cpu_lean"  # the `code_path` every step of this path records ("plain" in grouped_mm.py)

# activations with an exact in-place form: applied to the gate half of gate_up
IN_PLACE_ACTIVATIONS = {F.silu: lambda t: F.silu(t, inplace=True), F.relu: torch.relu_}

_LOOP_REASON = ("a loop of torch.mm(out=...) into the reused workspace buffer: on CPU the native kernel's own "
                "loop, minus allocating its result")


def applies(experts, hidden_states, top_k_weights) -> bool:
    """True when a call may overwrite its intermediates: CPU, no autograd graph, not compiling."""
    return (not torch.compiler.is_compiling() and hidden_states.device.type == "cpu"
            and not needs_autograd(experts, hidden_states, top_k_weights))


def workspace_buffers(num_pairs: int, hidden_size: int, inter_size: int, itemsize: int, weigh_itemsize: int,
                      act_in_place: bool) -> list[int]:
    """Bytes of the buffers a call takes from the workspace: rows [S, H], gate_up [S, 2I], with an in-place
    activation activated [S, I], with float32 router weights weighted [S, H] (float32), and unsorted [S, H] (in
    the weighing's dtype)."""
    buffers = [num_pairs * hidden_size * itemsize, num_pairs * 2 * inter_size * itemsize]
    if act_in_place:
        buffers.append(num_pairs * inter_size * itemsize)
    if weigh_itemsize != itemsize:
        buffers.append(num_pairs * hidden_size * weigh_itemsize)
    return buffers + [num_pairs * hidden_size * weigh_itemsize]


def lean_grouped_mm(experts, hidden_states, top_k_index, top_k_weights):
    """hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k] -> [T, H]; the caller checked `applies`."""
    num_tokens, hidden_size = hidden_states.shape
    top_k = top_k_index.shape[-1]
    num_experts, double_inter, _ = experts.gate_up_proj.shape
    inter = double_inter // 2
    num_pairs = num_tokens * top_k
    dtype, device = hidden_states.dtype, hidden_states.device
    weigh_dtype = torch.promote_types(dtype, top_k_weights.dtype)  # float32 with MoEConfig.top_k_weights_float32
    promoted = weigh_dtype != dtype
    in_place_act = IN_PLACE_ACTIVATIONS.get(experts.act_fn)
    # NOTE: a trace keeps its tensors, and the next call would overwrite workspace buffers: inspected, take none
    use_ws = not is_recording() and workspace.fits(workspace_buffers(
        num_pairs, hidden_size, inter, dtype.itemsize, weigh_dtype.itemsize, in_place_act is not None))

    def scratch(name, shape, buffer_dtype=dtype):
        return workspace.buffer(name, shape, buffer_dtype, device) if use_ws else None

    perm, sorted_expert_ids = sort_by_expert(top_k_index)  # [S], [S]
    record_step("sort", "Sort the (token, expert) pairs by expert id so each expert's pairs are contiguous.",
                perm=perm, sorted_expert_ids=sorted_expert_ids, code_path=CODE_PATH)

    offsets = expert_offsets(sorted_expert_ids, num_experts)  # [E]
    record_step("offsets", "Cumulative pair counts mark where each expert's group of rows ends.", offsets=offsets,
                derived={"tokens_per_expert": lambda: tokens_per_expert(offsets)}, code_path=CODE_PATH)

    token_idx = perm // top_k  # [S]
    rows = scratch("rows", (num_pairs, hidden_size))
    sorted_states = torch.index_select(hidden_states, 0, token_idx, out=rows)  # [S, H]
    rows_reused = use_ws or not promoted  # overwritten by the down projection (workspace) or by the unsort
    record_step("gather", "Gather the tokens into expert order (activations move, weights stay put).",
                token_idx=token_idx, sorted_states=sorted_states, code_path=CODE_PATH,
                copy=("sorted_states",) if rows_reused else ())

    up_path, up_reason = matmul_path(sorted_states, experts.gate_up_proj)
    if use_ws and up_path == "native":
        up_path, up_reason = "fallback", _LOOP_REASON
    gate_up = grouped_linear(sorted_states, experts.gate_up_proj, offsets, up_path,
                             out=scratch("gate_up", (num_pairs, double_inter)))  # [S, 2I]
    record_step("up_proj", "One grouped matmul multiplies each expert's rows by that expert's gate_up_proj.",
                gate_up=gate_up, path=up_path, path_reason=up_reason, code_path=CODE_PATH,
                copy=("gate_up",) if in_place_act is not None else ())

    gate, up = gate_up.chunk(2, dim=-1)  # [S, I] each
    if in_place_act is not None:
        # act over the gate half of gate_up, then the product into a contiguous buffer, laid out as the plain path's
        activated = torch.mul(in_place_act(gate), up, out=scratch("activated", (num_pairs, inter)))  # [S, I]
        explanation = "Gate the up projection: act(gate) in place over the gate half of gate_up, times up."
    else:
        activated = experts.act_fn(gate).mul_(up)  # [S, I]: the new act_fn(gate) takes the product
        explanation = "Gate the up projection: act(gate) * up."
    record_step("act", explanation, activated=activated, code_path=CODE_PATH)

    down_path, down_reason = matmul_path(activated, experts.down_proj)
    if use_ws and down_path == "native":
        down_path, down_reason = "fallback", _LOOP_REASON
    # with the workspace the down projection goes over sorted_states, dead once gate_up exists
    outputs = grouped_linear(activated, experts.down_proj, offsets, down_path,
                             out=sorted_states if use_ws else None)  # [S, H]
    record_step("down_proj", "A second grouped matmul projects each group back down with its expert's down_proj.",
                outputs=outputs, path=down_path, path_reason=down_reason, code_path=CODE_PATH,
                copy=() if promoted else ("outputs",))

    pair_weights = top_k_weights.reshape(-1).index_select(0, perm).unsqueeze(-1)  # [S, 1], in sorted order
    if promoted:
        # NOTE: float32 router weights: the product must be float32, as the plain path's `outputs * pair_weights`;
        # in place it would be rounded to the layer's dtype before the k-sum (one bfloat16 ulp off). Cast first
        # (exact), then multiply in place: a mixed-dtype multiply would make a float32 temporary of outputs.
        weighted = scratch("weighted", (num_pairs, hidden_size), weigh_dtype)
        weighted = (outputs.to(weigh_dtype) if weighted is None else weighted.copy_(outputs)).mul_(pair_weights)
        explanation = "Scale each pair's output by its router weight (looked up in sorted order), in float32."
    else:
        weighted = outputs.mul_(pair_weights)  # [S, H], in place
        explanation = "Scale each pair's output by its router weight (looked up in sorted order), in place."
    record_step("weigh", explanation, weighted=weighted, code_path=CODE_PATH)

    inv_perm = inverse_permutation(perm)  # [S]
    if use_ws:
        unsort_out = scratch("unsorted", (num_pairs, hidden_size), weigh_dtype)
    else:
        unsort_out = None if promoted else sorted_states  # sorted_states is dead: reuse its memory
    unsorted = torch.index_select(weighted, 0, inv_perm, out=unsort_out)  # [S, H], back in (token, slot) order
    record_step("unsort", "The inverse permutation puts every pair back in token order.",
                inv_perm=inv_perm, unsorted=unsorted, code_path=CODE_PATH)

    final = sum_slots(unsorted.view(num_tokens, top_k, hidden_size))  # [T, H], a new tensor: never the workspace
    record_step("reduce", "Sum each token's k weighted outputs.", output=final, code_path=CODE_PATH)
    return final
