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
from ..backends.cpu import lean, workspace
from ..core.activations import get_activation
from ..core.dtypes import parse_dtype
from .records import MemoryEstimate
from .timeline import Timeline

CODE_PATHS = ("plain", lean.CODE_PATH)  # grouped_mm's paths, as its steps' `code_path` names them
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
             device: str | torch.device = "cpu", inspected: bool = False, code_path: str | None = None,
             act_in_place: bool | None = None) -> MemoryEstimate:
    """The memory model of one MoE call of `backend` on `num_tokens` tokens (liveness model: `memory.formulas`).

    backend: "eager", "batched_mm", "grouped_mm", or "auto" (modelled as the backend it picks for T*k pairs;
    `requested_backend` then says "auto").

    config: a `MoEConfig` (E, H, I, k; `norm_topk_prob`, `top_k_weights_float32` and a shared expert are modelled
    too: symbols `w` = 4, the float32 weighted pairs, and `Is`, the shared expert's width); dtype: the layer's
    dtype; tokens_per_expert: pairs per expert (eager only: makes its peak exact; default balanced); router:
    count the router's tensors (a `SparseMoE` call) or not (an `Experts` call).
    Which of grouped_mm's paths: `code_path` "plain" (a call with autograd, or off CPU) or "cpu_lean" (CPU
    inference), by default the one a no-grad call on `device` takes; the fast path takes the workspace when
    `moelab.backends.cpu.workspace.fits` its buffers, and applies the activation in place when
    `act_in_place` (default: when the backend can for `config.hidden_act`). `inspected=True` (what
    `trace.memory` uses, with the path the trace recorded) models a call under `moelab.inspect`: the fast path
    then takes no workspace and the recorder's copies of what it overwrites are added. Returns a
    `MemoryEstimate`; its `peak_bytes` is a plain int. Costs O(E) Python operations.
    """
    num_experts, hidden, inter, top_k, norm_topk_prob, weights_float32, shared = _sizes(config)
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
        raise ValueError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
    dtype = parse_dtype(dtype)
    requested = None
    if backend == "auto":  # the backend `auto` would pick for these T*k pairs (its crossover table decides)
        requested = backend
        backend = choose(num_tokens * top_k, dtype, torch.device(device).type, compiled=False,
                         num_experts=num_experts)[0]
    if backend not in MODELLED_BACKENDS:
        raise ValueError(f"no memory model for experts backend {backend!r}; models exist for {list(MODELLED_BACKENDS)} "
                         "and 'auto'")
    itemsize = dtype.itemsize
    sizes = {"T": num_tokens, "k": top_k, "E": num_experts, "H": hidden, "I": inter, "b": itemsize}
    # w: bytes per element of the weighted pairs: float32 when the router hands on float32 weights (Mixtral)
    w = "w" if weights_float32 and dtype.itemsize < 4 else "b"
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

    on_cpu = torch.device(device).type == "cpu"
    if code_path is None:
        code_path = lean.CODE_PATH if on_cpu else "plain"
    if code_path not in CODE_PATHS or (code_path == lean.CODE_PATH and not on_cpu):
        raise ValueError(f"code_path must be one of {list(CODE_PATHS)} ({lean.CODE_PATH!r} only on CPU) or None, "
                         f"got {code_path!r} on {torch.device(device).type}")

    tl = Timeline(sizes)
    path = "plain"
    if router:
        formulas.route(tl, dtype, norm_topk_prob, weights_float32)
    if backend == "eager":
        if counts is None:  # balanced: the first T*k mod E experts get one pair more
            counts = tuple(pairs // num_experts + (e < pairs % num_experts) for e in range(num_experts))
        formulas.eager(tl, counts, w)
    elif backend == "batched_mm":
        formulas.batched_mm(tl, w)
    else:
        fast = code_path == lean.CODE_PATH
        if act_in_place is None:
            act_in_place = get_activation(getattr(config, "hidden_act", "silu")) in lean.IN_PLACE_ACTIVATIONS
        use_workspace = fast and not inspected and workspace.fits(lean.workspace_buffers(
            pairs, hidden, inter, itemsize, 4 if w == "w" else itemsize, act_in_place))
        if fast:
            path = code_path + (" + workspace" if use_workspace else "") + (" + copies" if inspected else "")
        formulas.grouped_mm(tl, w, fast, use_workspace, fast and act_in_place, inspected)
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
        tokens_per_expert=counts, path=path, workspace_bytes=tl.workspace, extra_peak_bytes=int(tl.extra_peak),
        requested_backend=requested)


def peak_bytes(config, num_tokens: int, backend: str, dtype=torch.float32, **kwargs) -> int:
    """`analytic(...).peak_bytes`: the bytes one call needs at its peak, as a plain int (for memory guards)."""
    return analytic(config, num_tokens, backend, dtype, **kwargs).peak_bytes
