"""The walk behind `moelab.memory.analytic`: a `Timeline` takes the allocations and frees a backend's formulas
(`moelab.memory.formulas`) list, in program order, evaluates each byte formula over the call's sizes, and keeps
the per-step table, the running peak and the bytes held in grouped_mm's reusable workspace.
"""

from __future__ import annotations

import functools

from .records import Intermediate, StepMemory


@functools.lru_cache(maxsize=None)
def _compiled(formula: str):
    return compile(formula, formula, "eval")  # our own formula strings, never user input


class Timeline:
    """Walks allocations and frees in program order; keeps the per-step table and the running peak.

    Two kinds of allocation are never freed: workspace buffers (the workspace keeps them between calls) and the
    copies an inspection's recorder takes (the trace keeps them)."""

    def __init__(self, sizes: dict):
        self.sizes = sizes
        self.live: dict[str, int] = {}
        self.current = 0
        self.peak = 0
        self.peak_step = ""
        self.workspace = 0  # live bytes held in the reusable workspace
        self.held_keys: set[str] = set()  # never freed: workspace buffers and the recorder's copies
        self.extra_peak = 0  # peak of live bytes outside it
        self.intermediates: list[Intermediate] = []
        self.steps: list[StepMemory] = []
        self._step: str | None = None

    def step(self, name: str, detail: str = "") -> None:
        self._close()
        self._step, self._detail = name, detail
        self._new = self._transient = 0
        self._step_peak = self.current

    def _close(self) -> None:
        if self._step is not None:
            self.steps.append(StepMemory(len(self.steps), self._step, self._detail, self._new, self._transient,
                                         self.current, self._step_peak))

    def alloc(self, key: str, name: str, shape: str, formula: str, *, transient: bool = False,
              recorded_in: str | None | bool = True, n: int | None = None, workspace: bool = False,
              recorded_as: str | None = None, copy: bool = False) -> None:
        """`key` names the allocation for `free`; the other arguments are `Intermediate`'s fields (`recorded_in`
        True: this step)."""
        nbytes = int(eval(_compiled(formula), {"__builtins__": {}}, {**self.sizes, "n": n}))
        recorded = self._step if recorded_in is True else (recorded_in or None)
        self.intermediates.append(Intermediate(self._step, len(self.steps), name, shape, formula, nbytes,
                                               transient, None if transient else recorded, n, workspace,
                                               recorded_as, copy))
        if workspace:
            self.workspace += nbytes
        if workspace or copy:
            self.held_keys.add(key)
        if transient:
            self._transient += nbytes
        else:
            self._new += nbytes
        self.live[key] = nbytes
        self.current += nbytes
        if self.current > self._step_peak:
            self._step_peak = self.current
        if self.current > self.peak:
            self.peak, self.peak_step = self.current, self._step
        self.extra_peak = max(self.extra_peak, self.current - self.workspace)

    def free(self, *keys: str) -> None:
        for key in keys:
            if key in self.live and key not in self.held_keys:
                self.current -= self.live.pop(key)

    def free_all_but(self, *keep: str) -> None:
        self.free(*[key for key in self.live if key not in keep])

    def finish(self) -> None:
        self._close()
        self._step = None
