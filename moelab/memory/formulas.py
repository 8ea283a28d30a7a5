"""Each backend's steps as allocations and frees on a `Timeline`: the router (`route`), `eager`,
`batched_mm`, `grouped_mm`, their `reduce_slots`, and SparseMoE's `shared_expert`. Each function mirrors its
backend's code line by line (edit it side by side with `moelab/backends/*.py`); bytes are formulas in
`T, k, E, H, I, b` (`b` = bytes per element of the layer's dtype).

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


def route(tl: Timeline, dtype: torch.dtype, norm_topk_prob: bool, weights_float32: bool) -> None:
    """TopKRouter.forward + SparseMoE's hold on its outputs (the `route` step)."""
    keep_fp32 = dtype == torch.float32 or weights_float32  # the float32 weights are the ones handed on
    tl.step("route")
    tl.alloc("router_logits", "router_logits", "[T, E]", "T*E*b")
    if dtype != torch.float32:
        tl.alloc("logits32", "router_logits (as float32)", "[T, E]", "T*E*4", transient=True)
    tl.alloc("router_probs", "router_probs", "[T, E]", "T*E*4")
    tl.free("logits32")
    last_fp32 = "top_k_probs"
    name = "top_k_weights" if (not norm_topk_prob and keep_fp32) else "top_k_probs"
    tl.alloc("top_k_probs", name, "[T, k]", "T*k*4", recorded_in=name == "top_k_weights")
    tl.alloc("top_k_index", "top_k_index", "[T, k]", "T*k*8")
    if norm_topk_prob:
        name = "top_k_weights" if keep_fp32 else "top_k_weights (float32)"
        tl.alloc("sum", "sum of top-k probs", "[T, 1]", "T*4", transient=True)
        tl.alloc("normalized", name, "[T, k]", "T*k*4", recorded_in=keep_fp32)
        tl.free("sum", "top_k_probs")
        last_fp32 = "normalized"
    tl.alloc("dropped", "dropped", "[T, k]", "T*k", recorded_in=None)  # all False when dropless: not in the trace
    if not keep_fp32:
        tl.alloc("top_k_weights", "top_k_weights", "[T, k]", "T*k*b")
        tl.free(last_fp32)  # the float32 weights die when the router returns


def eager(tl: Timeline, counts: Sequence[int], w: str) -> None:
    tl.step("expert_mask")
    tl.alloc("output", "output", "[T, H]", "T*H*b", recorded_in="reduce")  # zeros, filled by index_add_
    tl.alloc("expert_mask", "expert_mask", "[E, k, T]", "E*k*T*8")
    tl.alloc("hit_counts", "tokens per expert (sum of the mask)", "[E]", "E*8", transient=True)
    tl.alloc("expert_hit", "expert_hit", "[n]", "n*8", n=sum(1 for c in counts if c))  # n: experts hit
    tl.free("hit_counts")
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


def batched_mm(tl: Timeline, w: str) -> None:
    tl.step("repeat")
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
        tl.free_all_but("output", *_ROUTER_KEYS)
        tl.alloc("output_cast", "output cast to the input dtype", "[T, H]", "T*H*b", recorded_in=None)
        tl.free("output")
        tl.live["output"] = tl.live.pop("output_cast")


