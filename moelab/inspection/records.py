"""The records a trace is made of: a `Call` per MoE layer call, holding the `Step`s its backend emitted.

Plain data with lookups (`call["sort"]`, `step["perm"]`) and pandas views; how they print lives in `render`, their
memory model in `accounting`, and how they are filled in `recorder` (import them as `from moelab.inspection
import Step, Call`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from ..memory import MemoryEstimate, SavedForBackward
from .accounting import call_estimate, call_saved
from .render import describe, call_text, calls_html, step_html, step_text


@dataclass(eq=False)
class Step:
    """One step a backend emitted.

    name, explanation: as the backend gave them (one sentence for a learner); layer, stage, decode_step, backend:
    of the call it belongs to; call, index: the call's position in the trace and the step's position in the call.
    tensors: the tensors the step produced, the backend's own objects (meta-device stand-ins with the same shape and
    dtype when the trace was made with `keep_tensors=False`); derived: the keys (in `tensors` or `info`) made only for
    display (e.g. `tokens_per_expert` where the backend never computes it); info: non-tensor context (`expert_id`,
    `path`, `code_path`).
    new_bytes: bytes of storage first seen in this call at this step (parameters and the layer's inputs excluded).
    copied: the keys whose tensor is a copy taken at this step, because the backend overwrites the original later
    (grouped_mm's CPU fast path reusing memory); editing a copy in a callback changes nothing.
    """

    name: str
    explanation: str
    layer: str
    stage: str | None
    decode_step: int | None
    backend: str | None
    call: int
    index: int
    tensors: dict[str, torch.Tensor]
    derived: frozenset = frozenset()
    info: dict[str, Any] = field(default_factory=dict)
    new_bytes: int = 0
    copied: frozenset = frozenset()

    def __getitem__(self, key: str):
        """A tensor (or context value) of this step by key."""
        if key in self.tensors:
            return self.tensors[key]
        if key in self.info:
            return self.info[key]
        raise KeyError(f"step {self.name!r} has no {key!r}; it has {list(self.tensors) + list(self.info)}")

    def __contains__(self, key: str) -> bool:
        return key in self.tensors or key in self.info

    @property
    def nbytes(self) -> int:
        """Bytes of the step's tensors (derived views excluded; views of one storage counted per view)."""
        return sum(t.nbytes for k, t in self.tensors.items() if k not in self.derived)

    def to_frame(self):
        """A pandas table: one row per tensor (and context value) with shape, dtype, bytes, `derived` and `copied`."""
        rows = []
        for key, value in [*self.tensors.items(), *self.info.items()]:
            shape, dtype, nbytes = describe(value)
            rows.append({"key": key, "shape": shape, "dtype": dtype, "bytes": nbytes, "derived": key in self.derived,
                         "copied": key in self.copied})
        return pd.DataFrame(rows, columns=["key", "shape", "dtype", "bytes", "derived", "copied"])

    def __repr__(self) -> str:
        return step_text(self)

    def _repr_html_(self) -> str:
        return step_html(self)


@dataclass(eq=False)
class Call:
    """One call of one MoE layer: its `layer` name (qualified name in the inspected module), the generation
    `stage` ("prefill", "decode", or None for a plain forward) and `decode_step`, the experts `backend`, and its
    `steps` in order; `code_path` which of the backend's paths ran. `num_tokens`, `dtype` and `sizes` (E, H, I, k)
    feed the analytic memory model; `needs_grad` (autograd recorded the call), `hidden_grad` and `weights_grad`
    (its input and its top_k_weights required grad) the model of what it keeps for backward."""

    index: int
    layer: str
    stage: str | None
    decode_step: int | None
    backend: str | None
    steps: list[Step] = field(default_factory=list)
    num_tokens: int | None = None
    dtype: torch.dtype | None = None
    sizes: dict | None = None
    has_router: bool = False
    needs_grad: bool = False
    hidden_grad: bool = False
    weights_grad: bool = True

    def __getitem__(self, name: str) -> Step:
        """The one step called `name` in this call (KeyError if none; LookupError if several, e.g. eager's
        `expert`: use `find`)."""
        found = self.find(name)
        if len(found) == 1:
            return found[0]
        if not found:
            raise KeyError(f"call {self.index} ({self.layer}) has no step {name!r}; its steps are "
                           f"{[s.name for s in self.steps]}")
        raise LookupError(f"call {self.index} ({self.layer}) has {len(found)} steps named {name!r} (positions "
                          f"{[s.index for s in found]}); use call.find({name!r})")

    def find(self, name: str) -> list[Step]:
        return [s for s in self.steps if s.name == name]

    @property
    def code_path(self) -> str | None:
        """Which of its backend's code paths ran, as its steps say: grouped_mm's "plain" or "cpu_lean" (its CPU
        inference fast path); None for a backend with one path."""
        return next((s.info["code_path"] for s in self.steps if "code_path" in s.info), None)

    def memory_estimate(self) -> MemoryEstimate | None:
        """The analytic memory model of this call (None for a backend without one, or unknown sizes)."""
        return call_estimate(self)

    def saved_for_backward(self) -> SavedForBackward | None:
        """What this call's autograd graph keeps for backward, analytic (`moelab.memory.saved_for_backward`); None
        for a call without gradients, a backend without a model, or what the model leaves out (drops, a shared
        expert)."""
        return call_saved(self)

    def __repr__(self) -> str:
        return call_text(self)

    def _repr_html_(self) -> str:
        return calls_html([self])
