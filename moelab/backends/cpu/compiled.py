"""grouped_mm's CPU inference path as one opaque op, `moelab::grouped_mm_lean`, that a compiled `auto` calls.

Why: compiled, grouped_mm's graph makes fresh [S, 2I] and [S, H] buffers on every call; on CPU, once they are
tens of MiB, that costs a page fault per 4 KiB and the uncompiled lean path (in place, in a reused workspace) is
faster. Measured (BENCHMARKS.md, docs/bench/compiled): the lean path wins by 4-13% at 16-64 MiB of gate_up; at
8 MiB the graph's fused elementwise kernels win by 6-8%. Hence `COMPILED_LEAN_MIN_BYTES`.
"""

import torch

from ...core.activations import ACTIVATIONS
from . import workspace
from ..autograd import needs_autograd
from .lean import lean_grouped_mm

# Compiled CPU inference hands grouped_mm to the op once gate_up ([S, 2I]) is this big.
COMPILED_LEAN_MIN_BYTES = 16 * 2 ** 20


class _ExpertsView:
    """The three attributes grouped_mm reads, around plain tensors (inside the custom op)."""

    def __init__(self, gate_up_proj, down_proj, act_fn):
        self.gate_up_proj, self.down_proj, self.act_fn = gate_up_proj, down_proj, act_fn


@torch.library.custom_op("moelab::grouped_mm_lean", mutates_args=())
def _grouped_mm_lean(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                     gate_up_proj: torch.Tensor, down_proj: torch.Tensor, hidden_act: str) -> torch.Tensor:
    """grouped_mm's uncompiled CPU inference path, as one op a compiled graph calls."""
    experts = _ExpertsView(gate_up_proj, down_proj, ACTIVATIONS[hidden_act])
    with torch.no_grad():
        return lean_grouped_mm(experts, hidden_states, top_k_index, top_k_weights)


@_grouped_mm_lean.register_fake
def _(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, hidden_act):
    return torch.empty_like(hidden_states)


def _activation_name(act_fn) -> str | None:
    for name, fn in ACTIVATIONS.items():
        if fn is act_fn:
            return name
    return None


def applies(experts, hidden_states, top_k_index, top_k_weights) -> bool:
    """True when a compiled grouped_mm call should run as the op: compiling, CPU, no autograd graph, a named
    activation, and gate_up of at least `COMPILED_LEAN_MIN_BYTES` (its buffers still fitting the workspace)."""
    if not torch.compiler.is_compiling() or hidden_states.device.type != "cpu":
        return False
    pairs = top_k_index.numel()  # S = T * k
    itemsize = hidden_states.element_size()
    gate_up_bytes = pairs * experts.gate_up_proj.shape[1] * itemsize  # [S, 2I]
    if gate_up_bytes < COMPILED_LEAN_MIN_BYTES or _activation_name(experts.act_fn) is None \
            or not workspace.fits([gate_up_bytes, pairs * experts.gate_up_proj.shape[2] * itemsize]):
        return False
    return not needs_autograd(experts, hidden_states, top_k_weights)  # with autograd the graph is used as is


def grouped_mm_lean(experts, hidden_states, top_k_index, top_k_weights):
    """hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k] -> [T, H] through the op (check `applies`)."""
    return torch.ops.moelab.grouped_mm_lean(hidden_states, top_k_index, top_k_weights, experts.gate_up_proj,
                                            experts.down_proj, _activation_name(experts.act_fn))
