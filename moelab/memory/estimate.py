"""`analytic` and `peak_bytes`: the memory model of one MoE call. Checks the config and sizes, picks the code
path (the backend `auto` would choose; grouped_mm's plain path or its CPU fast path, with or without the
workspace, with or without an inspection's copies), runs the backend's formulas (`moelab.memory.formulas`) on a
`Timeline` and packs the result in a `MemoryEstimate`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import formulas
from ..backends.auto import choose
from ..backends.block_aligned import BLOCK_SIZE, padded_rows_bound
from ..backends.capacity import expert_capacity
from ..backends.cpu import lean, workspace
from ..core.activations import get_activation
from ..core.dtypes import parse_dtype
from .records import MemoryEstimate
from .timeline import Timeline

CODE_PATHS = ("plain", lean.CODE_PATH)  # grouped_mm's paths, as its steps' `code_path` names them
# the backends with a memory model (formulas.py)
MODELLED_BACKENDS = ("eager", "batched_mm", "grouped_mm", "capacity", "block_aligned")
BACKENDS = MODELLED_BACKENDS  # its public name since moelab 0.1


def _is_count(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, int)


def config_sizes(config) -> tuple[int, int, int, int, bool, bool, int]:
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
             device: str | torch.device = "cpu", inspected: bool = False, code_path: str | None = None,
             act_in_place: bool | None = None, capacity: int | None = None, training: bool = False,
             block_size: int = BLOCK_SIZE, drops: bool | None = None) -> MemoryEstimate:
    """The memory model of one MoE call of `backend` on `num_tokens` tokens (liveness model: `memory.formulas`).

    backend: one of `MODELLED_BACKENDS` ("eager", "batched_mm", "grouped_mm", "capacity", "block_aligned"), or
    "auto" (modelled as the backend it picks for T*k pairs; `requested_backend` then says "auto").

    config: a `MoEConfig` (E, H, I, k; `norm_topk_prob`, `top_k_weights_float32` and a shared expert are modelled
    too: symbols `w` = 4, the float32 weighted pairs, and `Is`, the shared expert's width); dtype: the layer's
    dtype; router: count the router's tensors (a `SparseMoE` call) or not (an `Experts` call).

    Drops. training: the mode of the call, which picks the capacity factor (`config.capacity_factor` in training,
    `config.eval_capacity_factor` in eval, the default). drops: whether a `dropped` mask reaches the experts (their
    drop-aware paths, and `Experts` zeroing the dropped weights); None: as `SparseMoE` does, exactly when the
    config has a capacity factor in that mode (with `router=True` it must be so; the router's ranking of the
    pairs, `drop_pairs` with `config.drop_policy`, is then modelled too). With drops, grouped_mm takes its plain
    path and computes only the kept pairs (symbol `Sk`).
    tokens_per_expert: pairs per expert, the kept ones with drops (sum T*k without, at most T*k with). Exact
    counts make eager's peak exact, and grouped_mm's with drops (Sk = their sum); default balanced (the first
    T*k mod E experts get one pair more), each capped at the capacity C when a capacity factor applies.
    capacity (symbol `C`, the rows of each expert in capacity's [E, C, H] buffer), in this order: the `capacity`
    argument when given (e.g. a trace's `positions` step, `info["capacity"]`); else, with drops and a capacity
    factor f in the mode, `min(ceil(f*T*k/E), T)` as the backend computes it; else (dropless) the largest group,
    `max(tokens_per_expert)` when given, else the balanced `ceil(T*k/E)`. block_size: block_aligned's M (symbols
    `M`, and `R` = T*k + E*(M-1), its static row bound); it does not depend on the routing.

    Which of grouped_mm's paths: `code_path` "plain" (a call with autograd, or off CPU) or "cpu_lean" (CPU
    inference), by default the one a no-grad call on `device` takes; the fast path takes the workspace when
    `moelab.backends.cpu.workspace.fits` its buffers, and applies the activation in place when
    `act_in_place` (default: when the backend can for `config.hidden_act`). `inspected=True` (what
    `trace.memory` uses, with the path the trace recorded) models a call under `moelab.inspect`: the fast path
    then takes no workspace and the recorder's copies of what it overwrites are added. Not modelled: the
    router's `router_jitter` noise and `expert_bias` scores. Returns a `MemoryEstimate`; its `peak_bytes` is a
    plain int. Costs O(E) Python operations.
    """
    num_experts, hidden, inter, top_k, norm_topk_prob, weights_float32, shared = config_sizes(config)
    if not _is_count(num_tokens) or num_tokens < 0:
        raise ValueError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
    dtype = parse_dtype(dtype)
    factor = capacity_factor_of(config, training)
    if drops is None:
        drops = factor is not None
    elif router and bool(drops) != (factor is not None):
        raise ValueError(f"with router=True the experts get a dropped mask exactly when the config has a capacity "
                         f"factor in {'training' if training else 'eval'} mode (here {factor}); got drops={drops}")
    drops = bool(drops)
    requested = None
    if backend == "auto":  # the backend `auto` would pick for these T*k pairs (its crossover table decides)
        requested = backend
        backend = choose(num_tokens * top_k, dtype, torch.device(device).type, compiled=False,
                         num_experts=num_experts, drops=drops)[0]
    if backend not in MODELLED_BACKENDS:
        raise ValueError(f"no memory model for experts backend {backend!r}; models exist for {list(MODELLED_BACKENDS)} "
                         "and 'auto'")
    if not _is_count(block_size) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1 (rows per block, M), got {block_size!r}")
    if capacity is not None and (not _is_count(capacity) or capacity < 0):
        raise ValueError(f"capacity must be None or an int >= 0 (rows per expert, C), got {capacity!r}")
    itemsize = dtype.itemsize
    sizes = {"T": num_tokens, "k": top_k, "E": num_experts, "H": hidden, "I": inter, "b": itemsize}
    # w: bytes per element of the weighted pairs: float32 when the router hands on float32 weights (Mixtral)
    w = "w" if weights_float32 and dtype.itemsize < 4 else "b"
    if w == "w":
        sizes["w"] = 4
    if shared and router:
        sizes["Is"] = shared
    pairs = num_tokens * top_k
    # the capacity a factor gives, as capacity_experts computes it (no expert holds more than T pairs)
    factor_capacity = (min(expert_capacity(factor, num_tokens, top_k, num_experts), num_tokens)
                       if drops and factor is not None else None)
    counts = None
    if tokens_per_expert is not None:
        counts = tuple(int(c) for c in (tokens_per_expert.tolist() if isinstance(tokens_per_expert, torch.Tensor)
                                        else tokens_per_expert))
        total_ok = sum(counts) <= pairs if drops else sum(counts) == pairs
        if len(counts) != num_experts or not total_ok or min(counts, default=0) < 0:
            target = f"at most T*k = {pairs} (the kept pairs)" if drops else f"T*k = {pairs}"
            raise ValueError(f"tokens_per_expert must be {num_experts} counts >= 0 summing to {target}, "
                             f"got {list(counts)}")
    computed = counts
    if computed is None:  # balanced: the first T*k mod E experts get one pair more; a capacity keeps at most C
        computed = tuple(pairs // num_experts + (e < pairs % num_experts) for e in range(num_experts))
        if factor_capacity is not None:
            computed = tuple(min(c, factor_capacity) for c in computed)

    on_cpu = torch.device(device).type == "cpu"
    if code_path is None:
        code_path = lean.CODE_PATH if on_cpu and not drops else "plain"
    if code_path not in CODE_PATHS or (code_path == lean.CODE_PATH and not on_cpu):
        raise ValueError(f"code_path must be one of {list(CODE_PATHS)} ({lean.CODE_PATH!r} only on CPU) or None, "
                         f"got {code_path!r} on {torch.device(device).type}")
    if code_path == lean.CODE_PATH and drops and backend == "grouped_mm":
        raise ValueError("grouped_mm takes its plain path when a dropped mask is passed: code_path 'cpu_lean' "
                         "cannot apply with drops")
    if drops:
        sizes["Sk"] = sum(computed)
    if backend == "capacity":
        sizes["C"] = _buffer_capacity(capacity, factor_capacity, counts, computed, num_experts)
    if backend == "block_aligned":
        sizes["M"] = block_size
        sizes["R"] = padded_rows_bound(pairs, num_experts, block_size)

    tl = Timeline(sizes)
    path = "plain"
    if router:
        formulas.route(tl, dtype, norm_topk_prob, weights_float32, drops, getattr(config, "drop_policy", "position"),
                       top_k)
    if backend == "eager":
        formulas.eager(tl, computed, w, drops)
    elif backend == "batched_mm":
        formulas.batched_mm(tl, w, drops)
    elif backend == "capacity":
        formulas.capacity(tl, w, drops)
    elif backend == "block_aligned":
        formulas.block_aligned(tl, w, drops)
    else:
        fast = code_path == lean.CODE_PATH
        if act_in_place is None:
            act_in_place = get_activation(getattr(config, "hidden_act", "silu")) in lean.IN_PLACE_ACTIVATIONS
        use_workspace = fast and not inspected and workspace.fits(lean.workspace_buffers(
            pairs, hidden, inter, itemsize, 4 if w == "w" else itemsize, act_in_place))
        if fast:
            path = code_path + (" + workspace" if use_workspace else "") + (" + copies" if inspected else "")
        formulas.grouped_mm(tl, w, fast, use_workspace, fast and act_in_place, inspected, drops)
    if shared and router:
        formulas.shared_expert(tl)
    tl.finish()
    output_bytes = num_tokens * hidden * itemsize
    return MemoryEstimate(
        backend=backend, num_tokens=num_tokens, dtype=dtype, sizes=sizes,
        intermediates=tuple(tl.intermediates), steps=tuple(tl.steps), peak_bytes=int(tl.peak),
        peak_step=tl.peak_step, retained_bytes=output_bytes,
        weight_bytes=num_experts * 3 * inter * hidden * itemsize,
        duplicated_bytes=pairs * 3 * inter * hidden * itemsize if backend == "batched_mm" else 0,
        tokens_per_expert=computed if counts is not None or drops or backend in ("eager", "capacity") else None,
        path=path,
        workspace_bytes=tl.workspace, extra_peak_bytes=int(tl.extra_peak), requested_backend=requested)


def capacity_factor_of(config, training: bool) -> float | None:
    """The capacity factor of a call in this mode (None: dropless), as `MoEConfig.capacity_factor_for` says."""
    factor_for = getattr(config, "capacity_factor_for", None)
    if callable(factor_for):
        return factor_for(bool(training))
    return getattr(config, "capacity_factor" if training else "eval_capacity_factor", None)


def _buffer_capacity(capacity, factor_capacity, counts, computed, num_experts) -> int:
    """C of capacity's buffer, in the order `analytic` documents; checks that the groups fit."""
    largest = max(computed, default=0)
    if capacity is None:
        capacity = factor_capacity if factor_capacity is not None else largest
    if counts is not None and largest > capacity:
        raise ValueError(f"tokens_per_expert has a group of {largest} pairs but the capacity is C = {capacity}; "
                         "capacity's buffer holds at most C pairs per expert")
    return capacity


def peak_bytes(config, num_tokens: int, backend: str, dtype=torch.float32, **kwargs) -> int:
    """`analytic(...).peak_bytes`: the bytes one call needs at its peak, as a plain int (for memory guards)."""
    return analytic(config, num_tokens, backend, dtype, **kwargs).peak_bytes
