"""Step-by-step traces of MoE layers: which steps each backend ran, with the very tensors it made.

    with moelab.inspect(moe) as trace:        # a SparseMoE, an Experts module or a whole model
        y = moe(x)
    trace.calls                               # one Call per MoE layer call: layer, stage, decode_step, backend
    trace.steps                               # every step of every call, in order
    trace["sort"].tensors["perm"]             # the tensor grouped_mm sorted with (not a copy)
    trace.memory                              # recorded bytes per step beside the analytic model's
    trace.to_frame()                          # a pandas table of the steps

How it works: backends call `moelab.record_step(name, explanation, **tensors)`, a no-op unless a recorder is
registered. `inspect` registers one for the duration of the block, plus forward hooks on the MoE layers inside
the inspected module (`SparseMoE`, `Experts`, or anything with an `experts_implementation`), so every step lands in
the `Call` of the layer that made it; steps emitted outside an inspected layer are counted in
`trace.unattributed` and not kept. On exit everything is removed (also on error): with no inspection active,
nothing is recorded and nothing is kept alive.

Callbacks: `inspect(module, on={"route": fn})` or `trace.subscribe("route", fn)` run `fn(step)` synchronously when
the step is emitted, with the backend's own tensors: editing one in place changes what the backend computes next.

Compiled code records nothing: `record_step` is a no-op while `torch.compile` traces, and hooks would break the
graph, so compiled modules are not hooked and a warning says so.

Where things live (all in `moelab.inspection`): `Trace` and `inspect` here; the records `Call` and `Step` in
`records`; the hooks and step callback (the `Recorder` a Trace owns, `InspectionWarning`) in `recorder`; text and
HTML in `render`; bytes per step and the analytic model beside them in `accounting`; pictures in `plots`.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Self

import pandas as pd
from torch import nn

from ..core.stage import stage_label
from .accounting import memory_frame
from .plots import plot_trace
from .recorder import InspectionWarning, Recorder
from .records import Call, Step
from .render import calls_html, tensor_list, trace_summary, trace_text

__all__ = ["inspect", "Trace", "Call", "Step", "InspectionWarning", "StepCallback"]

StepCallback = Callable[["Step"], Any]


class _Subscription:
    """What `Trace.subscribe` returns: `.remove()` unsubscribes."""

    def __init__(self, trace: "Trace", name: str, fn: StepCallback):
        self._trace, self.name, self.fn = weakref.ref(trace), name, fn

    def remove(self) -> None:
        trace = self._trace()
        if trace is not None:
            callbacks = trace._callbacks.get(self.name, [])
            for i in range(len(callbacks) - 1, -1, -1):
                if callbacks[i] is self.fn:
                    del callbacks[i]
                    break


# ---------------------------------------------------------------------------------------------------- the trace


class Trace:
    """The record of an inspection; also the context manager `inspect()` returns (`with ... as trace`).

    calls: list of `Call`; steps: all steps of all calls in order; `trace["sort"]` the one step of that name
    (LookupError naming the calls if several: use `find` or `calls[i]["sort"]`); unattributed: how many steps were
    emitted outside the inspected layers (not kept); other_thread_calls: how many calls of the inspected layers other
    threads made during the block (not recorded: a trace records the thread that opened it). Hooking and
    recording: the `Recorder` it owns.
    """

    def __init__(self, module: nn.Module, *, on: dict[str, StepCallback | list[StepCallback]] | None = None,
                 keep_tensors: bool = True):
        if not isinstance(module, nn.Module):
            raise ValueError(f"inspect() takes an nn.Module (a SparseMoE, an Experts module or a model), "
                             f"got {type(module).__name__}")
        self.module = module
        self.keep_tensors = bool(keep_tensors)
        self.calls: list[Call] = []
        self.unattributed = 0
        self.other_thread_calls = 0
        self._callbacks: dict[str, list[StepCallback]] = {}
        self.notes: list[str] = []  # what the trace should say about how it was made (e.g. moelab.hf)
        self._recorder = Recorder(self)
        for name, fns in (on or {}).items():
            for fn in (fns if isinstance(fns, (list, tuple)) else [fns]):
                self.subscribe(name, fn)

    # -- recording ----------------------------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """True while the `with` block runs."""
        return self._recorder.active

    def __enter__(self) -> Self:
        self._recorder.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._recorder.stop(exc_type, exc, tb)

    def callbacks_for(self, name: str) -> list[StepCallback]:
        """The callbacks a step called `name` runs: those subscribed to `name`, then those subscribed to "*"."""
        return [*self._callbacks.get(name, ()), *self._callbacks.get("*", ())]

    def subscribed_names(self) -> list[str]:
        """The step names (not "*") that have a callback."""
        return [name for name, fns in self._callbacks.items() if name != "*" and fns]

    # -- subscription ------------------------------------------------------------------------------------------

    def subscribe(self, name: str, fn: StepCallback) -> _Subscription:
        """Run `fn(step)` each time a step called `name` is emitted (`"*"`: every step), synchronously, with the
        backend's own tensors. Returns a handle whose `.remove()` unsubscribes."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"step name must be a non-empty str, got {name!r}")
        if not callable(fn):
            raise TypeError(f"callback for step {name!r} must be callable as fn(step), got {type(fn).__name__}")
        self._callbacks.setdefault(name, []).append(fn)
        return _Subscription(self, name, fn)

    # -- reading -----------------------------------------------------------------------------------------------

    @property
    def steps(self) -> list[Step]:
        return [step for call in self.calls for step in call.steps]

    def find(self, name: str | None = None, *, layer: str | None = None, stage: str | None = None,
             decode_step: int | None = None, backend: str | None = None) -> list[Step]:
        """All steps matching every given filter (`name=None`: any name)."""
        return [s for s in self.steps
                if (name is None or s.name == name) and (layer is None or s.layer == layer)
                and (stage is None or s.stage == stage) and (decode_step is None or s.decode_step == decode_step)
                and (backend is None or s.backend == backend)]

    def __getitem__(self, name: str) -> Step:
        """The one step called `name`; KeyError if none, LookupError naming the calls if several."""
        if not isinstance(name, str):
            raise TypeError(f"trace[...] takes a step name; for calls use trace.calls[{name!r}]")
        found = self.find(name)
        if len(found) == 1:
            return found[0]
        if not found:
            raise KeyError(f"no step {name!r} in this trace; steps recorded: "
                           f"{list(dict.fromkeys(s.name for s in self.steps))}")
        where = ", ".join(f"call {s.call} ({s.layer}, {stage_label(s.stage, s.decode_step)}) step {s.index}"
                          for s in found[:8]) + (f", ... {len(found) - 8} more" if len(found) > 8 else "")
        raise LookupError(f"{len(found)} steps are named {name!r}: {where}. Pick one with "
                          f"trace.calls[i][{name!r}] or trace.find({name!r}, layer=..., stage=...)")

    def __iter__(self):
        return iter(self.steps)

    def __len__(self) -> int:
        return sum(len(c.steps) for c in self.calls)

    def calls_frame(self):
        """A pandas table, one row per MoE call: call, layer, stage (`moelab.stage_label`: "forward", "prefill",
        "decode 3"), backend, tokens, steps."""
        return pd.DataFrame([{"call": c.index, "layer": c.layer, "stage": stage_label(c.stage, c.decode_step),
                              "backend": c.backend, "tokens": c.num_tokens, "steps": len(c.steps)}
                             for c in self.calls], columns=["call", "layer", "stage", "backend", "tokens", "steps"])

    def to_frame(self, per: str = "step"):
        """A pandas table: one row per step (`per="step"`) or per recorded tensor (`per="tensor"`). `stage` is
        the stage's label, as `calls_frame` and the printed trace name it ("forward" outside `generate()`)."""
        base = ["call", "layer", "stage", "decode_step", "backend", "index", "step"]
        rows = []
        for s in self.steps:
            common = {"call": s.call, "layer": s.layer, "stage": stage_label(s.stage, s.decode_step),
                      "decode_step": s.decode_step,
                      "backend": s.backend, "index": s.index, "step": s.name}
            if per == "step":
                rows.append({**common, "explanation": s.explanation, "tensors": tensor_list(s, limit=99),
                             "bytes": s.nbytes, "new_bytes": s.new_bytes, "derived": ", ".join(sorted(s.derived)),
                             "info": ", ".join(f"{k}={v}" for k, v in s.info.items())})
            elif per == "tensor":
                for key, t in s.tensors.items():
                    rows.append({**common, "key": key, "shape": tuple(t.shape),
                                 "dtype": str(t.dtype).removeprefix("torch."), "bytes": t.nbytes,
                                 "derived": key in s.derived})
            else:
                raise ValueError(f"per must be 'step' or 'tensor', got {per!r}")
        columns = base + (["explanation", "tensors", "bytes", "new_bytes", "derived", "info"] if per == "step"
                          else ["key", "shape", "dtype", "bytes", "derived"])
        return pd.DataFrame(rows, columns=columns)

    @property
    def memory(self):
        """Bytes per step: recorded (storage first seen at the step) beside the analytic model's.

        Columns: call, layer, stage, decode_step, backend, index, step, recorded_bytes; analytic_bytes (the model's
        bytes of the tensors this step records), analytic_new_bytes (every tensor the step allocates and keeps),
        analytic_live_bytes (live at its end) and analytic_peak_bytes (highest inside it); NaN where a backend
        has no model. `frame.attrs["analytic_peak_bytes"]` maps each call to its analytic peak, and
        `frame.attrs["saved_for_backward_bytes"]` each call that needed gradients to the bytes its autograd graph
        keeps for backward (`call.saved_for_backward()` lists them). The measured peak
        needs an uninspected run: `moelab.memory.measure(lambda: module(x))` (a trace keeps every tensor alive).
        """
        return memory_frame(self.calls)

    def plot(self, call: int = 0):
        """One figure for call `call`: routing heatmap, tokens per expert, the permutation (grouped_mm) and
        memory per step. See `moelab.inspection.plots` for each panel alone."""
        return plot_trace(self, call=call)

    # -- display -----------------------------------------------------------------------------------------------

    def __repr__(self, max_steps: int = 60) -> str:
        return trace_text(self, max_steps)

    def _repr_html_(self) -> str:
        return calls_html(self.calls, summary=trace_summary(self))


def inspect(module: nn.Module, *, on: dict[str, StepCallback | list[StepCallback]] | None = None,
            keep_tensors: bool = True) -> Trace:
    """Record every step of every MoE layer call inside `module` for the duration of a `with` block.

    module: a `SparseMoE`, an `Experts` module or a whole model; on: {step name: callback(s)} run as each step is
    emitted (`"*"` for all steps); keep_tensors: keep the tensors (default) or only their shapes and dtypes
    (meta tensors, for long generations). Returns the `Trace`, filled as the block runs.
    """
    return Trace(module, on=on, keep_tensors=keep_tensors)
