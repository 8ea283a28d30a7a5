"""The arithmetic the backends' memory estimates share (each registers its own, beside its algorithm, for the
guard of `moelab.core.memory_guard`): the call's sizes, the tensors a call that needs gradients keeps for backward
(`Saved`), and what such a call adds (`with_backward`).

An estimate counts a backend's big intermediates, those that grow with T, S or E * C, as its code makes them; the
inputs and the weights exist before the call and are not counted. `moelab.memory.analytic` is the exact model of
the forward, `moelab.memory.saved_for_backward` presents each backend's `<name>_saved` list; tests/test_memory_guard.py
and tests/test_memory_backward.py check them against the model and against what autograd really keeps.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Saved:
    """One tensor a backend's autograd graph keeps from forward to backward (one storage, counted once).

    name: the backend's name for it; shape: symbolic ("[S, 2I]"); nbytes: its storage's bytes; existing: an input,
    an expert weight or a view of one, which exists before the call: listed, never counted in `saved_bytes`.
    """

    name: str
    shape: str
    nbytes: int
    existing: bool = False


def saved_bytes(saved: Iterable[Saved]) -> int:
    """The extra bytes autograd keeps for backward: the storages that are not inputs or weights."""
    return sum(s.nbytes for s in saved if not s.existing)


def existing_weights(E: int, H: int, I: int, b: int) -> list[Saved]:
    """The expert weights every backend's matmuls keep for the input gradients (they exist anyway)."""
    return [Saved("gate_up_proj", "[E, 2I, H]", E * 2 * I * H * b, existing=True),
            Saved("down_proj", "[E, H, I]", E * H * I * b, existing=True)]


def call_sizes(experts, hidden_states: torch.Tensor, top_k_index: torch.Tensor) -> tuple[int, ...]:
    """(T, k, E, H, I, b) of one call; b: bytes per element of the layer's dtype."""
    num_experts, two_i, hidden_size = experts.gate_up_proj.shape
    return (hidden_states.shape[0], top_k_index.shape[-1], num_experts, hidden_size, two_i // 2,
            hidden_states.element_size())


def with_backward(forward_bytes: int, saved: Iterable[Saved], experts, itemsize: int, rows: int,
                  gradient_copies: int = 1) -> int:
    """A call that needs gradients (the stage model of `moelab.memory.training_peak`, rounded up): the forward's
    intermediates beside everything autograd keeps (`saved`, the backend's `<name>_saved`), or, in backward, what
    is kept, the weights' gradients (`gradient_copies` = 2 where a second copy of them is made: eager stacks its
    per-expert ones, capacity's come in a transposed layout) and the gradients of one stage of `rows` activation
    rows ([rows, 2I], [rows, I], [rows, H] twice)."""
    kept = saved_bytes(saved)
    weight_grads = (experts.gate_up_proj.numel() + experts.down_proj.numel()) * itemsize
    hidden_size, inter = experts.gate_up_proj.shape[2], experts.gate_up_proj.shape[1] // 2
    stage = rows * (3 * inter + 2 * hidden_size) * itemsize
    return max(forward_bytes + kept, kept + gradient_copies * weight_grads + stage)