def grouped_mm(tl: Timeline, w: str, lean: bool = False, use_workspace: bool = False, act_in_place: bool = False,
               inspected: bool = False) -> None:
    """grouped_mm's plain path, or with `lean` its CPU inference path: `act_in_place` (silu, relu), the large
    buffers from the workspace (`use_workspace`), weighing in place unless `w` (float32 router weights) promotes;
    `inspected`: the lean path with the recorder's copies of what it overwrites (never with the workspace)."""
    promoted = w != "b"  # float32 router weights: weighted, unsorted and the sum are float32
    copies = lean and inspected
    tl.step("sort")
    tl.alloc("argsort_scratch", "argsort scratch (keys and indices)", "[2, T*k]", "2*T*k*8", transient=True)
    tl.alloc("perm", "perm", "[T*k]", "T*k*8")
    tl.free("argsort_scratch")
    tl.alloc("sorted_expert_ids", "sorted_expert_ids", "[T*k]", "T*k*8")
    tl.step("offsets")
    tl.alloc("expert_range", "arange(E) and searchsorted (int64)", "[2, E]", "2*E*8", transient=True)
    tl.alloc("offsets", "offsets", "[E]", "E*4")
    tl.free("expert_range")
    tl.step("gather")
    tl.alloc("token_idx", "token_idx", "[T*k]", "T*k*8")
    if copies and not promoted:  # the unsort writes over sorted_states: the trace keeps a copy
        tl.alloc("sorted_states", "sorted_states", "[T*k, H]", "T*k*H*b", recorded_in="unsort",
                 recorded_as="unsorted")
        tl.alloc("sorted_states_copy", "sorted_states (copy)", "[T*k, H]", "T*k*H*b", copy=True,
                 recorded_as="sorted_states")
    else:
        tl.alloc("sorted_states", "sorted_states", "[T*k, H]", "T*k*H*b", workspace=use_workspace)
    tl.step("up_proj")  # native grouped_mm and the fallback loop both write one [T*k, 2I] result
    if copies and act_in_place:  # the activation writes over gate_up's gate half: the trace keeps a copy
        tl.alloc("gate_up", "gate_up", "[T*k, 2I]", "T*k*2*I*b", recorded_in=None)
        tl.alloc("gate_up_copy", "gate_up (copy)", "[T*k, 2I]", "T*k*2*I*b", copy=True, recorded_as="gate_up")
    else:
        tl.alloc("gate_up", "gate_up", "[T*k, 2I]", "T*k*2*I*b", workspace=use_workspace)
    tl.step("act")
    if lean:  # act_fn in place over the gate half (or a new act_fn(gate)), the product into `activated`
        tl.alloc("activated", "activated", "[T*k, I]", "T*k*I*b", workspace=use_workspace and act_in_place)
    else:
        tl.alloc("act", "act_fn(gate)", "[T*k, I]", "T*k*I*b", transient=True)
        tl.alloc("activated", "activated", "[T*k, I]", "T*k*I*b")
        tl.free("act")
    tl.step("down_proj")
    if copies and not promoted:  # the weighing multiplies outputs in place: the trace keeps a copy
        tl.alloc("outputs", "outputs", "[T*k, H]", "T*k*H*b", recorded_in="weigh", recorded_as="weighted")
        tl.alloc("outputs_copy", "outputs (copy)", "[T*k, H]", "T*k*H*b", copy=True, recorded_as="outputs")
    elif not use_workspace:  # with the workspace, outputs are written over sorted_states
        tl.alloc("outputs", "outputs", "[T*k, H]", "T*k*H*b")
    tl.step("weigh")
    tl.alloc("pair_weights", "top_k_weights in sorted order", "[T*k, 1]", f"T*k*{w}", recorded_in=None)
    if not lean and promoted:  # a mixed-dtype multiply makes a float32 copy of outputs first (the lean path casts)
        tl.alloc("outputs32", "outputs as float32", "[T*k, H]", "T*k*H*w", transient=True)
    if not lean or promoted:  # lean, same dtype: outputs.mul_(pair_weights), in place
        tl.alloc("weighted", "weighted", "[T*k, H]", f"T*k*H*{w}", workspace=use_workspace)
    tl.free("outputs32")
    tl.step("unsort")
    tl.alloc("inv_perm", "inv_perm", "[T*k]", "T*k*8")
    tl.alloc("arange", "arange(T*k) scattered into inv_perm", "[T*k]", "T*k*8", transient=True)
    tl.free("arange")
    if use_workspace or not lean or promoted:  # else the lean path writes over the dead sorted_states
        tl.alloc("unsorted", "unsorted", "[T*k, H]", f"T*k*H*{w}", workspace=use_workspace)
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
                "dropped")
