"""`analytic` and `peak_bytes`: the memory model of one MoE call. Checks the config and sizes, picks the code
path (the backend `auto` would choose; grouped_mm's plain or lean path, with or without the workspace), runs the
backend's formulas (`moelab.memory.formulas`) on a `_Timeline` and packs the result in a `MemoryEstimate`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .formulas import _batched_mm, _eager, _grouped_mm, _route, _shared_expert
from ..core.dtypes import parse_dtype
from .records import MemoryEstimate
from .timeline import _Timeline

MODELLED_BACKENDS = ("eager", "batched_mm", "grouped_mm")  # the backends with a memory model (formulas.py)
BACKENDS = MODELLED_BACKENDS  # its public name since moelab 0.1


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
    """The memory model of one MoE call of `backend` on `num_tokens` tokens (liveness model: `memory.formulas`).

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
    dtype = parse_dtype(dtype)
    requested = None
    if backend == "auto":  # the backend `auto` would pick for these T*k pairs (its crossover table decides)
        requested, backend = backend, _auto_choice(num_tokens * top_k, dtype, device, num_experts)
    if backend not in MODELLED_BACKENDS:
        raise ValueError(f"no memory model for experts backend {backend!r}; models exist for {list(MODELLED_BACKENDS)} "
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
        from ..backends.auto import choose
    except ImportError:  # pragma: no cover - a moelab without `auto`
        raise ValueError("no experts backend 'auto' in this moelab") from None
    return choose(pairs, dtype, torch.device(device).type, compiled=False, num_experts=num_experts)[0]


def _workspace_fits(nbytes_each: list[int]) -> bool:
    """The backend's own rule for taking buffers from the workspace (False if there is none)."""
    try:
        from ..backends.cpu import workspace
    except ImportError:  # pragma: no cover - a moelab without the workspace
        return False
    return workspace.fits(nbytes_each)


def _act_in_place(hidden_act: str) -> bool:
    """Whether grouped_mm's lean path applies this activation in place (its own table decides)."""
    try:
        from ..core.activations import get_activation
        from ..backends.grouped_mm import _INPLACE_ACT
    except ImportError:  # pragma: no cover - a grouped_mm without in-place activations
        return False
    return get_activation(hidden_act) in _INPLACE_ACT


def peak_bytes(config, num_tokens: int, backend: str, dtype=torch.float32, **kwargs) -> int:
    """`analytic(...).peak_bytes`: the bytes one call needs at its peak, as a plain int (for memory guards)."""
    return analytic(config, num_tokens, backend, dtype, **kwargs).peak_bytes
