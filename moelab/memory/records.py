"""What `moelab.memory.analytic` returns: `MemoryEstimate`, one row per intermediate (`Intermediate`) and per
step (`StepMemory`), its text and HTML renderings, plus `format_bytes` (binary units).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..core.memory_guard import format_bytes  # noqa: F401  (its home is core; memory exports it)


@dataclass(frozen=True)
class Intermediate:
    """One tensor a backend makes during a call.

    step: the step during which it is allocated; name: its tensor key in the trace when it is recorded
    (`recorded_in` says in which step; None when no step records it, e.g. eager's `gate_up`);
    shape: symbolic, e.g. "[T*k, 2I, H]"; formula: its bytes in `T, k, E, H, I, b` (and `n`, the pairs of one
    expert, for eager's per-expert tensors); nbytes: the formula evaluated; transient: an expression's temporary,
    freed within its step; n: the expert's pair count where the formula uses it; workspace: held in grouped_mm's
    reusable CPU workspace (allocated by the first such call and kept, see `moelab.backends.cpu.workspace`).
    recorded_as: the key the trace first sees its storage under in `recorded_in`, when not `name` (memory the
    fast path reuses: its own tensor was recorded as a copy, the storage shows up under the tensor written over
    it); copy: a copy an inspection's recorder takes of it (the trace's memory, kept alive by the trace).
    """

    step: str
    step_index: int
    name: str
    shape: str
    formula: str
    nbytes: int
    transient: bool = False
    recorded_in: str | None = None
    n: int | None = None
    workspace: bool = False
    recorded_as: str | None = None
    copy: bool = False


@dataclass(frozen=True)
class StepMemory:
    """Per step: new bytes (tensors made and kept), transient bytes, bytes live at its end, highest live inside."""

    index: int
    step: str
    detail: str
    new_bytes: int
    transient_bytes: int
    live_bytes: int
    peak_bytes: int


@dataclass(frozen=True)
class MemoryEstimate:
    """What `analytic` returns: the memory model of one MoE call.

    peak_bytes (int): the analytic peak of live bytes during the call, workspace buffers included (what the call
    needs: use it for memory guards); peak_step: the step where it is reached. path: which code path was modelled
    ("plain": every step makes new tensors; grouped_mm's CPU inference path "cpu_lean", "+ workspace" when its
    large buffers come from the reusable workspace, "+ copies" when inspected, with the copies the recorder
    keeps of what the path overwrites). workspace_bytes: the reused buffers; extra_peak_bytes: the peak without
    them, i.e. what a call adds once a first call has made the workspace (compare it with `measure` of a
    warmed-up call); copied_bytes: the recorder's copies. retained_bytes: still live after the call (the output).
    weight_bytes: the layer's own expert weights (`gate_up_proj` + `down_proj`, `E*3*I*H*b`). duplicated_bytes:
    batched_mm's per-pair weight copies (`T*k*3*I*H*b`, 0 for the other backends) and duplication_factor =
    duplicated_bytes / weight_bytes (`T*k/E`). sizes: the symbols of the formulas. intermediates / steps: the
    tables, also as `to_frame()`.
    """

    backend: str
    num_tokens: int
    dtype: torch.dtype
    sizes: dict
    intermediates: tuple[Intermediate, ...]
    steps: tuple[StepMemory, ...]
    peak_bytes: int
    peak_step: str
    retained_bytes: int
    weight_bytes: int
    duplicated_bytes: int
    tokens_per_expert: tuple[int, ...] | None = None
    path: str = "plain"
    workspace_bytes: int = 0
    extra_peak_bytes: int | None = None
    requested_backend: str | None = None  # "auto" when `auto` chose `backend`

    @property
    def copied_bytes(self) -> int:
        """Bytes of the copies an inspection's recorder keeps (0 unless an inspected fast path is modelled)."""
        return sum(i.nbytes for i in self.intermediates if i.copy)

    @property
    def duplication_factor(self) -> float:
        return self.duplicated_bytes / self.weight_bytes

    def step_bytes(self, step: str, *, recorded: bool = False) -> int:
        """Bytes of the named (non-transient) tensors allocated in `step`; with `recorded`, those the trace
        records there (by `recorded_in`) instead."""
        if recorded:
            return sum(i.nbytes for i in self.intermediates if i.recorded_in == step)
        return sum(i.nbytes for i in self.intermediates if i.step == step and not i.transient)

    def to_frame(self, per: str = "tensor"):
        """A pandas table: one row per intermediate (`per="tensor"`) or per step (`per="step"`)."""
        import pandas as pd

        if per == "tensor":
            rows = [dataclasses.asdict(i) for i in self.intermediates]
            return pd.DataFrame(rows, columns=[f.name for f in dataclasses.fields(Intermediate)])
        if per == "step":
            return pd.DataFrame([dataclasses.asdict(s) for s in self.steps],
                                columns=[f.name for f in dataclasses.fields(StepMemory)])
        raise ValueError(f"per must be 'tensor' or 'step', got {per!r}")

    def _headline(self) -> str:
        s = self.sizes
        chosen = f"auto -> {self.backend}" if self.requested_backend == "auto" else self.backend
        text = (f"{chosen} at T={s['T']}, k={s['k']}, E={s['E']}, H={s['H']}, I={s['I']}, "
                f"{str(self.dtype).removeprefix('torch.')}{'' if self.path == 'plain' else f', {self.path} path'}: "
                f"analytic peak "
                f"{format_bytes(self.peak_bytes)} (at '{self.peak_step}'); expert weights {format_bytes(self.weight_bytes)}")
        if self.workspace_bytes:
            text += (f"; {format_bytes(self.workspace_bytes)} of the peak is the reused workspace "
                     f"(a warmed-up call adds {format_bytes(self.extra_peak_bytes)})")
        if self.copied_bytes:
            text += f"; {format_bytes(self.copied_bytes)} are the recorder's copies of overwritten tensors"
        if self.duplicated_bytes:
            text += (f"; duplicated weights {format_bytes(self.duplicated_bytes)} = "
                     f"{self.duplication_factor:.3g}x the expert weights")
        return text

    def __repr__(self) -> str:
        return f"MemoryEstimate({self._headline()})"

    def __str__(self) -> str:
        lines = [self._headline(), f"{'step':<12} {'detail':<22} {'new':>11} {'transient':>11} {'live':>11} {'peak':>11}"]
        for st in self.steps:
            lines.append(f"{st.step:<12} {st.detail:<22} {format_bytes(st.new_bytes):>11} "
                         f"{format_bytes(st.transient_bytes):>11} {format_bytes(st.live_bytes):>11} "
                         f"{format_bytes(st.peak_bytes):>11}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        import html

        return f"<p>{html.escape(self._headline())}</p>" + self.to_frame("step").to_html(index=False)
