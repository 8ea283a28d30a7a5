"""`grouped_linear`: rows of `x` grouped by `offsets`, group g multiplied by `weight[g].T`.

Two paths compute the same thing:
- native: `torch.nn.functional.grouped_mm`, one kernel for all groups (torch >= 2.9);
- fallback: a loop of `torch.mm`, wrapped as a `torch.library` custom op with autograd, so it works for every
  size and dtype and `torch.compile(fullgraph=True)` still captures it (as one opaque op).
`matmul_path` says which one runs and why; `force_fallback()` forces the loop so tests cover both.
"""

from __future__ import annotations

import collections
import contextlib

import torch

_native_grouped_mm = getattr(torch.nn.functional, "grouped_mm", None)
_NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

PATH_COUNTS: collections.Counter = collections.Counter()  # eager-mode calls per path, for tests and notebooks
_force_fallback = False


@contextlib.contextmanager
def force_fallback(enabled: bool = True):
    """Within this block grouped_mm takes the looped `torch.mm` fallback even where the kernel could run."""
    global _force_fallback
    previous, _force_fallback = _force_fallback, enabled
    try:
        yield
    finally:
        _force_fallback = previous


def matmul_path(x: torch.Tensor, weight: torch.Tensor) -> tuple[str, str]:
    """("native" | "fallback", reason) for `grouped_linear(x [S, K], weight [E, N, K], ...)`."""
    if _native_grouped_mm is None:
        return "fallback", "torch.nn.functional.grouped_mm is missing (torch < 2.9)"
    if _force_fallback:
        return "fallback", "forced by moelab.backends.force_fallback()"
    if x.dtype not in _NATIVE_DTYPES:
        return "fallback", f"the kernel does not take {x.dtype}"
    if x.device.type != "cpu" and x.dtype != torch.bfloat16:
        return "fallback", f"the {x.device.type} kernel takes only bfloat16"
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return "fallback", "compiled grouped_mm takes only bfloat16"
    itemsize = x.element_size()
    in_features, out_features = weight.shape[2], weight.shape[1]
    if (in_features * itemsize) % 16 or (out_features * itemsize) % 16:
        return "fallback", f"row strides of {in_features} and {out_features} elements are not multiples of 16 bytes"
    if not torch.compiler.is_compiling() and (x.data_ptr() % 16 or weight.data_ptr() % 16):
        return "fallback", "data pointers are not 16-byte aligned"
    return "native", "torch.nn.functional.grouped_mm"


@torch.library.custom_op("moelab::grouped_linear_fallback", mutates_args=())
def _grouped_linear_fallback(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [S, K], weight [E, N, K], offsets [E] (cumulative group ends) -> [S, N]."""
    out = x.new_zeros(x.shape[0], weight.shape[1])  # [S, N]
    start = 0
    # NOTE: tolist() syncs with the host; inside a custom op that is invisible to torch.compile.
    for group, end in enumerate(offsets.tolist()):
        if end > start:
            torch.mm(x[start:end], weight[group].t(), out=out[start:end])
        start = end
    return out


@_grouped_linear_fallback.register_fake
def _(x, weight, offsets):
    return x.new_empty(x.shape[0], weight.shape[1])


@torch.library.custom_op("moelab::grouped_linear_weight_grad", mutates_args=())
def _grouped_linear_weight_grad(grad: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """grad [S, N], x [S, K] -> grad of weight [E, N, K]: group g gets grad_g.T @ x_g."""
    grad_weight = grad.new_zeros(offsets.shape[0], grad.shape[1], x.shape[1])  # [E, N, K]
    start = 0
    for group, end in enumerate(offsets.tolist()):
        if end > start:
            torch.mm(grad[start:end].t(), x[start:end], out=grad_weight[group])
        start = end
    return grad_weight


@_grouped_linear_weight_grad.register_fake
def _(grad, x, offsets):
    return grad.new_empty(offsets.shape[0], grad.shape[1], x.shape[1])


def _setup_context(ctx, inputs, output):
    x, weight, offsets = inputs
    ctx.save_for_backward(x, weight, offsets)


def _backward(ctx, grad):
    x, weight, offsets = ctx.saved_tensors
    grad = grad.contiguous()
    grad_x = grad_weight = None
    if ctx.needs_input_grad[0]:
        grad_x = _grouped_linear_fallback(grad, weight.transpose(1, 2), offsets)  # [S, K]: grad_g @ weight[g]
    if ctx.needs_input_grad[1]:
        grad_weight = _grouped_linear_weight_grad(grad, x, offsets)  # [E, N, K]
    return grad_x, grad_weight, None


_grouped_linear_fallback.register_autograd(_backward, setup_context=_setup_context)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, path: str | None = None,
                   out: torch.Tensor | None = None):
    """x [S, K] sorted by group, weight [E, N, K], offsets [E] int32 -> [S, N]; `path` from `matmul_path`.

    With `out` ([S, N], CPU, no autograd) the groups are written into it by a loop of `torch.mm(out=...)`:
    on CPU that loop is exactly what the native `grouped_mm` kernel runs, minus allocating its result.
    """
    if out is not None:
        if not torch.compiler.is_compiling():
            PATH_COUNTS["loop_out"] += 1
        return _grouped_linear_into(x, weight, offsets, out)
    if path is None:
        path = matmul_path(x, weight)[0]
    if not torch.compiler.is_compiling():
        PATH_COUNTS[path] += 1
    if path == "native":
        # grouped_mm wants the weight column-major: the transpose of our contiguous [E, N, K] is exactly that
        return _native_grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
    return _grouped_linear_fallback(x, weight, offsets)


def _grouped_linear_into(x, weight, offsets, out):
    """The eager-only loop behind `grouped_linear(..., out=)`: group g of `x` times `weight[g].T` into `out`."""
    start = 0
    # NOTE: one host sync for all the group ends; a group with no rows costs nothing.
    for group, end in enumerate(offsets.tolist()):
        if end > start:
            torch.mm(x[start:end], weight[group].t(), out=out[start:end])
        start = end
    if start < out.shape[0]:
        out[start:].zero_()  # rows past the last offset belong to no group (not reached by our callers)
    return out
