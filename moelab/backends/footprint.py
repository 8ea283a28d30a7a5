"""The arithmetic the backends' memory estimates share (each registers its own, beside its algorithm, for the
guard of `moelab.core.memory_guard`): the call's sizes and what a call that needs gradients adds.

An estimate counts a backend's big intermediates, those that grow with T, S or E * C, as its code makes them; the
inputs and the weights exist before the call and are not counted. `moelab.memory.analytic` is the exact model;
tests/test_memory_guard.py checks each estimate against it.
"""

from __future__ import annotations

import torch


def call_sizes(experts, hidden_states: torch.Tensor, top_k_index: torch.Tensor) -> tuple[int, ...]:
    """(T, k, E, H, I, b) of one call; b: bytes per element of the layer's dtype."""
    num_experts, two_i, hidden_size = experts.gate_up_proj.shape
    return (hidden_states.shape[0], top_k_index.shape[-1], num_experts, hidden_size, two_i // 2,
            hidden_states.element_size())


def with_backward(forward_bytes: int, saved_bytes: int, experts, itemsize: int) -> int:
    """A call that needs gradients: autograd keeps `saved_bytes` of the forward's tensors until backward, whose
    own working set is about the forward's again, and the weights get gradients (E * 3 * I * H elements)."""
    weight_grads = (experts.gate_up_proj.numel() + experts.down_proj.numel()) * itemsize
    return 2 * forward_bytes + saved_bytes + weight_grads
