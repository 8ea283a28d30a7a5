"""`grouped_linear`: rows of `x` grouped by `offsets`, group g multiplied by `weight[g].T`.

Two paths compute the same thing:
- native: `torch.nn.functional.grouped_mm`, one kernel for all groups;
- fallback: a loop of `torch.mm` over the groups (`group_ranges`), wrapped as a `torch.library` custom op with
  autograd, so it works for every size and dtype and `torch.compile(fullgraph=True)` still captures it (as one
  opaque op). Only this loop can write into a given `out` buffer (the native kernel allocates its result).
`matmul_path` says which one runs and why; `force_fallback()` forces the loop so tests cover both.
"""

from __future__ import annotations

import collections
import contextlib

import torch
import torch.nn.functional as F

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


def group_ranges(offsets: torch.Tensor) -> list[tuple[int, int, int]]:
    """offsets [E] (cumulative group ends) -> [(group, start, end)] for every group that has rows."""
    # NOTE: tolist() is one host sync for all the group ends (inside a custom op, invisible to torch.compile)
    ranges, start = [], 0
    for group, end in enumerate(offsets.tolist()):
        if end > start:
            ranges.append((group, start, end))
        start = end
    return ranges


def looped_linear_into(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor,
                       out: torch.Tensor) -> torch.Tensor:
    """The fallback loop: group g of x [S, K] times weight[g].T ([E, N, K]) written into out [S, N]."""
    ranges = group_ranges(offsets)
    for group, start, end in ranges:
        torch.mm(x[start:end], weight[group].t(), out=out[start:end])
    last = ranges[-1][2] if ranges else 0
    if last < out.shape[0]:
        out[last:].zero_()  # rows past the last offset belong to no group (not reached by our callers)
    return out


@torch.library.custom_op("moelab::grouped_linear_fallback", mutates_args=())
def _grouped_linear_fallback(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [S, K], weight [E, N, K], offsets [E] (cumulative group ends) -> [S, N]."""
    return looped_linear_into(x, weight, offsets, x.new_empty(x.shape[0], weight.shape[1]))


@_grouped_linear_fallback.register_fake
def _(x, weight, offsets):
    return x.new_empty(x.shape[0], weight.shape[1])


@torch.library.custom_op("moelab::grouped_linear_weight_grad", mutates_args=())
def _grouped_linear_weight_grad(grad: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """grad [S, N], x [S, K] -> grad of weight [E, N, K]: group g gets grad_g.T @ x_g (zero for empty groups)."""
    grad_weight = grad.new_zeros(offsets.shape[0], grad.shape[1], x.shape[1])  # [E, N, K]
    for group, start, end in group_ranges(offsets):
        torch.mm(grad[start:end].t(), x[start:end], out=grad_weight[group])
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

    With `out` ([S, N], eager, no autograd) the fallback loop writes the groups into it: on CPU that loop is what
    the native kernel runs, minus allocating its result. `out` with `path="native"` raises ValueError.
    """
    if path is None:
        path = "fallback" if out is not None else matmul_path(x, weight)[0]
    if path not in ("native", "fallback"):
        raise ValueError(f"path must be 'native' or 'fallback', got {path!r}")
    if out is not None and path == "native":
        raise ValueError("grouped_linear(out=...) writes through the torch.mm loop (path 'fallback'); the native "
                         "grouped_mm kernel allocates its own result")
    if not torch.compiler.is_compiling():
        PATH_COUNTS[path] += 1
    if out is not None:
        return looped_linear_into(x, weight, offsets, out)
    if path == "native":
        # grouped_mm wants the weight column-major: the transpose of our contiguous [E, N, K] is exactly that
        return F.grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
    return _grouped_linear_fallback(x, weight, offsets)
