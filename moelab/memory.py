"""Memory of one MoE call: an analytic model per backend, and the measured peak.

`analytic(config, num_tokens, backend, dtype)` lists every intermediate a backend's code makes, with its bytes
as a formula of `(T, k, E, H, I, b)` (`b` = bytes per element of `dtype`), and walks them in program order to
find the analytic peak. `measure(fn)` runs `fn()` and reports the peak of the *extra* memory it took.

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
- two paths through grouped_mm: an inspected call (and any call with autograd, under compile or off CPU) takes
  the plain path, where every step makes the new tensors the trace shows (`inspected=True`); CPU inference takes
  its lean path (`moelab.backends.grouped_mm.lean_path`): act and weigh in place, unsort over `sorted_states`,
  and, when a buffer reaches `workspace.MIN_BYTES`, the large buffers from the reusable workspace
  (`moelab.backends.workspace`), kept between calls: in `peak_bytes`, not in `extra_peak_bytes`;
- `eager` loops over the hit experts: its peak depends on how many pairs each expert got. Pass the real counts
  (`tokens_per_expert`, e.g. from a trace's `route` step) for an exact figure; by default routing is balanced
  (`T*k/E` pairs per expert).

`measure` on CPU walks `torch.profiler`'s memory events (every allocation and free of PyTorch's CPU allocator,
in order) and returns the highest running total: the reliable tensor-level figure. The process's peak RSS agrees
with it for large allocations (32 MiB and more) but also counts memory outside PyTorch's allocator (the profiler's
own, libraries' workspaces) and pages never touched are not resident. On CUDA it reads
`torch.cuda.max_memory_allocated` around the call. Both exclude memory allocated before the call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

__all__ = [
    "Intermediate", "StepMemory", "MemoryEstimate", "MemoryMeasurement", "BACKENDS",
    "analytic", "peak_bytes", "measure", "compare", "format_bytes",
]

BACKENDS = ("eager", "batched_mm", "grouped_mm")  # the backends with a memory model


def format_bytes(num_bytes: float) -> str:
    """1536 -> '1.5 KiB'; binary units, as `torch.cuda.memory_summary` prints them."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; pass a torch.dtype such as torch.float32")
        return resolved
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype or its name, got {type(dtype).__name__} {dtype!r}")
    return dtype


@dataclass(frozen=True)
class Intermediate:
    """One tensor a backend makes during a call.

    step: the step during which it is allocated; name: its tensor key in the trace when it is recorded
    (`recorded_in` says in which step; None when no step records it, e.g. eager's `gate_up`);
    shape: symbolic, e.g. "[T*k, 2I, H]"; formula: its bytes in `T, k, E, H, I, b` (and `n`, the pairs of one
    expert, for eager's per-expert tensors); nbytes: the formula evaluated; transient: an expression's temporary,
    freed within its step; n: the expert's pair count where the formula uses it; workspace: held in grouped_mm's
    reusable CPU workspace (allocated by the first such call and kept, see `moelab.backends.workspace`).
    """

    step: str
    step_index: int
    name: str
    shape: str
    formula: str
    nbytes: int
    transient: bool = False
    recorded_in: str | None = None
    n: int | None = None
    workspace: bool = False


@dataclass(frozen=True)
class StepMemory:
    """Per step: new bytes (tensors made and kept), transient bytes, bytes live at its end, highest live inside."""

    index: int
    step: str
    detail: str
    new_bytes: int
    transient_bytes: int
    live_bytes: int
    peak_bytes: int


