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
"""

from __future__ import annotations

import html
import sys
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from . import steps as _steps
from .memory import MemoryEstimate, analytic, format_bytes
from .stage import current_stage

__all__ = ["inspect", "Trace", "Call", "Step", "InspectionWarning", "StepCallback"]

StepCallback = Callable[["Step"], Any]


class InspectionWarning(UserWarning):
    """An inspection that cannot show what the user asked for (compiled code, a callback that never ran)."""


# ---------------------------------------------------------------------------------------------------- display


def _describe(value) -> tuple[str, str, int | None]:
    """(shape, dtype, bytes) of a tensor for display; ("", repr, None) for context values."""
    if isinstance(value, torch.Tensor):
        return str(list(value.shape)), str(value.dtype).removeprefix("torch."), value.nbytes
    text = repr(value)
    return "", text if len(text) <= 60 else text[:57] + "...", None


def _stage_label(stage: str | None, decode_step: int | None) -> str:
    if stage is None:
        return "forward"
    return f"decode {decode_step}" if stage == "decode" else stage


def _table(header: list[str], rows: list[list[str]], right: Iterable[int] = ()) -> list[str]:
    right = set(right)
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return [line(header).rstrip(), *(line(r).rstrip() for r in rows)]


_CSS = ("<style>.moelab-trace td,.moelab-trace th{text-align:left;vertical-align:top;padding:2px 8px}"
        ".moelab-trace td.num{text-align:right;font-family:monospace}.moelab-trace .derived{color:#888}</style>")


_DERIVED_CLASS = " class='derived'"


# ---------------------------------------------------------------------------------------------------- data


@dataclass(eq=False)
class Step:
    """One step a backend emitted.

    name, explanation: as the backend gave them (one sentence for a learner); layer, stage, decode_step, backend:
    of the call it belongs to; call, index: the call's position in the trace and the step's position in the call.
    tensors: the tensors the step produced, the backend's own objects (meta-device stand-ins with the same shape and
    dtype when the trace was made with `keep_tensors=False`); derived: the keys (in `tensors` or `info`) made only for
    display (e.g. `tokens_per_expert` where the backend never computes it); info: non-tensor context (`expert_id`,
    `path`).
    new_bytes: bytes of storage first seen in this call at this step (parameters and the layer's inputs excluded).
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
        """A pandas table: one row per tensor (and context value) with shape, dtype, bytes and `derived`."""
        import pandas as pd

        rows = []
        for key, value in [*self.tensors.items(), *self.info.items()]:
            shape, dtype, nbytes = _describe(value)
            rows.append({"key": key, "shape": shape, "dtype": dtype, "bytes": nbytes, "derived": key in self.derived})
        return pd.DataFrame(rows, columns=["key", "shape", "dtype", "bytes", "derived"])

    def _rows(self) -> list[list[str]]:
        rows = []
        for key, value in [*self.tensors.items(), *self.info.items()]:
            shape, dtype, nbytes = _describe(value)
            rows.append([key + (" (derived)" if key in self.derived else ""), shape, dtype,
                         "" if nbytes is None else format_bytes(nbytes)])
        return rows

    def _title(self) -> str:
        return (f"step {self.name!r} of call {self.call} (layer {self.layer}, "
                f"{_stage_label(self.stage, self.decode_step)}, {self.backend})")

    def __repr__(self) -> str:
        lines = [self._title(), f"  {self.explanation}"]
        lines += ["  " + line for line in _table(["key", "shape", "dtype", "bytes"], self._rows(), right=[3])]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        body = "".join(
            f"<tr{_DERIVED_CLASS if r[0].endswith('(derived)') else ''}><td><code>{html.escape(r[0])}</code></td>"
            f"<td>{html.escape(r[1])}</td><td>{html.escape(r[2])}</td><td class='num'>{html.escape(r[3])}</td></tr>"
            for r in self._rows())
        return (f"{_CSS}<div class='moelab-trace'><b>{html.escape(self._title())}</b><br>"
                f"<i>{html.escape(self.explanation)}</i><table><tr><th>key</th><th>shape</th><th>dtype</th>"
                f"<th>bytes</th></tr>{body}</table></div>")


@dataclass(eq=False)
class Call:
    """One call of one MoE layer: its `layer` name (qualified name in the inspected module), the generation
    `stage` ("prefill", "decode", or None for a plain forward) and `decode_step`, the experts `backend`, and its
    `steps` in order. `num_tokens`, `dtype` and `sizes` (E, H, I, k) feed the analytic memory model."""

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

    def memory_estimate(self) -> MemoryEstimate | None:
        """The analytic memory model of this call (None for a backend without one, or unknown sizes)."""
        backend = self.backend
        for step in self.find("auto"):  # `auto` says which backend it delegated to
            backend = step.info.get("chosen", backend)
        if (self.sizes is None or "top_k" not in self.sizes or self.num_tokens is None
                or backend not in ("eager", "batched_mm", "grouped_mm")):
            return None
        counts = None
        if backend == "eager":
            counts = [0] * self.sizes["num_experts"]
            for step in self.find("expert"):
                counts[step.info["expert_id"]] = int(step.tensors["token_idx"].shape[0])
        config = _SizesConfig.from_sizes(self.sizes)
        try:
            return analytic(config, self.num_tokens, backend, self.dtype, tokens_per_expert=counts,
                            router=self.has_router, inspected=True)
        except ValueError:
            return None

    def __repr__(self) -> str:
        head = (f"call {self.index}: layer {self.layer}, {_stage_label(self.stage, self.decode_step)}, "
                f"backend {self.backend}, {len(self.steps)} steps")
        rows = [[str(s.index), s.name, _tensor_list(s), format_bytes(s.nbytes)] for s in self.steps]
        return "\n".join([head] + ["  " + ln for ln in _table(["#", "step", "tensors", "bytes"], rows, right=[3])])

    def _repr_html_(self) -> str:
        return Trace._html([self])


@dataclass(frozen=True)
class _SizesConfig:
    """The part of a MoEConfig the memory model reads, from a call's module."""

    num_experts: int
    hidden_size: int
    intermediate_size: int
    top_k: int
    norm_topk_prob: bool = True
    top_k_weights_float32: bool = False
    shared_expert_intermediate_size: int = 0
    hidden_act: str = "silu"

    @classmethod
    def from_sizes(cls, sizes: dict) -> "_SizesConfig":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in sizes.items() if k in known})


