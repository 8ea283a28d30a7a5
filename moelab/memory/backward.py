"""Training memory: what a call that needs gradients keeps from forward to backward, analytic beside measured.

`saved_for_backward(config, T, backend, dtype)` lists the tensors each backend's autograd graph keeps (each
backend's `<name>_saved` formula, beside its algorithm in `moelab.backends`), `measure_saved(fn, ...)` counts what
autograd really kept during `fn()` (`torch.autograd.graph.saved_tensors_hooks`), and `training_peak` models the
peak of a whole step, `layer(x).sum().backward()`, beside `measure` of it (`compare_training`: both, per backend).

Counting: a saved tensor is counted by its storage, once (a view of `gate_up`, such as `gate`, is `gate_up`);
inputs, expert weights and views of them exist before the call: listed with `existing=True`, never counted.
Modelled: silu, gelu and relu experts (each keeps its input, the product keeps both factors) with weights that
require grad; the router (`router=True`) but not a shared expert, nor a dropped mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import nn

from ..backends.batched_mm import batched_mm_saved
from ..backends.block_aligned import BLOCK_SIZE, block_aligned_saved
from ..backends.capacity import capacity_saved
from ..backends.eager import eager_saved
from ..backends.footprint import Saved, saved_bytes
from ..backends.grouped_mm import grouped_mm_saved
from ..core.dtypes import parse_dtype
from ..layer.moe import SparseMoE
from .estimate import MODELLED_BACKENDS, analytic, capacity_factor_of, config_sizes
from .measurement import measure
from .records import format_bytes

_SAVED = {"eager": eager_saved, "batched_mm": batched_mm_saved, "grouped_mm": grouped_mm_saved,
          "capacity": capacity_saved, "block_aligned": block_aligned_saved}


@dataclass(frozen=True)
class SavedForBackward:
    """What `saved_for_backward` returns. tensors: one `Saved` per storage (name, shape, nbytes, existing);
    saved_bytes: the extra bytes kept (the non-existing ones), existing_bytes: the inputs and weights also kept."""

    backend: str
    num_tokens: int
    dtype: torch.dtype
    tensors: tuple[Saved, ...]

    @property
    def saved_bytes(self) -> int:
        return saved_bytes(self.tensors)

    @property
    def existing_bytes(self) -> int:
        return sum(s.nbytes for s in self.tensors if s.existing)

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame([vars(s) for s in self.tensors], columns=["name", "shape", "nbytes", "existing"])

    def __str__(self) -> str:
        lines = [f"{self.backend} at T={self.num_tokens}, {str(self.dtype).removeprefix('torch.')}: autograd keeps "
                 f"{format_bytes(self.saved_bytes)} for backward (besides {format_bytes(self.existing_bytes)} of "
                 "inputs and weights)"]
        lines += [f"  {s.name:<34} {s.shape:<16} {format_bytes(s.nbytes):>10}{'  (exists)' if s.existing else ''}"
                  for s in self.tensors]
        return "\n".join(lines)


def router_saved(T: int, E: int, k: int, norm_topk_prob: bool) -> list[Saved]:
    """TopKRouter.forward under autograd: softmax keeps its float32 probabilities, topk its indices, the
    renormalisation both of its operands (the router's input and weight exist)."""
    saved = [Saved("router_probs", "[T, E] float32", T * E * 4), Saved("top_k_index", "[T, k] int64", T * k * 8)]
    if norm_topk_prob:
        saved += [Saved("top_k_scores", "[T, k] float32", T * k * 4), Saved("sum of top-k", "[T, 1] float32", T * 4)]
    return saved


def saved_for_backward(config, num_tokens: int, backend: str, dtype=torch.float32, *,
                       tokens_per_expert=None, capacity: int | None = None, block_size: int = BLOCK_SIZE,
                       router: bool = True, hidden_grad: bool | None = None, weights_grad: bool = True,
                       training: bool = False) -> SavedForBackward:
    """The tensors `backend`'s autograd graph keeps for backward in one call on `num_tokens` tokens.

    Arguments as `analytic`'s (config, dtype, router; capacity's C: `capacity`, else the largest group of
    `tokens_per_expert`, else balanced; block_aligned's M: `block_size`). hidden_grad: whether the experts' input
    needs a gradient (default: not for a lone `SparseMoE` fed a plain tensor, `router=True`; yes for an `Experts`
    call inside a model); weights_grad: whether `top_k_weights` does (always, under a router). Raises ValueError
    for what is not modelled: a shared expert, a capacity factor in the call's mode (`training`, as `analytic`).
    """
    num_experts, H, I, k, norm_topk_prob, weights_float32, shared = config_sizes(config)
    if backend not in MODELLED_BACKENDS:
        raise ValueError(f"no backward model for experts backend {backend!r}; models exist for "
                         f"{list(MODELLED_BACKENDS)}")
    if router and shared:
        raise ValueError("saved_for_backward does not model a shared expert")
    if router and capacity_factor_of(config, training) is not None:
        raise ValueError("saved_for_backward does not model a dropped mask (a capacity factor in this mode)")
    dtype = parse_dtype(dtype)
    b, T = dtype.itemsize, num_tokens
    w = 4 if weights_float32 else b
    if hidden_grad is None:
        hidden_grad = not router
    kw = {}
    if backend == "capacity":
        if capacity is None:
            counts = ([int(c) for c in tokens_per_expert] if tokens_per_expert is not None else
                      [math.ceil(T * k / num_experts)])
            capacity = max(counts, default=0)
        kw["capacity"] = capacity
    elif backend == "block_aligned":
        kw["block_size"] = block_size
    tensors = _SAVED[backend](T, k, num_experts, H, I, b, hidden_grad=hidden_grad, weights_grad=weights_grad or router,
                              w=w, **kw)
    if router:  # top_k_weights is then the router's output, made in the call: counted
        tensors = router_saved(T, num_experts, k, norm_topk_prob) + [
            Saved(s.name, s.shape, s.nbytes) if s.name == "top_k_weights" else s for s in tensors]
    return SavedForBackward(backend, T, dtype, tuple(tensors))


# ---------------------------------------------------------------------------------------------------- measured


@dataclass
class SavedMeasurement:
    """What `measure_saved` returns: saved_bytes, the distinct storages autograd kept (not the existing ones);
    tensors: (shape, dtype, storage bytes) of each, in the order they were saved; result: what `fn` returned."""

    saved_bytes: int
    tensors: list = field(default_factory=list)
    result: Any = field(default=None, repr=False)


def measure_saved(fn: Callable[[], Any], *existing: torch.Tensor | nn.Module) -> SavedMeasurement:
    """Run `fn()` and count what its autograd graph keeps for backward, by storage, each once.

    existing: tensors (the inputs) and modules (their parameters and buffers) whose storages are not counted,
    nor any view of them (eager's `gate_up_proj[e]`, batched_mm's `expert_ids`).
    """
    kept: list[torch.Tensor] = []

    def pack(tensor):
        kept.append(tensor)  # NOTE: held until counted, so no storage dies and lends its address to another
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = fn()
    skip = set()
    for item in existing:
        tensors = [*item.parameters(), *item.buffers()] if isinstance(item, nn.Module) else [item]
        skip.update(t.untyped_storage().data_ptr() for t in tensors if t.device.type != "meta")
    seen: dict[int, tuple] = {}
    for tensor in kept:
        if tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if storage.nbytes() and ptr not in skip and ptr not in seen:
            seen[ptr] = (tuple(tensor.shape), tensor.dtype, storage.nbytes())
    return SavedMeasurement(sum(entry[2] for entry in seen.values()), list(seen.values()), result)


# ---------------------------------------------------------------------------------------------------- a step


# what a row-chain backend's backward has freed by its down projection (the pairs' weighing and unsorting), and by
# its up projection (the activation's tensors too)
_FREED_BY_DOWN_PROJ = {"outputs", "pair_weights", "inv_perm", "perm", "pair rows (before weighting)"}
_FREED_BY_UP_PROJ = _FREED_BY_DOWN_PROJ | {"gate_up", "act_fn(gate)", "activated"}
_ROUTER_SAVED = {"router_probs", "top_k_index", "top_k_scores", "sum of top-k"}  # freed last: the router runs first
# saved tensors the forward model counts as an expression's temporaries: under autograd they live on
_FORWARD_TRANSIENTS = {"act_fn(gate)", "pair rows (before weighting)"}


@dataclass(frozen=True)
class TrainingPeak:
    """What `training_peak` returns, in bytes. forward_peak: the forward's peak under autograd; saved: kept for
    backward; weight_grads: the gradients of every weight of the call; backward_peak: the backward's peak; peak:
    the larger of the two, reached in `phase` ("forward" or "backward")."""

    backend: str
    forward_peak: int
    saved: int
    weight_grads: int
    backward_peak: int

    @property
    def peak(self) -> int:
        return max(self.forward_peak, self.backward_peak)

    @property
    def phase(self) -> str:
        return "forward" if self.forward_peak >= self.backward_peak else "backward"


def training_peak(config, num_tokens: int, backend: str, dtype=torch.float32, *, tokens_per_expert=None,
                  capacity: int | None = None, block_size: int = BLOCK_SIZE, router: bool = True,
                  hidden_grad: bool | None = None) -> TrainingPeak:
    """The analytic peak of one training step of a call, `layer(x).sum().backward()` with the weights' `.grad`
    unset (the gradients are made in the step), beside `measure` of it. A stage model, not a byte walk.

    forward: `analytic`'s peak (no autograd) plus the saved tensors it counts as freed (eager's per-expert
    tensors, each expression's temporaries). backward, for the row-chain backends (batched_mm, grouped_mm,
    capacity, block_aligned; rows R_ = S, S, E*C, R): the larger of its down projection (what is still saved, the
    pairs' and the rows' gradients, grad(down_proj)) and its up projection (what is still saved, every weight
    gradient, grad(gate_up) [R_, 2I] and with `hidden_grad` grad(rows) [R_, H]); eager: its first expert's
    backward with everything saved, or its end, the per-expert weight gradients beside their stack; eager and
    capacity make a second gate_up_proj-sized gradient at the end. Arguments as `saved_for_backward`'s.
    Measured within 10% in tests/test_memory_backward.py.
    """
    dtype = parse_dtype(dtype)
    E, H, I, k, *_ = config_sizes(config)
    b, T = dtype.itemsize, num_tokens
    kw = {"capacity": capacity, "block_size": block_size}
    saved = saved_for_backward(config, T, backend, dtype, tokens_per_expert=tokens_per_expert, router=router,
                               hidden_grad=hidden_grad, **kw)
    hidden_grad = (not router) if hidden_grad is None else hidden_grad
    estimate = analytic(config, T, backend, dtype, tokens_per_expert=tokens_per_expert, router=router,
                        code_path="plain" if backend == "grouped_mm" else None, **kw)
    expert_grads = E * 3 * I * H * b
    weight_grads = expert_grads + (E * H * b if router else 0)
    counted = [s for s in saved.tensors if not s.existing]

    def still_saved(freed):
        return sum(s.nbytes for s in counted if s.name not in freed)

    # the weight gradients and a second gate_up_proj-sized one, once the experts' tensors are freed: eager stacks
    # its E per-expert gradients; capacity's bmm gives the gradient of a transposed view, which AccumulateGrad
    # copies into the parameter's layout
    stacked = still_saved({s.name for s in counted if s.name not in _ROUTER_SAVED}) + expert_grads + E * 2 * I * H * b
    if backend == "eager":
        busiest = max(estimate.tokens_per_expert or (0,))
        # analytic's peak holds the busiest expert's tensors once: under autograd every expert's saved ones stay
        per_pair = still_saved(_ROUTER_SAVED) / max(T * k, 1)
        forward = estimate.peak_bytes + saved.saved_bytes - int(busiest * per_pair)
        # the first expert's backward with everything still saved; or the end: each weight's E per-expert
        # gradients beside their stack (unbind's backward), gate_up_proj's the larger
        backward = max(saved.saved_bytes + 3 * I * H * b + busiest * 2 * (I + H) * b, stacked)
    else:
        forward = estimate.peak_bytes + sum(s.nbytes for s in counted if s.name in _FORWARD_TRANSIENTS)
        rows = {"batched_mm": T * k, "grouped_mm": T * k, "capacity": estimate.sizes.get("C", 0) * E,
                "block_aligned": estimate.sizes.get("R", 0)}[backend]
        w = 4 if estimate.sizes.get("w") else b
        # the down projection: grad(weighted) [S, H], grad(outputs) [R_, H], grad(activated) [R_, I], grad(down_proj);
        # the up projection: every weight gradient, grad(gate_up) [R_, 2I], with hidden_grad grad(rows) [R_, H]
        down = still_saved(_FREED_BY_DOWN_PROJ) + E * H * I * b + rows * (H + I) * b + T * k * H * w
        up = still_saved(_FREED_BY_UP_PROJ) + weight_grads + rows * (2 * I + (H if hidden_grad else 0)) * b
        backward = max(down, up, stacked if backend == "capacity" else 0)
    return TrainingPeak(backend, forward, saved.saved_bytes, weight_grads, backward)



def compare_training(config, num_tokens: int, dtype=torch.float32, backends=MODELLED_BACKENDS, seed: int = 0):
    """Analytic vs measured per backend for one training step of a `SparseMoE` on CPU, as a pandas table: the
    bytes kept for backward (`saved_for_backward` vs `measure_saved`) and the step's peak (`training_peak` vs
    `measure` of `layer(x).sum().backward()`, the weights' gradients made in the step)."""
    dtype = parse_dtype(dtype)
    x = torch.randn(num_tokens, config.hidden_size, generator=torch.Generator().manual_seed(seed)).to(dtype)
    rows = []
    for backend in backends:
        moe = SparseMoE(config, backend, dtype=dtype, seed=seed)
        with torch.no_grad():
            counts = torch.bincount(moe.router(x).top_k_index.reshape(-1), minlength=config.num_experts)
        saved = measure_saved(lambda: moe(x), moe, x).saved_bytes
        moe(x).sum().backward()  # warm-up
        moe.zero_grad(set_to_none=True)
        step = measure(lambda: moe(x).sum().backward()).peak_bytes
        model = training_peak(config, num_tokens, backend, dtype, tokens_per_expert=counts)
        rows.append({"backend": backend, "num_tokens": num_tokens, "analytic_saved_bytes": model.saved,
                     "measured_saved_bytes": saved, "analytic_step_peak_bytes": model.peak,
                     "measured_step_peak_bytes": step, "step_measured_over_analytic": step / model.peak,
                     "phase": model.phase})
    return pd.DataFrame(rows)