@dataclass(frozen=True)
class MemoryEstimate:
    """What `analytic` returns: the memory model of one MoE call.

    peak_bytes (int): the analytic peak of live bytes during the call, workspace buffers included (what the call
    needs: use it for memory guards); peak_step: the step where it is reached. path: which code path was modelled
    ("plain": every step makes new tensors, as an inspected call; grouped_mm's CPU inference "lean" path, "+
    workspace" when its large buffers come from the reusable workspace). workspace_bytes: those reused buffers;
    extra_peak_bytes: the peak without them, i.e. what a call adds once a first call has made the workspace
    (compare it with `measure` of a warmed-up call). retained_bytes: still live after the call (the output). weight_bytes: the layer's own expert
    weights (`gate_up_proj` + `down_proj`, `E*3*I*H*b`). duplicated_bytes: batched_mm's per-pair weight copies
    (`T*k*3*I*H*b`, 0 for the other backends) and duplication_factor = duplicated_bytes / weight_bytes
    (`T*k/E`). sizes: the symbols of the formulas. intermediates / steps: the tables, also as `to_frame()`.
    """

    backend: str
    num_tokens: int
    dtype: torch.dtype
    sizes: dict
    intermediates: tuple[Intermediate, ...]
    steps: tuple[StepMemory, ...]
    peak_bytes: int
    peak_step: str
    retained_bytes: int
    weight_bytes: int
    duplicated_bytes: int
    tokens_per_expert: tuple[int, ...] | None = None
    path: str = "plain"
    workspace_bytes: int = 0
    extra_peak_bytes: int | None = None
    requested_backend: str | None = None  # "auto" when `auto` chose `backend`

    @property
    def duplication_factor(self) -> float:
        return self.duplicated_bytes / self.weight_bytes

    def step_bytes(self, step: str, *, recorded: bool = False) -> int:
        """Bytes of the named (non-transient) tensors allocated in `step`; with `recorded`, those the trace
        records there (by `recorded_in`) instead."""
        if recorded:
            return sum(i.nbytes for i in self.intermediates if i.recorded_in == step)
        return sum(i.nbytes for i in self.intermediates if i.step == step and not i.transient)

    def to_frame(self, per: str = "tensor"):
        """A pandas table: one row per intermediate (`per="tensor"`) or per step (`per="step"`)."""
        import pandas as pd

        if per == "tensor":
            rows = [dataclasses.asdict(i) for i in self.intermediates]
            return pd.DataFrame(rows, columns=[f.name for f in dataclasses.fields(Intermediate)])
        if per == "step":
            return pd.DataFrame([dataclasses.asdict(s) for s in self.steps],
                                columns=[f.name for f in dataclasses.fields(StepMemory)])
        raise ValueError(f"per must be 'tensor' or 'step', got {per!r}")

    def _headline(self) -> str:
        s = self.sizes
        chosen = f"auto -> {self.backend}" if self.requested_backend == "auto" else self.backend
        text = (f"{chosen} at T={s['T']}, k={s['k']}, E={s['E']}, H={s['H']}, I={s['I']}, "
                f"{str(self.dtype).removeprefix('torch.')}{'' if self.path == 'plain' else f', {self.path} path'}: "
                f"analytic peak "
                f"{format_bytes(self.peak_bytes)} (at '{self.peak_step}'); expert weights {format_bytes(self.weight_bytes)}")
        if self.workspace_bytes:
            text += (f"; {format_bytes(self.workspace_bytes)} of the peak is the reused workspace "
                     f"(a warmed-up call adds {format_bytes(self.extra_peak_bytes)})")
        if self.duplicated_bytes:
            text += (f"; duplicated weights {format_bytes(self.duplicated_bytes)} = "
                     f"{self.duplication_factor:.3g}x the expert weights")
        return text

    def __repr__(self) -> str:
        return f"MemoryEstimate({self._headline()})"

    def __str__(self) -> str:
        lines = [self._headline(), f"{'step':<12} {'detail':<22} {'new':>11} {'transient':>11} {'live':>11} {'peak':>11}"]
        for st in self.steps:
            lines.append(f"{st.step:<12} {st.detail:<22} {format_bytes(st.new_bytes):>11} "
                         f"{format_bytes(st.transient_bytes):>11} {format_bytes(st.live_bytes):>11} "
                         f"{format_bytes(st.peak_bytes):>11}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        import html

        return f"<p>{html.escape(self._headline())}</p>" + self.to_frame("step").to_html(index=False)


@functools.lru_cache(maxsize=None)
def _compiled(formula: str):
    return compile(formula, formula, "eval")  # our own formula strings, never user input


class _Timeline:
    """Walks allocations and frees in program order; keeps the per-step table and the running peak."""

    def __init__(self, sizes: dict):
        self.sizes = sizes
        self.live: dict[str, int] = {}
        self.current = 0
        self.peak = 0
        self.peak_step = ""
        self.workspace = 0  # live bytes held in the reusable workspace
        self.workspace_keys: set[str] = set()  # never freed: the workspace keeps its buffers between calls
        self.extra_peak = 0  # peak of live bytes outside it
        self.intermediates: list[Intermediate] = []
        self.steps: list[StepMemory] = []
        self._step: str | None = None

    def step(self, name: str, detail: str = "") -> None:
        self._close()
        self._step, self._detail = name, detail
        self._new = self._transient = 0
        self._step_peak = self.current

    def _close(self) -> None:
        if self._step is not None:
            self.steps.append(StepMemory(len(self.steps), self._step, self._detail, self._new, self._transient,
                                         self.current, self._step_peak))

    def alloc(self, key: str, name: str, shape: str, formula: str, *, transient: bool = False,
              recorded_in: str | None | bool = True, n: int | None = None, workspace: bool = False) -> None:
        nbytes = int(eval(_compiled(formula), {"__builtins__": {}}, {**self.sizes, "n": n}))
        recorded = self._step if recorded_in is True else (recorded_in or None)
        self.intermediates.append(Intermediate(self._step, len(self.steps), name, shape, formula, nbytes,
                                               transient, None if transient else recorded, n, workspace))
        if workspace:
            self.workspace += nbytes
            self.workspace_keys.add(key)
        if transient:
            self._transient += nbytes
        else:
            self._new += nbytes
        self.live[key] = nbytes
        self.current += nbytes
        if self.current > self._step_peak:
            self._step_peak = self.current
        if self.current > self.peak:
            self.peak, self.peak_step = self.current, self._step
        self.extra_peak = max(self.extra_peak, self.current - self.workspace)

    def free(self, *keys: str) -> None:
        for key in keys:
            if key in self.live and key not in self.workspace_keys:
                self.current -= self.live.pop(key)

    def free_all_but(self, *keep: str) -> None:
        self.free(*[key for key in self.live if key not in keep])

    def finish(self) -> None:
        self._close()
        self._step = None


def _route(tl: _Timeline, dtype: torch.dtype, norm_topk_prob: bool, weights_float32: bool) -> None:
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
    if not keep_fp32:
        tl.alloc("top_k_weights", "top_k_weights", "[T, k]", "T*k*b")
        tl.free(last_fp32)  # the float32 weights die when the router returns


def _eager(tl: _Timeline, counts: Sequence[int], w: str) -> None:
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
        tl.alloc("new_outputs", "outputs", "[n, H]", f"n*H*{w}", n=n)
        tl.free("weights", "unweighted")
        if w != "b":  # float32 outputs are cast to the output's dtype for index_add_
            tl.alloc("cast", "outputs cast to the input dtype", "[n, H]", "n*H*b", transient=True, n=n)
            tl.free("cast")
        for key in ("top_k_pos", "token_idx", "tokens", "gate_up", "outputs"):
            tl.live[key] = tl.live.pop(f"new_{key}")
    tl.step("reduce")  # index_add_ wrote into `output` all along


def _batched_mm(tl: _Timeline, w: str) -> None:
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
    tl.alloc("weighted", "weighted", "[T*k, H]", f"T*k*H*{w}")
    tl.step("reduce")
    _reduce(tl, w)


def _reduce(tl: _Timeline, w: str) -> None:
    tl.alloc("output", "output", "[T, H]", f"T*H*{w}")
    if w != "b":  # the backend returns (its locals die), then Experts.forward casts the float32 sum back
        tl.free_all_but("output", *_ROUTER_KEYS)
        tl.alloc("output_cast", "output cast to the input dtype", "[T, H]", "T*H*b", recorded_in=None)
        tl.free("output")
        tl.live["output"] = tl.live.pop("output_cast")


def _grouped_mm(tl: _Timeline, w: str, lean: bool, use_workspace: bool, act_in_place: bool) -> None:
    """grouped_mm; `lean`: its CPU inference path (in-place act and weighing, unsort over sorted_states);
    `use_workspace`: the large buffers come from `moelab.backends.workspace` instead of fresh allocations."""
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
    tl.alloc("sorted_states", "sorted_states", "[T*k, H]", "T*k*H*b", workspace=use_workspace)
    tl.step("up_proj")  # native grouped_mm and the fallback loop both write one [T*k, 2I] result
    tl.alloc("gate_up", "gate_up", "[T*k, 2I]", "T*k*2*I*b", workspace=use_workspace)
    tl.step("act")
    if not act_in_place:
        tl.alloc("act", "act_fn(gate)", "[T*k, I]", "T*k*I*b", transient=True)
        tl.alloc("activated", "activated", "[T*k, I]", "T*k*I*b")
        tl.free("act")
    # else: act_fn(gate).mul_(up) writes `activated` over the gate half of gate_up: no new bytes
    tl.step("down_proj")
    if not use_workspace:  # with the workspace, outputs are written over sorted_states
        tl.alloc("outputs", "outputs", "[T*k, H]", "T*k*H*b")
    tl.step("weigh")
    tl.alloc("pair_weights", "top_k_weights in sorted order", "[T*k, 1]", f"T*k*{w}", recorded_in=None)
    if not lean:  # lean: outputs.mul_(pair_weights), in place, in the input dtype
        tl.alloc("weighted", "weighted", "[T*k, H]", f"T*k*H*{w}")
    elif w != "b":  # in place with float32 weights: PyTorch computes in float32 copies, then casts back
        tl.alloc("outputs32", "outputs as float32", "[T*k, H]", "T*k*H*w", transient=True)
        tl.alloc("product32", "outputs * pair_weights in float32", "[T*k, H]", "T*k*H*w", transient=True)
        tl.free("outputs32", "product32")
    tl.step("unsort")
    tl.alloc("inv_perm", "inv_perm", "[T*k]", "T*k*8")
    tl.alloc("arange", "arange(T*k) scattered into inv_perm", "[T*k]", "T*k*8", transient=True)
    tl.free("arange")
    if use_workspace:
        tl.alloc("unsorted", "unsorted", "[T*k, H]", "T*k*H*b", workspace=True)
    elif not lean:  # lean without workspace: index_select writes over the dead sorted_states
        tl.alloc("unsorted", "unsorted", "[T*k, H]", f"T*k*H*{w}")
    tl.step("reduce")
    _reduce(tl, "b" if lean else w)


def _shared_expert(tl: _Timeline) -> None:
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


_ROUTER_KEYS = ("router_logits", "router_probs", "top_k_index", "top_k_weights", "normalized", "top_k_probs")


def _sizes(config) -> tuple[int, int, int, int, bool, bool, int]:
    try:
        return (int(config.num_experts), int(config.hidden_size), int(config.intermediate_size),
                int(config.top_k), bool(getattr(config, "norm_topk_prob", True)),
                bool(getattr(config, "top_k_weights_float32", False)),
                int(getattr(config, "shared_expert_intermediate_size", 0) or 0))
    except AttributeError:
        raise ValueError("config must be a moelab.MoEConfig (or have num_experts, hidden_size, "
                         f"intermediate_size and top_k), got {type(config).__name__}") from None


def analytic(config, num_tokens: int, backend: str, dtype=torch.float32, *,
             tokens_per_expert: Sequence[int] | torch.Tensor | None = None, router: bool = True,
             device: str | torch.device = "cpu", inspected: bool = False) -> MemoryEstimate:
    """The memory model of one MoE call of `backend` on `num_tokens` tokens (see the module docstring).

    backend: "eager", "batched_mm", "grouped_mm", or "auto" (modelled as the backend it picks for T*k pairs;
    `requested_backend` then says "auto").

    config: a `MoEConfig` (E, H, I, k; `norm_topk_prob`, `top_k_weights_float32` and a shared expert are modelled
    too: symbols `w` = 4, the float32 weighted pairs, and `Is`, the shared expert's width); dtype: the layer's dtype; tokens_per_expert: pairs per expert (eager only:
    makes its peak exact; default balanced); router: count the router's tensors (a `SparseMoE` call) or not (an
    `Experts` call). device, inspected: which code path runs: an uninspected no-grad call on CPU takes
    grouped_mm's lean path (and its workspace, when `moelab.backends.workspace.fits` its buffers); an inspected
    call (`inspected=True`, what `trace.memory` uses) or another device takes the plain path, where every step
    makes the new tensors the trace shows. Returns a `MemoryEstimate`; its `peak_bytes` is a plain int. Costs
    O(E) Python operations.
    """
    num_experts, hidden, inter, top_k, norm_topk_prob, weights_float32, shared = _sizes(config)
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
        raise ValueError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
    dtype = _dtype(dtype)
    requested = None
    if backend == "auto":  # the backend `auto` would pick for these T*k pairs (its crossover table decides)
        requested, backend = backend, _auto_choice(num_tokens * top_k, dtype, device, num_experts)
    if backend not in BACKENDS:
        raise ValueError(f"no memory model for experts backend {backend!r}; models exist for {list(BACKENDS)} "
                         "and 'auto'")
    itemsize = dtype.itemsize
    sizes = {"T": num_tokens, "k": top_k, "E": num_experts, "H": hidden, "I": inter, "b": itemsize}
    # w: bytes per element of the weighted pairs: float32 when the router hands on float32 weights (Mixtral)
    w = "w" if weights_float32 and dtype != torch.float32 else "b"
    if w == "w":
        sizes["w"] = 4
    if shared and router:
        sizes["Is"] = shared
    pairs = num_tokens * top_k
    counts = None
    if tokens_per_expert is not None:
        counts = tuple(int(c) for c in (tokens_per_expert.tolist() if isinstance(tokens_per_expert, torch.Tensor)
                                        else tokens_per_expert))
        if len(counts) != num_experts or sum(counts) != pairs or min(counts, default=0) < 0:
            raise ValueError(f"tokens_per_expert must be {num_experts} counts >= 0 summing to T*k = {pairs}, "
                             f"got {list(counts)}")

    tl = _Timeline(sizes)
    path = "plain"
    if router:
        _route(tl, dtype, norm_topk_prob, weights_float32)
    if backend == "eager":
        if counts is None:  # balanced: the first T*k mod E experts get one pair more
            counts = tuple(pairs // num_experts + (e < pairs % num_experts) for e in range(num_experts))
        _eager(tl, counts, w)
    elif backend == "batched_mm":
        _batched_mm(tl, w)
    else:
        lean = not inspected and torch.device(device).type == "cpu"
        use_workspace = lean and _workspace_fits(
            [pairs * hidden * itemsize, pairs * 2 * inter * itemsize, pairs * hidden * itemsize])
        path = ("lean + workspace" if use_workspace else "lean") if lean else "plain"
        _grouped_mm(tl, w, lean, use_workspace, lean and _act_in_place(getattr(config, "hidden_act", "silu")))
    if shared and router:
        _shared_expert(tl)
    tl.finish()
    output_bytes = num_tokens * hidden * itemsize
    return MemoryEstimate(
        backend=backend, num_tokens=num_tokens, dtype=dtype, sizes=sizes,
        intermediates=tuple(tl.intermediates), steps=tuple(tl.steps), peak_bytes=int(tl.peak),
        peak_step=tl.peak_step, retained_bytes=output_bytes,
        weight_bytes=num_experts * 3 * inter * hidden * itemsize,
        duplicated_bytes=pairs * 3 * inter * hidden * itemsize if backend == "batched_mm" else 0,
        tokens_per_expert=counts, path=path, workspace_bytes=tl.workspace, extra_peak_bytes=int(tl.extra_peak),
        requested_backend=requested)


def _auto_choice(pairs: int, dtype: torch.dtype, device, num_experts: int) -> str:
    try:
        from .backends.auto import choose
    except ImportError:  # pragma: no cover - a moelab without `auto`
        raise ValueError("no experts backend 'auto' in this moelab") from None
    return choose(pairs, dtype, torch.device(device).type, compiled=False, num_experts=num_experts)[0]


def _workspace_fits(nbytes_each: list[int]) -> bool:
    """The backend's own rule for taking buffers from the workspace (False if there is none)."""
    try:
        from .backends import workspace
    except ImportError:  # pragma: no cover - a moelab without the workspace
        return False
    return workspace.fits(nbytes_each)


def _act_in_place(hidden_act: str) -> bool:
    """Whether grouped_mm's lean path applies this activation in place (its own table decides)."""
    try:
        from .activations import get_activation
        from .backends.grouped_mm import _INPLACE_ACT
    except ImportError:  # pragma: no cover - a grouped_mm without in-place activations
        return False
    return get_activation(hidden_act) in _INPLACE_ACT


def peak_bytes(config, num_tokens: int, backend: str, dtype=torch.float32, **kwargs) -> int:
    """`analytic(...).peak_bytes`: the bytes one call needs at its peak, as a plain int (for memory guards)."""
    return analytic(config, num_tokens, backend, dtype, **kwargs).peak_bytes


@dataclass
class MemoryMeasurement:
    """What `measure` returns.

    peak_bytes: the highest extra live bytes during the call (above what was allocated before it);
    retained_bytes: extra bytes still live when `fn` returned, its result included; device; method: how it was
    measured; timeline: (nanoseconds since the first event, live extra bytes) after each allocation or free
    (CPU only, else empty); result: what `fn` returned.
    """

    peak_bytes: int
    retained_bytes: int
    device: str
    method: str
    timeline: list = field(default_factory=list, repr=False)
    result: Any = field(default=None, repr=False)

    def __str__(self) -> str:
        return (f"measured peak {format_bytes(self.peak_bytes)} (retained {format_bytes(self.retained_bytes)}) "
                f"on {self.device}, by {self.method}")


@contextlib.contextmanager
def quiet_stderr():
    """Silence C-level writes to file descriptor 2 for the block (torch.profiler's kineto prints
    `USDT: ... profiler_start` lines there, with timestamps, which would land in a notebook's output).
    Python-level `sys.stderr` (warnings, tracebacks) is not affected inside a kernel."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable fd 2: nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def measure(fn: Callable[[], Any], device: str | torch.device = "cpu") -> MemoryMeasurement:
    """Run `fn()` once and measure the peak of the extra memory it takes on `device` ("cpu" or "cuda[:i]").

    Wrap the call in `torch.no_grad()` to compare with `analytic` (an autograd graph keeps more alive).
    CPU: `torch.profiler` memory events, summed in order (a profiled run is slower; the bytes are exact).
    CUDA: `torch.cuda.max_memory_allocated` minus the allocated bytes before the call.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        retained = torch.cuda.memory_allocated(device) - before
        return MemoryMeasurement(max(peak, 0), retained, str(device), "torch.cuda.max_memory_allocated",
                                 [], result)
    if device.type != "cpu":
        raise ValueError(f"measure supports 'cpu' and 'cuda' devices, got {device}")

    from torch.profiler import ProfilerActivity, profile

    # NOTE: kineto prints `USDT: ... profiler_start/stop` lines straight to fd 2; in a notebook they would land in
    # some cell's output, so the profiler's start and stop run with fd 2 silenced (fn itself is not).
    with quiet_stderr():
        prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        prof.__enter__()
    try:
        result = fn()  # kept until profiling stops, so retained_bytes includes it
    finally:
        with quiet_stderr():
            prof.__exit__(None, None, None)
    # NOTE: `prof.events()` attributes allocations to the op that made them and keeps only unattributed frees
    # as "[memory]" events; the raw kineto events keep every allocation and free, in order.
    try:
        raw = prof.profiler.kineto_results.events()
    except AttributeError:  # pragma: no cover - a torch whose profiler moved its results
        raise RuntimeError(f"torch {torch.__version__}'s profiler does not expose its raw memory events "
                           "(profiler.kineto_results); moelab.memory.measure cannot measure CPU memory") from None
    events = [e for e in raw if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    events.sort(key=lambda e: e.start_ns())  # stable: same-timestamp events keep their record order
    live = peak = 0
    timeline = []
    start = events[0].start_ns() if events else 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
        timeline.append((event.start_ns() - start, live))
    return MemoryMeasurement(peak, live, "cpu", "torch.profiler memory events", timeline, result)


def compare(config, num_tokens: int, dtype=torch.float32, backends: Sequence[str] = BACKENDS, seed: int = 0):
    """Analytic vs measured peak of one `SparseMoE` call per backend, as a pandas table (CPU, no_grad).

    Each layer runs once first (a warm-up that also makes grouped_mm's workspace), then is measured; eager's
    analytic figure uses the call's real tokens per expert. Columns: backend, num_tokens, path,
    analytic_peak_bytes (workspace included), workspace_bytes, analytic_extra_peak_bytes (without it),
    measured_peak_bytes, measured_over_analytic (measured / analytic_extra_peak_bytes).
    """
    import pandas as pd

    from .moe import SparseMoE

    dtype = _dtype(dtype)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, config.hidden_size, generator=generator).to(dtype)
    rows = []
    for backend in backends:
        moe = SparseMoE(config, backend, dtype=dtype, seed=seed)
        with torch.no_grad():
            _, routing = moe(x, return_router_output=True)  # warm-up, and the routing eager's model needs
            counts = torch.bincount(routing.top_k_index.reshape(-1), minlength=config.num_experts)
            del routing
            measured = measure(lambda: moe(x)).peak_bytes
        estimate = analytic(config, num_tokens, backend, dtype,
                            tokens_per_expert=counts if backend == "eager" else None)
        rows.append({"backend": backend, "num_tokens": num_tokens, "path": estimate.path,
                     "analytic_peak_bytes": estimate.peak_bytes, "workspace_bytes": estimate.workspace_bytes,
                     "analytic_extra_peak_bytes": estimate.extra_peak_bytes, "measured_peak_bytes": measured,
                     "measured_over_analytic": measured / estimate.extra_peak_bytes})
    return pd.DataFrame(rows)