def _tensor_list(step: Step, limit: int = 4) -> str:
    parts = [f"{k}{list(t.shape)}" + ("*" if k in step.derived else "") for k, t in step.tensors.items()]
    if len(parts) > limit:
        parts = parts[:limit] + [f"+{len(parts) - limit} more"]
    return ", ".join(parts)


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


def _is_layer(module: nn.Module) -> bool:
    from .experts import Experts
    from .moe import SparseMoE

    return isinstance(module, (SparseMoE, Experts)) or hasattr(module, "experts_implementation")


def _is_compiled(module) -> bool:
    """True for a torch.compile'd module (OptimizedModule, `module.compile()`, or a compiled `forward`)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    if eval_frame is None:  # torch._dynamo never imported: nothing can be compiled
        return False
    if isinstance(module, eval_frame.OptimizedModule) or getattr(module, "_compiled_call_impl", None) is not None:
        return True
    forward = module.__dict__.get("forward") if isinstance(module, nn.Module) else None
    return forward is not None and hasattr(forward, "_torchdynamo_orig_callable")


def _backend_of(module: nn.Module) -> str | None:
    getter = getattr(module, "get_experts_implementation", None)
    if callable(getter):
        return getter()
    return getattr(module, "experts_implementation", None)


def _sizes_of(module: nn.Module) -> dict | None:
    config = getattr(module, "config", None)
    experts = getattr(module, "experts", module)
    try:
        sizes = {"num_experts": int(experts.num_experts), "hidden_size": int(experts.hidden_size),
                 "intermediate_size": int(experts.intermediate_size)}
    except (AttributeError, TypeError):
        return None
    if config is not None:
        for name in ("norm_topk_prob", "top_k_weights_float32", "shared_expert_intermediate_size", "hidden_act"):
            if hasattr(config, name):
                sizes[name] = getattr(config, name)
    return sizes


# ---------------------------------------------------------------------------------------------------- the trace


class Trace:
    """The record of an inspection; also the context manager `inspect()` returns (`with ... as trace`).

    calls: list of `Call`; steps: all steps of all calls in order; `trace["sort"]` the one step of that name
    (LookupError naming the calls if several: use `find` or `calls[i]["sort"]`); unattributed: how many steps were
    emitted outside the inspected layers (not kept).
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
        self._callbacks: dict[str, list[StepCallback]] = {}
        self._handles: list = []
        self._stacks: dict[int, list[list]] = {}  # thread id -> open layers [module, Call, seen storages]
        self._active = False
        self._seen_names: set[str] = set()
        self._recorder = None
        self.notes: list[str] = []  # what the trace should say about how it was made (e.g. moelab.hf)
        self._external: dict[int, Any] = {}  # id(block) -> moelab.hf layer, for a transformers model
        self._external_context = None
        for name, fns in (on or {}).items():
            for fn in (fns if isinstance(fns, (list, tuple)) else [fns]):
                self.subscribe(name, fn)

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

    # -- recording ---------------------------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        return self._active

    def __enter__(self) -> "Trace":
        if self._active:
            raise RuntimeError("this trace is already recording; use a new moelab.inspect(...) block")
        compiled = [name or type(m).__name__ for name, m in self.module.named_modules() if _is_compiled(m)]
        if compiled:
            warnings.warn(
                f"{', '.join(compiled)} is compiled with torch.compile: steps are not recorded under compilation "
                "(record_step is a no-op while compiling, and inspection hooks would break the graph). Inspect "
                "the uncompiled module to see the steps, e.g. moelab.inspect(compiled._orig_mod).",
                InspectionWarning, stacklevel=2)
        try:
            self._external = self._enter_external()
            self._hook(self.module, "", compiled_parent=False)
            self._recorder = self._record
            _steps.add_recorder(self._recorder)
        except BaseException:
            self._remove_hooks()
            self._exit_external(*sys.exc_info())
            raise
        self._handles_registered = bool(self._handles)
        if not self._handles and not compiled:
            warnings.warn(f"{type(self.module).__name__} contains no MoE layer (SparseMoE, Experts, or a module with "
                          "an `experts_implementation`): nothing will be recorded", InspectionWarning, stacklevel=2)
        self._active = True
        self._first_call = len(self.calls)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        _steps.remove_recorder(self._recorder)
        self._recorder = None
        self._remove_hooks()
        self._exit_external(exc_type, exc, tb)
        self._stacks.clear()
        self._active = False
        if exc_type is None:
            self._warn_on_exit()

    def _hook(self, module: nn.Module, prefix: str, compiled_parent: bool) -> None:
        if compiled_parent or _is_compiled(module):
            return  # NOTE: hooks inside compiled code would be traced by dynamo: graph breaks or fullgraph errors
        if _is_layer(module) or id(module) in self._external:
            name = prefix or type(module).__name__
            self._handles.append(module.register_forward_pre_hook(self._make_pre_hook(name)))
            self._handles.append(module.register_forward_hook(self._post_hook, always_call=True))
        for child_name, child in module.named_children():
            self._hook(child, f"{prefix}.{child_name}" if prefix else child_name, False)

    def _enter_external(self) -> dict:
        """A transformers model (moelab.hf): while recording, its experts run moelab's same-named backends on their
        own weights and its MoE blocks are hooked like SparseMoE layers. {} otherwise (transformers not imported)."""
        from .hf.inspect_adapter import inspection_context, summary_note

        context = inspection_context(self.module)  # None unless a transformers model
        if context is None:
            return {}
        layers = context.__enter__()
        self._external_context = context
        self.notes.append(summary_note(layers))
        return {id(layer.block): layer for layer in layers}

    def _exit_external(self, exc_type=None, exc=None, tb=None) -> None:
        """Restore what `_enter_external` changed (the model's experts implementation, transformers' registry)."""
        context, self._external_context, self._external = self._external_context, None, {}
        if context is not None:
            context.__exit__(exc_type, exc, tb)

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _make_pre_hook(self, layer: str):
        def pre_hook(module, args):
            if torch.compiler.is_compiling():  # a compiled copy of an inspected module: record nothing, break nothing
                return
            stack = self._stacks.setdefault(threading.get_ident(), [])
            if stack:  # an Experts inside an open SparseMoE call: same layer, same call
                call = stack[-1][1]
                call.backend = _backend_of(module) or call.backend
                stack.append([module, call, stack[-1][2]])
                _seed(stack[-1][2], args)
                return
            stage = current_stage()
            call = Call(index=len(self.calls), layer=layer, stage=stage.name if stage else None,
                        decode_step=stage.decode_step if stage else None, backend=_backend_of(module))
            hidden = args[0] if args and isinstance(args[0], torch.Tensor) else None
            call.sizes = _sizes_of(module)
            call.has_router = hasattr(module, "router")
            external = self._external.get(id(module))
            if external is not None:  # a transformers MoE block: its moelab.hf layer knows backend and sizes
                call.backend, call.sizes = external.backend, external.sizes
                call.has_router = external.router is not None
            if hidden is not None and call.sizes and hidden.shape[-1] == call.sizes["hidden_size"]:
                call.num_tokens = hidden.numel() // hidden.shape[-1]
                call.dtype = hidden.dtype
            if len(args) >= 2 and isinstance(args[1], torch.Tensor) and args[1].dim() == 2 and call.sizes:
                call.sizes["top_k"] = int(args[1].shape[1])  # an Experts call: k from top_k_index
            elif call.sizes and getattr(getattr(module, "config", None), "top_k", None) is not None:
                call.sizes["top_k"] = int(module.config.top_k)
            self.calls.append(call)
            seen: dict[int, weakref.ref] = {}
            _seed(seen, args)
            stack.append([module, call, seen])

        return pre_hook

    def _post_hook(self, module, args, output) -> None:
        if torch.compiler.is_compiling():
            return
        stack = self._stacks.get(threading.get_ident())
        if stack and stack[-1][0] is module:
            stack.pop()

    def _record(self, name: str, explanation: str, tensors: dict, derived: dict) -> None:
        stack = self._stacks.get(threading.get_ident())
        if not stack:
            self.unattributed += 1
            return
        call, seen = stack[-1][1], stack[-1][2]
        kept = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
        info = {k: v for k, v in tensors.items() if not isinstance(v, torch.Tensor)}
        new_bytes = _new_storage_bytes(seen, kept.values())
        for key, value in derived.items():
            if isinstance(value, torch.Tensor):
                kept[key] = value
            else:
                info[key] = value
        step = Step(name=name, explanation=explanation, layer=call.layer, stage=call.stage,
                    decode_step=call.decode_step, backend=call.backend, call=call.index, index=len(call.steps),
                    tensors=kept, derived=frozenset(derived), info=info, new_bytes=new_bytes)
        call.steps.append(step)
        self._seen_names.add(name)
        for fn in [*self._callbacks.get(name, ()), *self._callbacks.get("*", ())]:
            fn(step)
        if not self.keep_tensors:
            step.tensors = {k: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
                            for k, t in step.tensors.items()}

    def _warn_on_exit(self) -> None:
        new_calls = self.calls[self._first_call:]
        if not new_calls and self._handles_registered and not self.unattributed:
            warnings.warn(f"no MoE layer of the inspected {type(self.module).__name__} ran inside the block; if a "
                          "torch.compile'd copy of it ran, note that steps are not recorded under compilation",
                          InspectionWarning, stacklevel=3)
        silent = [c for c in new_calls if not c.steps]
        if silent:
            layers = sorted({c.layer for c in silent})
            backends = sorted({str(c.backend) for c in silent})
            warnings.warn(
                f"{len(silent)} MoE call(s) of {', '.join(layers)} ran but recorded no steps: steps are not recorded "
                f"under torch.compile, and a backend records only what it passes to moelab.record_step "
                f"(backend: {', '.join(backends)}).", InspectionWarning, stacklevel=3)
        if self.steps:
            missing = sorted(n for n in self._callbacks if n != "*" and self._callbacks[n]
                             and n not in self._seen_names)
            if missing:
                warnings.warn(f"callbacks subscribed to {missing} never ran: no step of that name was recorded "
                              f"(steps recorded: {sorted(self._seen_names)})", InspectionWarning, stacklevel=3)

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
        where = ", ".join(f"call {s.call} ({s.layer}, {_stage_label(s.stage, s.decode_step)}) step {s.index}"
                          for s in found[:8]) + (f", ... {len(found) - 8} more" if len(found) > 8 else "")
        raise LookupError(f"{len(found)} steps are named {name!r}: {where}. Pick one with "
                          f"trace.calls[i][{name!r}] or trace.find({name!r}, layer=..., stage=...)")

    def __iter__(self):
        return iter(self.steps)

    def __len__(self) -> int:
        return sum(len(c.steps) for c in self.calls)

    def to_frame(self, per: str = "step"):
        """A pandas table: one row per step (`per="step"`) or per recorded tensor (`per="tensor"`)."""
        import pandas as pd

        base = ["call", "layer", "stage", "decode_step", "backend", "index", "step"]
        rows = []
        for s in self.steps:
            common = {"call": s.call, "layer": s.layer, "stage": s.stage, "decode_step": s.decode_step,
                      "backend": s.backend, "index": s.index, "step": s.name}
            if per == "step":
                rows.append({**common, "explanation": s.explanation, "tensors": _tensor_list(s, limit=99),
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
        has no model. `frame.attrs["analytic_peak_bytes"]` maps each call to its analytic peak. The measured peak
        needs an uninspected run: `moelab.memory.measure(lambda: module(x))` (a trace keeps every tensor alive).
        """
        import pandas as pd

        rows, peaks = [], {}
        for call in self.calls:
            estimate = call.memory_estimate()
            pairs: dict[int, int] = {}  # trace step index -> model step index, matched in order by name
            recorded_at: dict[int, int] = {}
            if estimate is not None:
                names = [s.step for s in estimate.steps]
                at = 0
                for step in call.steps:  # steps the model does not know (e.g. `auto`) stay unmatched
                    if at < len(names) and step.name == names[at]:
                        pairs[step.index] = at
                        at += 1
                if at == len(names):
                    peaks[call.index] = estimate.peak_bytes
                else:
                    pairs = {}
                for inter in estimate.intermediates if pairs else ():
                    if inter.recorded_in is None:
                        continue
                    where = inter.step_index
                    if names[where] != inter.recorded_in:
                        where = names.index(inter.recorded_in, where)
                    recorded_at[where] = recorded_at.get(where, 0) + inter.nbytes
            for step in call.steps:
                row = {"call": call.index, "layer": call.layer, "stage": call.stage, "decode_step": call.decode_step,
                       "backend": call.backend, "index": step.index, "step": step.name,
                       "recorded_bytes": step.new_bytes, "analytic_bytes": float("nan"),
                       "analytic_new_bytes": float("nan"), "analytic_live_bytes": float("nan"),
                       "analytic_peak_bytes": float("nan")}
                if step.index in pairs:
                    sm = estimate.steps[pairs[step.index]]
                    row.update(analytic_bytes=recorded_at.get(sm.index, 0), analytic_new_bytes=sm.new_bytes,
                               analytic_live_bytes=sm.live_bytes, analytic_peak_bytes=sm.peak_bytes)
                rows.append(row)
        frame = pd.DataFrame(rows, columns=["call", "layer", "stage", "decode_step", "backend", "index", "step",
                                            "recorded_bytes", "analytic_bytes", "analytic_new_bytes",
                                            "analytic_live_bytes", "analytic_peak_bytes"])
        frame.attrs["analytic_peak_bytes"] = peaks
        return frame

    def plot(self, call: int = 0):
        """One figure for call `call`: routing heatmap, tokens per expert, the permutation (grouped_mm) and
        memory per step. See `moelab.inspect_plots` for each panel alone."""
        from .inspect_plots import plot_trace

        return plot_trace(self, call=call)

    # -- display -----------------------------------------------------------------------------------------------

    def _summary(self) -> str:
        state = "recording" if self._active else "finished"
        text = f"Trace ({state}): {len(self.calls)} MoE call(s), {len(self)} step(s)"
        if self.unattributed:
            text += f", {self.unattributed} step(s) emitted outside the inspected layers (not kept)"
        for note in self.notes:
            text += f"\n  note: {note}"
        return text

    def __repr__(self, max_steps: int = 60) -> str:
        rows = []
        for s in self.steps[:max_steps]:
            rows.append([str(s.call), s.layer, _stage_label(s.stage, s.decode_step), str(s.backend), s.name,
                         _tensor_list(s), format_bytes(s.nbytes)])
        lines = [self._summary()]
        if rows:
            lines += ["  " + ln for ln in _table(["call", "layer", "stage", "backend", "step", "tensors", "bytes"],
                                                  rows, right=[6])]
        if len(self) > max_steps:
            lines.append(f"  ... {len(self) - max_steps} more steps (trace.to_frame() has them all)")
        if any(s.derived for s in self.steps[:max_steps]):
            lines.append("  * derived for display, not computed by the backend")
        return "\n".join(lines)

    @staticmethod
    def _html(calls: list[Call], max_steps: int = 200, summary: str = "") -> str:
        out = [_CSS, "<div class='moelab-trace'>"]
        if summary:
            out.append(f"<b>{html.escape(summary)}</b>")
        out.append("<table><tr><th>call</th><th>layer</th><th>stage</th><th>backend</th><th>step</th>"
                   "<th>explanation</th><th>tensors</th><th>shape</th><th>dtype</th><th>bytes</th></tr>")
        shown = 0
        for call in calls:
            for s in call.steps:
                if shown == max_steps:
                    break
                shown += 1
                rows = s._rows() or [["", "", "", ""]]
                span = f" rowspan='{len(rows)}'"
                for i, (key, shape, dtype, nbytes) in enumerate(rows):
                    cls = " class='derived'" if key.endswith("(derived)") else ""
                    head = ""
                    if i == 0:
                        head = "".join(f"<td{span}>{html.escape(str(v))}</td>" for v in (
                            s.call, s.layer, _stage_label(s.stage, s.decode_step), s.backend)) + \
                            f"<td{span}><b>{html.escape(s.name)}</b></td><td{span}>{html.escape(s.explanation)}</td>"
                    out.append(f"<tr{cls}>{head}<td><code>{html.escape(key)}</code></td><td>{html.escape(shape)}</td>"
                               f"<td>{html.escape(dtype)}</td><td class='num'>{html.escape(nbytes)}</td></tr>")
        out.append("</table>")
        total = sum(len(c.steps) for c in calls)
        if total > shown:
            out.append(f"<i>... {total - shown} more steps: trace.to_frame() has them all</i>")
        out.append("</div>")
        return "".join(out)

    def _repr_html_(self) -> str:
        return self._html(self.calls, summary=self._summary())


def _storages(values: Iterable[torch.Tensor]):
    for t in values:
        if t.device.type == "meta" or isinstance(t, nn.Parameter):
            continue
        storage = t.untyped_storage()
        if storage.nbytes():
            yield storage.data_ptr(), storage.nbytes(), t


def _seed(seen: dict, args) -> None:
    """Mark the layer's input tensors as already existing (they are not the call's new memory)."""
    for ptr, _, t in _storages(a for a in args if isinstance(a, torch.Tensor)):
        seen[ptr] = weakref.ref(t)


def _new_storage_bytes(seen: dict, values: Iterable[torch.Tensor]) -> int:
    total = 0
    for ptr, nbytes, t in _storages(values):
        ref = seen.get(ptr)
        if ref is None or ref() is None:  # new, or the old owner died and the allocator reused its address
            total += nbytes
            seen[ptr] = weakref.ref(t)
    return total


def inspect(module: nn.Module, *, on: dict[str, StepCallback | list[StepCallback]] | None = None,
            keep_tensors: bool = True) -> Trace:
    """Record every step of every MoE layer call inside `module` for the duration of a `with` block.

    module: a `SparseMoE`, an `Experts` module or a whole model; on: {step name: callback(s)} run as each step is
    emitted (`"*"` for all steps); keep_tensors: keep the tensors (default) or only their shapes and dtypes
    (meta tensors, for long generations). Returns the `Trace`, filled as the block runs.
    """
    return Trace(module, on=on, keep_tensors=keep_tensors)
