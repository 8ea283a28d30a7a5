"""Each backend's steps as allocations and frees on a `Timeline`: the router (`route`), `eager`,
`batched_mm`, `grouped_mm`, `capacity`, `block_aligned`, their `reduce_slots`, and SparseMoE's `shared_expert`.
Each function mirrors its backend's code line by line (edit it side by side with `moelab/backends/*.py`); bytes
are formulas in `T, k, E, H, I, b` (`b` = bytes per element of the layer's dtype) and, where a layout needs them,
`C` (capacity's rows per expert), `M` (block_aligned's block size), `R` (= T*k + E*(M-1), block_aligned's static
row bound) and `Sk` (the kept pairs, when a `dropped` mask reaches the experts).

Liveness model (what "live" means in `analytic`), read off the backends' code:

- a tensor is live from the line that makes it until the Python name that holds it is dropped: re-bound (the
  new tensor is made first, then the old one freed), or the function returns. The backends keep their named
  intermediates until they return, so a backend's peak is usually at its last step;
- temporaries of one expression (`act_fn(gate)` in `act_fn(gate) * up`) die when the expression ends: they are
  listed with `transient=True` and count only inside their step;
- views (`reshape` of a contiguous tensor, `chunk`, `unsqueeze`, `permute`, `view`) cost nothing;
- inference only (`torch.no_grad()`): no autograd graph keeps tensors alive. Inputs and parameters exist before
  the call and are not counted; kernel-internal workspaces and scalar tensors are not modelled (on CPU in
  bfloat16, oneDNN's matmul scratch puts eager's measured peak about 20% above the model; in float32 the
  model matched torch.profiler to the byte at T=128 and 256 with E=8, k=2, H=256, I=512);
- index tensors are int64 (8 bytes), the router's probabilities float32 (4 bytes); with
  `MoEConfig.top_k_weights_float32` below float32 the weighted pairs are float32 too (symbol `w` = 4) and
  `Experts` casts the sum back; a shared expert (`shared_expert_intermediate_size`, symbol `Is`) runs after the
  backend has returned;
- with `router=True` (a `SparseMoE` call) the router's outputs stay live for the whole call, as `SparseMoE.forward`
  holds them; the layer's output is the only tensor still live when the call returns (`retained_bytes`);
- two paths through grouped_mm: the plain one (autograd, under compile, off CPU), where every step makes the new
  tensors the trace shows, and CPU inference's fast path (`moelab.backends.cpu.lean`): the activation in place
  over gate_up's gate half (silu, relu; the product still gets its own `activated`), the weighing in place
  (unless the router hands on float32 weights: the product is then float32, as in the plain path), the unsort
  over `sorted_states`, and, when a buffer reaches `workspace.MIN_BYTES`, the large buffers from the reusable
  workspace (`moelab.backends.cpu.workspace`), kept between calls: in `peak_bytes`, not in `extra_peak_bytes`.
  An inspected fast-path call (`inspected=True`) takes no workspace, and the recorder keeps a copy of each
  tensor the path overwrites, made at its step and kept alive by the trace (`copy=True`); the overwritten
  storage is then first seen by the trace under the tensor written over it (`recorded_as`);
- `eager` loops over the hit experts: its peak depends on how many pairs each expert got. Pass the real counts
  (`tokens_per_expert`, e.g. from a trace's `route` step) for an exact figure; by default routing is balanced
  (`T*k/E` pairs per expert).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .timeline import Timeline


def route(tl: Timeline, dtype: torch.dtype, norm_topk_prob: bool, weights_float32: bool, drops: bool = False,
          drop_policy: str = "position", top_k: int = 2) -> None:
    """TopKRouter.forward + SparseMoE's hold on its outputs (the `route` step); `drops`: the config has a capacity
    factor in this mode, so `drop_pairs` ranks the pairs (`drop_policy`) and SparseMoE passes the mask on."""
    keep_fp32 = dtype == torch.float32 or weights_float32  # the float32 weights are the ones handed on
    tl.step("route")
    tl.alloc("router_logits", "router_logits", "[T, E]", "T*E*b")
    if dtype != torch.float32:
        tl.alloc("logits32", "router_logits (as float32)", "[T, E]", "T*E*4", transient=True)
    tl.alloc("router_probs", "router_probs", "[T, E]", "T*E*4")
    tl.free("logits32")
    # each float32 weights tensor is recorded as top_k_weights when it is the one handed on
    handed_on = "cast" if not keep_fp32 else "masked" if drops else "normalized" if norm_topk_prob else "top_k_probs"
    name = "top_k_weights" if handed_on == "top_k_probs" else "top_k_probs"
    tl.alloc("top_k_probs", name, "[T, k]", "T*k*4", recorded_in=name == "top_k_weights")
    tl.alloc("top_k_index", "top_k_index", "[T, k]", "T*k*8")
    last_fp32 = "top_k_probs"  # top_k_weights; the router also holds top_k_probs as top_k_scores until it returns
    if norm_topk_prob:
        name = "top_k_weights" if handed_on == "normalized" else "top_k_weights (float32, normalised)"
        tl.alloc("sum", "sum of top-k probs", "[T, 1]", "T*4", transient=True)
        tl.alloc("normalized", name, "[T, k]", "T*k*4", recorded_in=handed_on == "normalized")
        tl.free("sum")
        last_fp32 = "normalized"
    if drops:
        drop_pairs(tl, drop_policy, top_k)
        name = "top_k_weights" if handed_on == "masked" else "top_k_weights (float32, dropped zeroed)"
        tl.alloc("masked", name, "[T, k]", "T*k*4", recorded_in=handed_on == "masked")
        if last_fp32 != "top_k_probs":
            tl.free(last_fp32)
        last_fp32 = "masked"
    else:  # all False when dropless: not in the trace
        tl.alloc("dropped", "dropped", "[T, k]", "T*k", recorded_in=None)
    if not keep_fp32:
        tl.alloc("top_k_weights", "top_k_weights", "[T, k]", "T*k*b")
        if last_fp32 != "top_k_probs":
            tl.free(last_fp32)
    if handed_on != "top_k_probs":
        tl.free("top_k_probs")  # top_k_scores dies when the router returns
    if drops:  # SparseMoE.forward shows the kept pairs in its step and holds them for the call
        tl.alloc("kept", "kept", "[T, k]", "T*k")


def drop_pairs(tl: Timeline, drop_policy: str, top_k: int) -> None:
    """moelab.layer.capacity.drop_pairs with a capacity factor: the pairs ranked within their expert, then the mask.
    Its locals die when it returns (transient); with k = 1 the slot-major transposes are views."""
    copies = top_k > 1  # top_k_index.t().reshape(-1) copies, except for a [T, 1] index
    if copies:
        tl.alloc("slot_major", "slot-major expert ids", "[T*k]", "T*k*8", transient=True)
    if drop_policy == "probs":
        if copies:
            tl.alloc("slot_scores", "slot-major scores", "[T*k]", "T*k*4", transient=True)
        tl.alloc("score_scratch", "argsort scratch (scores and indices)", "[T*k]", "T*k*4 + T*k*8", transient=True)
        tl.alloc("by_score", "pairs by score", "[T*k]", "T*k*8", transient=True)
        tl.free("score_scratch")
        tl.alloc("ids_by_score", "expert ids by score", "[T*k]", "T*k*8", transient=True)
        rank_within_expert(tl, "rank_sorted")
        tl.free("ids_by_score")  # the argument dies with the call that took it
        tl.alloc("rank", "rank in slot-major order", "[T*k]", "T*k*8", transient=True)
    else:
        rank_within_expert(tl, "rank")
    tl.alloc("dropped", "dropped", "[T, k]", "T*k", recorded_in=None)  # rank >= C; the trace shows `kept`
    tl.free("rank", "slot_scores", "by_score", "rank_sorted", "slot_major")


def rank_within_expert(tl: Timeline, key: str) -> None:
    """moelab.layer.capacity.rank_within_expert: `key` is the rank it returns; its locals die on return."""
    tl.alloc("argsort_scratch", "argsort scratch (keys and indices)", "[2, T*k]", "2*T*k*8", transient=True)
    tl.alloc("order", "pairs grouped by expert", "[T*k]", "T*k*8", transient=True)
    tl.free("argsort_scratch")
    tl.alloc("counts", "bincount of the expert ids", "[E]", "E*8", transient=True)
    tl.alloc("cumsum", "cumsum of the counts", "[E]", "E*8", transient=True)
    tl.alloc("group_start", "group_start", "[E]", "E*8", transient=True)
    tl.free("cumsum")
    tl.alloc("arange", "arange(T*k)", "[T*k]", "T*k*8", transient=True)
    tl.alloc("ids_sorted", "expert ids in sorted order", "[T*k]", "T*k*8", transient=True)
    tl.alloc("starts", "group_start of each sorted pair", "[T*k]", "T*k*8", transient=True)
    tl.free("ids_sorted")
    tl.alloc("sorted_rank", "sorted_rank", "[T*k]", "T*k*8", transient=True)
    tl.free("starts", "arange")
    tl.alloc(key, "rank", "[T*k]", "T*k*8", transient=True)
    tl.free("sorted_rank", "counts", "group_start", "order")


def masked_weights(tl: Timeline, w: str) -> None:
    """Experts.forward with a `dropped` mask: `top_k_weights.masked_fill(dropped, 0)`, held until it returns."""
    tl.alloc("masked_weights", "top_k_weights (dropped pairs zeroed by Experts)", "[T, k]", f"T*k*{w}",
             recorded_in=None)


def eager(tl: Timeline, counts: Sequence[int], w: str, drops: bool = False) -> None:
    """eager_experts; `counts`: the pairs each expert computes (the kept ones with `drops`, a `dropped` mask)."""
    tl.step("expert_mask")
    if drops:
        masked_weights(tl, w)
    tl.alloc("output", "output", "[T, H]", "T*H*b", recorded_in="reduce")  # zeros, filled by index_add_
    if drops:  # the one-hot, then the mask without the dropped pairs (a new tensor, re-bound)
        tl.alloc("one_hot", "one_hot(top_k_index)", "[E, k, T]", "E*k*T*8", recorded_in=None)
        tl.alloc("expert_mask", "expert_mask", "[E, k, T]", "E*k*T*8")
        tl.free("one_hot")
    else:
        tl.alloc("expert_mask", "expert_mask", "[E, k, T]", "E*k*T*8")
    tl.alloc("hit_counts", "tokens per expert (sum of the mask)", "[E]", "E*8", transient=True)
    tl.alloc("hit", "hit_counts > 0", "[E]", "E", transient=True)
    tl.free("hit_counts")
    tl.alloc("expert_hit", "expert_hit", "[n]", "n*8", n=sum(1 for c in counts if c))  # n: experts hit
    tl.free("hit")
    for expert_id, n in enumerate(counts):
        if not n:
            continue
        tl.step("expert", f"expert_id={expert_id}, n={n}")
        # torch.where(mask) makes one [n, 2] int64 tensor; top_k_pos and token_idx are its two columns
        tl.alloc("new_top_k_pos", "top_k_pos", "[n]", "n*8", n=n)
        tl.alloc("new_token_idx", "token_idx", "[n]", "n*8", n=n)
        tl.free("top_k_pos", "token_idx")
        tl.alloc("new_tokens", "tokens", "[n, H]", "n*H*b", n=n)
        tl.free("tokens")
        tl.alloc("new_gate_up", "gate_up", "[n, 2I]", "n*2*I*b", recorded_in=None, n=n)
        tl.free("gate_up")
        tl.alloc("act", "act_fn(gate)", "[n, I]", "n*I*b", transient=True, n=n)
        tl.alloc("gated", "act_fn(gate) * up", "[n, I]", "n*I*b", transient=True, n=n)
        tl.free("act")
        tl.alloc("unweighted", "outputs (before weighting)", "[n, H]", "n*H*b", transient=True, n=n)
        tl.free("gated", "outputs")
        tl.alloc("weights", "top_k_weights of the pairs", "[n, 1]", f"n*{w}", transient=True, n=n)
        if w != "b":  # a mixed-dtype multiply makes a float32 copy of the outputs first
            tl.alloc("unweighted32", "outputs as float32", "[n, H]", "n*H*w", transient=True, n=n)
        tl.alloc("new_outputs", "outputs", "[n, H]", f"n*H*{w}", n=n)
        tl.free("weights", "unweighted", "unweighted32")
        if w != "b":  # float32 outputs are cast to the output's dtype for index_add_
            tl.alloc("cast", "outputs cast to the input dtype", "[n, H]", "n*H*b", transient=True, n=n)
            tl.free("cast")
        for key in ("top_k_pos", "token_idx", "tokens", "gate_up", "outputs"):
            tl.live[key] = tl.live.pop(f"new_{key}")
    tl.step("reduce")  # index_add_ wrote into `output` all along


def batched_mm(tl: Timeline, w: str, drops: bool = False) -> None:
    """batched_mm_experts; with `drops` it still computes every pair (Experts zeroed the dropped weights)."""
    tl.step("repeat")
    if drops:
        masked_weights(tl, w)
    tl.alloc("repeated", "repeated", "[T*k, H]", "T*k*H*b")
    tl.step("gather_weights")  # expert_ids is a view of top_k_index
    tl.alloc("gate_up_weights", "gate_up_weights", "[T*k, 2I, H]", "T*k*2*I*H*b")
    tl.alloc("down_weights", "down_weights", "[T*k, H, I]", "T*k*H*I*b")
    tl.step("up_proj")
    tl.alloc("gate_up", "gate_up", "[T*k, 2I]", "T*k*2*I*b")
    tl.step("act")
    tl.alloc("act", "act_fn(gate)", "[T*k, I]", "T*k*I*b", transient=True)
    tl.alloc("activated", "activated", "[T*k, I]", "T*k*I*b")
    tl.free("act")
    tl.step("down_proj")
    tl.alloc("outputs", "outputs", "[T*k, H]", "T*k*H*b")
    tl.step("weigh")
    if w != "b":  # a mixed-dtype multiply makes a float32 copy of outputs first
        tl.alloc("outputs32", "outputs as float32", "[T*k, H]", "T*k*H*w", transient=True)
    tl.alloc("weighted", "weighted", "[T*k, H]", f"T*k*H*{w}")
    tl.free("outputs32")
    tl.step("reduce")
    reduce_slots(tl, w)


def reduce_slots(tl: Timeline, w: str) -> None:
    tl.alloc("output", "output", "[T, H]", f"T*H*{w}")
    if w != "b":  # the backend returns (its locals die), then Experts.forward casts the float32 sum back
        tl.free_all_but("output", "masked_weights", *_ROUTER_KEYS)
        tl.alloc("output_cast", "output cast to the input dtype", "[T, H]", "T*H*b", recorded_in=None)
        tl.free("output", "masked_weights")  # Experts.forward returns
        tl.live["output"] = tl.live.pop("output_cast")


def grouped_mm(tl: Timeline, w: str, lean: bool = False, use_workspace: bool = False, act_in_place: bool = False,
               inspected: bool = False, drops: bool = False) -> None:
    """grouped_mm's plain path, or with `lean` its CPU inference path: `act_in_place` (silu, relu), the large
    buffers from the workspace (`use_workspace`), weighing in place unless `w` (float32 router weights) promotes;
    `inspected`: the lean path with the recorder's copies of what it overwrites (never with the workspace).
    `drops` (a `dropped` mask; always the plain path): only the Sk kept pairs get rows (`rows` below)."""
    if drops and lean:
        raise ValueError("grouped_mm takes its plain path whenever a dropped mask is passed")
    promoted = w != "b"  # float32 router weights: weighted, unsorted and the sum are float32
    copies = lean and inspected
    rows = "Sk" if drops else "T*k"  # the pairs sorted and computed
    tl.step("sort")
    if drops:
        masked_weights(tl, w)
        tl.alloc("keys", "expert ids, dropped pairs past every expert", "[T*k]", "T*k*8", transient=True)
    tl.alloc("argsort_scratch", "argsort scratch (keys and indices)", "[2, T*k]", "2*T*k*8", transient=True)
    # with drops perm is a slice of the full argsort: its storage keeps all T*k entries
    tl.alloc("perm", "perm", "[T*k]" if not drops else "[Sk] (of a [T*k] storage)", "T*k*8")
    tl.free("argsort_scratch", "keys")
    if drops:  # int((~dropped).sum()): the sum casts the bool mask to int64 first
        tl.alloc("not_dropped", "~dropped", "[T, k]", "T*k", transient=True)
        tl.alloc("not_dropped64", "~dropped as int64 (inside sum)", "[T, k]", "T*k*8", transient=True)
        tl.free("not_dropped64", "not_dropped")
    tl.alloc("sorted_expert_ids", "sorted_expert_ids", f"[{rows}]", f"{rows}*8")
    tl.step("offsets")
    tl.alloc("expert_range", "arange(E) and searchsorted (int64)", "[2, E]", "2*E*8", transient=True)
    tl.alloc("offsets", "offsets", "[E]", "E*4")
    tl.free("expert_range")
    tl.step("gather")
    tl.alloc("token_idx", "token_idx", f"[{rows}]", f"{rows}*8")
    if copies and not promoted:  # the unsort writes over sorted_states: the trace keeps a copy
        tl.alloc("sorted_states", "sorted_states", f"[{rows}, H]", f"{rows}*H*b", recorded_in="unsort",
                 recorded_as="unsorted")
        tl.alloc("sorted_states_copy", "sorted_states (copy)", f"[{rows}, H]", f"{rows}*H*b", copy=True,
                 recorded_as="sorted_states")
    else:
        tl.alloc("sorted_states", "sorted_states", f"[{rows}, H]", f"{rows}*H*b", workspace=use_workspace)
    tl.step("up_proj")  # native grouped_mm and the fallback loop both write one [rows, 2I] result
    if copies and act_in_place:  # the activation writes over gate_up's gate half: the trace keeps a copy
        tl.alloc("gate_up", "gate_up", f"[{rows}, 2I]", f"{rows}*2*I*b", recorded_in=None)
        tl.alloc("gate_up_copy", "gate_up (copy)", f"[{rows}, 2I]", f"{rows}*2*I*b", copy=True, recorded_as="gate_up")
    else:
        tl.alloc("gate_up", "gate_up", f"[{rows}, 2I]", f"{rows}*2*I*b", workspace=use_workspace)
    tl.step("act")
    if lean:  # act_fn in place over the gate half (or a new act_fn(gate)), the product into `activated`
        tl.alloc("activated", "activated", f"[{rows}, I]", f"{rows}*I*b", workspace=use_workspace and act_in_place)
    else:
        tl.alloc("act", "act_fn(gate)", f"[{rows}, I]", f"{rows}*I*b", transient=True)
        tl.alloc("activated", "activated", f"[{rows}, I]", f"{rows}*I*b")
        tl.free("act")
    tl.step("down_proj")
    if copies and not promoted:  # the weighing multiplies outputs in place: the trace keeps a copy
        tl.alloc("outputs", "outputs", f"[{rows}, H]", f"{rows}*H*b", recorded_in="weigh", recorded_as="weighted")
        tl.alloc("outputs_copy", "outputs (copy)", f"[{rows}, H]", f"{rows}*H*b", copy=True, recorded_as="outputs")
    elif not use_workspace:  # with the workspace, outputs are written over sorted_states
        tl.alloc("outputs", "outputs", f"[{rows}, H]", f"{rows}*H*b")
    tl.step("weigh")
    tl.alloc("pair_weights", "top_k_weights in sorted order", f"[{rows}, 1]", f"{rows}*{w}", recorded_in=None)
    if not lean and promoted:  # a mixed-dtype multiply makes a float32 copy of outputs first (the lean path casts)
        tl.alloc("outputs32", "outputs as float32", f"[{rows}, H]", f"{rows}*H*w", transient=True)
    if not lean or promoted:  # lean, same dtype: outputs.mul_(pair_weights), in place
        tl.alloc("weighted", "weighted", f"[{rows}, H]", f"{rows}*H*{w}", workspace=use_workspace)
    tl.free("outputs32")
    tl.step("unsort")
    if drops:  # the kept rows are copied into zeros: a dropped pair's row stays 0
        tl.alloc("zeros", "zeros for every pair", "[T*k, H]", f"T*k*H*{w}", transient=True)
        tl.alloc("unsorted", "unsorted", "[T*k, H]", f"T*k*H*{w}")
        tl.free("zeros")
        tl.step("reduce")
        reduce_slots(tl, w)
        return
    tl.alloc("inv_perm", "inv_perm", "[T*k]", "T*k*8")
    tl.alloc("arange", "arange(T*k) scattered into inv_perm", "[T*k]", "T*k*8", transient=True)
    tl.free("arange")
    if use_workspace or not lean or promoted:  # else the lean path writes over the dead sorted_states
        tl.alloc("unsorted", "unsorted", "[T*k, H]", f"T*k*H*{w}", workspace=use_workspace)
    tl.step("reduce")
    reduce_slots(tl, w)


def capacity(tl: Timeline, w: str, drops: bool = False) -> None:
    """capacity_experts: the static [E, C, H] buffer (symbol C: rows per expert; E*C + 1 rows with the spare row a
    dropped pair points at) and one bmm up, one down. `drops`: a `dropped` mask is passed."""
    tl.step("positions")
    if drops:
        masked_weights(tl, w)
    # slot_in_expert: everything but slot and tokens_per_expert dies when it returns (transient)
    if drops:
        tl.alloc("keys", "expert ids, dropped pairs as E", "[T*k]", "T*k*8", transient=True)
    tl.alloc("argsort_scratch", "argsort scratch (keys and indices)", "[2, T*k]", "2*T*k*8", transient=True)
    tl.alloc("perm", "perm (pairs in expert order)", "[T*k]", "T*k*8", transient=True)
    tl.free("argsort_scratch")
    tl.alloc("sorted_keys", "sorted_keys", "[T*k]", "T*k*8", transient=True)
    tl.alloc("group_ids", "arange(E + 1)", "[E+1]", "E*8 + 8", transient=True)
    tl.alloc("group_end", "group_end", "[E+1]", "E*8 + 8", transient=True)
    # torch.diff(x, prepend=p) concatenates p and x first
    tl.alloc("zero", "new_zeros(1)", "[1]", "8", transient=True)
    tl.alloc("cat", "cat(prepend, group_end[:E])", "[E+1]", "E*8 + 8", transient=True)
    tl.alloc("tokens_per_expert", "tokens_per_expert", "[E]", "E*8", recorded_in="positions")
    tl.free("cat", "zero")
    tl.alloc("zero", "new_zeros(1)", "[1]", "8", transient=True)
    tl.alloc("cat", "cat(prepend, group_end)", "[E+2]", "E*8 + 16", transient=True)
    tl.alloc("counts", "diff(group_end)", "[E+1]", "E*8 + 8", transient=True)
    tl.free("cat", "zero")
    tl.alloc("group_start", "group_start", "[E+1]", "E*8 + 8", transient=True)
    tl.free("counts")
    tl.alloc("arange", "arange(T*k)", "[T*k]", "T*k*8", transient=True)
    tl.alloc("starts", "group_start of each sorted pair", "[T*k]", "T*k*8", transient=True)
    tl.alloc("sorted_slot", "sorted_slot", "[T*k]", "T*k*8", transient=True)
    tl.free("arange", "starts")
    tl.alloc("slot", "slot", "[T, k]", "T*k*8")
    tl.free("sorted_slot", "sorted_keys", "perm", "group_ids", "group_end", "group_start", "keys")
    # buffer_rows = top_k_index * C + slot
    tl.alloc("scaled", "top_k_index * C", "[T, k]", "T*k*8", transient=True)
    if drops:  # re-bound to the mask that sends dropped pairs to the spare row
        tl.alloc("rows_unmasked", "buffer_rows (before the drop mask)", "[T, k]", "T*k*8", recorded_in=None)
        tl.free("scaled")
        tl.alloc("buffer_rows", "buffer_rows", "[T, k]", "T*k*8")
        tl.free("rows_unmasked")
    else:
        tl.alloc("buffer_rows", "buffer_rows", "[T, k]", "T*k*8")
        tl.free("scaled")
    tl.step("dispatch")
    tl.alloc("pair_states", "pair_states (each token k times)", "[T*k, H]", "T*k*H*b", recorded_in=None)
    # new_zeros(...).index_copy(...) is out of place: a second buffer, then the zeros die
    tl.alloc("zeros", "zeros of the buffer", "[E*C+1, H]", "E*C*H*b + H*b", transient=True)
    tl.alloc("buffer", "buffer", "[E*C+1, H]", "E*C*H*b + H*b", recorded_as="expert_inputs")
    tl.free("zeros")
    tl.alloc("arange", "arange(C)", "[C]", "C*8", transient=True)
    tl.alloc("padding", "padding", "[E, C]", "E*C")
    tl.free("arange")
    tl.step("up_proj")  # bmm reads the transposed weights in place: no copy
    tl.alloc("gate_up", "gate_up", "[E, C, 2I]", "E*C*2*I*b")
    tl.step("act")
    tl.alloc("act", "act_fn(gate)", "[E, C, I]", "E*C*I*b", transient=True)
    tl.alloc("activated", "activated", "[E, C, I]", "E*C*I*b")
    tl.free("act")
    tl.step("down_proj")
    tl.alloc("expert_outputs", "expert_outputs", "[E, C, H]", "E*C*H*b")
    tl.step("combine")
    tl.alloc("zero_row", "new_zeros(1, H)", "[1, H]", "H*b", transient=True)
    tl.alloc("rows_out", "rows_out (the outputs and a zero spare row)", "[E*C+1, H]", "E*C*H*b + H*b",
             recorded_in=None)
    tl.free("zero_row")
    tl.alloc("selected", "rows_out.index_select(0, buffer_rows)", "[T*k, H]", "T*k*H*b", transient=True)
    if w != "b":  # a mixed-dtype multiply makes a float32 copy of the selected rows first
        tl.alloc("selected32", "selected rows as float32", "[T*k, H]", "T*k*H*w", transient=True)
    tl.alloc("pair_outputs", "pair_outputs", "[T*k, H]", f"T*k*H*{w}")
    tl.free("selected32", "selected")
    tl.step("reduce")
    reduce_slots(tl, w)


def block_aligned(tl: Timeline, w: str, drops: bool = False) -> None:
    """block_aligned_experts: groups padded to multiples of M rows in a buffer of the static bound R = T*k + E*(M-1)
    rows (+1 spare row), a grouped matmul over the R rows up and one down. `drops`: a `dropped` mask is passed."""
    tl.step("sort")
    if drops:
        masked_weights(tl, w)
    # align_to_blocks: all but buffer_rows, padded_offsets, tokens_per_expert (a view of counts) and padded_tokens
    # die when it returns (transient)
    if drops:
        tl.alloc("keys", "expert ids, dropped pairs as E", "[T*k]", "T*k*8", transient=True)
    tl.alloc("argsort_scratch", "argsort scratch (keys and indices)", "[2, T*k]", "2*T*k*8", transient=True)
    tl.alloc("perm", "perm (pairs in expert order)", "[T*k]", "T*k*8", transient=True)
    tl.free("argsort_scratch")
    tl.alloc("sorted_keys", "sorted_keys", "[T*k]", "T*k*8", transient=True)
    tl.alloc("group_ids", "arange(E + 1)", "[E+1]", "E*8 + 8", transient=True)
    tl.alloc("group_end", "group_end", "[E+1]", "E*8 + 8", transient=True)
    tl.alloc("zero", "new_zeros(1)", "[1]", "8", transient=True)
    tl.alloc("cat", "cat(prepend, group_end)", "[E+2]", "E*8 + 16", transient=True)
    # tokens_per_expert is counts[:E]: the trace first sees the [E+1] storage under that name
    tl.alloc("counts", "counts (the last one: dropped pairs)", "[E+1]", "E*8 + 8", recorded_as="tokens_per_expert")
    tl.free("cat", "zero")
    tl.alloc("padded_sum", "tokens_per_expert + M", "[E]", "E*8", transient=True)
    tl.alloc("padded_minus", "... - 1", "[E]", "E*8", transient=True)
    tl.free("padded_sum")
    tl.alloc("padded_div", "... // M", "[E]", "E*8", transient=True)
    tl.free("padded_minus")
    tl.alloc("padded_tokens", "padded_tokens_per_expert", "[E]", "E*8", recorded_in="align")
    tl.free("padded_div")
    tl.alloc("padded_end", "padded_end (cumsum)", "[E]", "E*8", transient=True)
    tl.alloc("zero", "new_zeros(1)", "[1]", "8", transient=True)
    tl.alloc("padded_start", "padded_start", "[E+1]", "E*8 + 8", transient=True)
    tl.free("zero")
    tl.alloc("group_start", "group_start", "[E+1]", "E*8 + 8", transient=True)
    # sorted_rows = padded_start[sorted_keys] + arange(T*k) - group_start[sorted_keys]
    tl.alloc("starts", "padded_start of each sorted pair", "[T*k]", "T*k*8", transient=True)
    tl.alloc("arange", "arange(T*k)", "[T*k]", "T*k*8", transient=True)
    tl.alloc("plus", "starts + arange", "[T*k]", "T*k*8", transient=True)
    tl.free("starts", "arange")
    tl.alloc("group_starts", "group_start of each sorted pair", "[T*k]", "T*k*8", transient=True)
    tl.alloc("sorted_rows", "sorted_rows", "[T*k]", "T*k*8", transient=True)
    tl.free("plus", "group_starts")
    tl.alloc("is_dropped", "sorted_keys == E", "[T*k]", "T*k", transient=True)
    tl.alloc("sorted_rows_masked", "sorted_rows (dropped: the spare row)", "[T*k]", "T*k*8", transient=True)
    tl.free("is_dropped", "sorted_rows")
    tl.alloc("buffer_rows", "buffer_rows", "[T*k]", "T*k*8", recorded_in="align")
    tl.alloc("padded_offsets", "padded_offsets", "[E]", "E*4", recorded_in="align")  # padded_end as int32
    tl.free("sorted_rows_masked", "sorted_keys", "padded_end", "group_ids", "group_end", "padded_start",
            "group_start", "perm", "keys")
    tl.step("align")
    tl.alloc("sorted_pair_ids", "sorted_pair_ids", "[R+1]", "R*8 + 8")  # sliced to [R]: the storage keeps R+1
    tl.alloc("pair_ids", "arange(T*k) scattered into sorted_pair_ids", "[T*k]", "T*k*8", transient=True)
    tl.free("pair_ids")
    tl.alloc("block_starts", "block_starts", "[ceil(R/M)]", "(R + M - 1) // M * 8", recorded_in=None)
    tl.alloc("offsets64", "padded_offsets as int64", "[E]", "E*8", transient=True)
    tl.alloc("block_expert_ids", "block_expert_ids", "[ceil(R/M)]", "(R + M - 1) // M * 8")
    tl.free("offsets64")
    tl.step("gather")
    tl.alloc("pair_states", "pair_states (each token k times)", "[T*k, H]", "T*k*H*b", recorded_in=None)
    tl.alloc("zeros", "zeros of the buffer", "[R+1, H]", "R*H*b + H*b", transient=True)
    tl.alloc("buffer", "buffer", "[R+1, H]", "R*H*b + H*b", recorded_as="padded_states")  # padded_states: [R]
    tl.free("zeros")
    tl.step("up_proj")  # native grouped_mm and the fallback loop both write one [R, 2I] result
    tl.alloc("gate_up", "gate_up", "[R, 2I]", "R*2*I*b")
    tl.step("act")
    tl.alloc("act", "act_fn(gate)", "[R, I]", "R*I*b", transient=True)
    tl.alloc("activated", "activated", "[R, I]", "R*I*b")
    tl.free("act")
    tl.step("down_proj")
    tl.alloc("outputs", "outputs", "[R, H]", "R*H*b")
    tl.step("combine")
    tl.alloc("zero_row", "new_zeros(1, H)", "[1, H]", "H*b", transient=True)
    tl.alloc("rows_out", "rows_out (the outputs and a zero spare row)", "[R+1, H]", "R*H*b + H*b", recorded_in=None)
    tl.free("zero_row")
    tl.alloc("selected", "rows_out.index_select(0, buffer_rows)", "[T*k, H]", "T*k*H*b", transient=True)
    if w != "b":  # a mixed-dtype multiply makes a float32 copy of the selected rows first
        tl.alloc("selected32", "selected rows as float32", "[T*k, H]", "T*k*H*w", transient=True)
    tl.alloc("pair_outputs", "pair_outputs", "[T*k, H]", f"T*k*H*{w}")
    tl.free("selected32", "selected")
    tl.step("reduce")
    reduce_slots(tl, w)


def shared_expert(tl: Timeline) -> None:
    """SparseMoE's Qwen2-MoE shared expert, after the routed experts returned `output`."""
    tl.step("shared_expert")
    tl.free_all_but("output", *_ROUTER_KEYS)  # the backend has returned: its intermediates are gone
    tl.alloc("gate", "gate_proj(x)", "[T, Is]", "T*Is*b", transient=True)
    tl.alloc("act", "act_fn(gate_proj(x))", "[T, Is]", "T*Is*b", transient=True)
    tl.free("gate")
    tl.alloc("up", "up_proj(x)", "[T, Is]", "T*Is*b", transient=True)
    tl.alloc("gated", "act_fn(gate) * up", "[T, Is]", "T*Is*b", transient=True)
    tl.free("act", "up")
    tl.alloc("shared_output", "shared_output", "[T, H]", "T*H*b")
    tl.free("gated")
    tl.alloc("gate_logit", "shared_expert_gate(x)", "[T, 1]", "T*b", transient=True)
    tl.alloc("shared_gate", "shared_gate", "[T, 1]", "T*b")
    tl.free("gate_logit")
    # after the step: output = output + shared_gate * shared_output
    tl.alloc("scaled", "shared_gate * shared_output", "[T, H]", "T*H*b", transient=True)
    tl.alloc("sum_output", "routed + shared output", "[T, H]", "T*H*b", recorded_in=None)
    tl.free("scaled", "output")
    tl.live["output"] = tl.live.pop("sum_output")


_ROUTER_KEYS = ("router_logits", "router_probs", "top_k_index", "top_k_weights", "normalized", "top_k_probs",
                "dropped", "masked", "kept")
