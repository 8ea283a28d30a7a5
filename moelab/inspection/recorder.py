"""How a trace records: the `Recorder` a `Trace` owns, whose hooks and step callback fill it while its block runs.

Starting registers a step recorder with `moelab.core.steps` and forward hooks on the MoE layers inside the
inspected module (for a model of another library, after its registered adapter prepared it, see
`moelab.inspection.adapters`); a pre-hook opens a `Call` (one stack per thread, so an `Experts` inside an open
`SparseMoE` call joins it), each step lands in the innermost open call, and the post-hook closes it. Only the
thread that opened the trace is recorded: the hooks are on the module, so they also fire for calls other threads
make meanwhile (a data loader, a server), which are counted in `trace.other_thread_calls` instead. Exiting
removes everything, also on error, then warns about what could not be seen (`InspectionWarning`).
"""

from __future__ import annotations

import sys
import threading
import warnings
import weakref
from typing import Any

import torch
from torch import nn

from ..core import steps
from ..core.stage import current_stage
from ..layer.experts import Experts
from ..layer.moe import SparseMoE
from .accounting import layer_sizes, new_storage_bytes, seed_inputs
from .adapters import adapter_context
from .records import Call, Step


class InspectionWarning(UserWarning):
    """An inspection that cannot show what the user asked for (compiled code, a callback that never ran)."""


def _is_layer(module: nn.Module) -> bool:
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


class Recorder:
    """Fills `trace` while started: hooks on its module's MoE layers and a step callback in `moelab.core.steps`.

    `Trace.__enter__` calls `start()`, `Trace.__exit__` calls `stop(...)`; the recorder writes `trace.calls`,
    `trace.unattributed` and `trace.notes`, and runs the callbacks `trace.callbacks_for(name)` returns.
    """

    def __init__(self, trace):
        self.trace = trace
        self.module = trace.module
        self._handles: list = []
        self._stacks: dict[int, list[list]] = {}  # thread id -> open layers [module, Call, seen storages]
        self._thread: int | None = None  # the inspecting thread, the one recorded
        self._foreign_depth: dict[int, int] = {}  # another thread id -> its open layers, to count outer calls once
        self._active = False
        self._seen_names: set[str] = set()
        self._callback = None
        self._external: dict[int, Any] = {}  # id(block) -> an adapter's layer, for a model of another library
        self._external_context = None
        self._handles_registered = False
        self._first_call = 0

    @property
    def active(self) -> bool:
        return self._active

    def start(self) -> None:
        if self._active:
            raise RuntimeError("this trace is already recording; use a new moelab.inspect(...) block")
        compiled = [name or type(m).__name__ for name, m in self.module.named_modules() if _is_compiled(m)]
        if compiled:
            warnings.warn(
                f"{', '.join(compiled)} is compiled with torch.compile: steps are not recorded under compilation "
                "(record_step is a no-op while compiling, and inspection hooks would break the graph). Inspect "
                "the uncompiled module to see the steps, e.g. moelab.inspect(compiled._orig_mod).",
                InspectionWarning, stacklevel=3)
        try:
            self._external = self._enter_external()
            self._hook(self.module, "", compiled_parent=False)
            self._callback = self._record
            steps.add_recorder(self._callback)
        except BaseException:
            self._remove_hooks()
            self._exit_external(*sys.exc_info())
            raise
        self._handles_registered = bool(self._handles)
        if not self._handles and not compiled:
            warnings.warn(f"{type(self.module).__name__} contains no MoE layer (SparseMoE, Experts, or a module with "
                          "an `experts_implementation`): nothing will be recorded", InspectionWarning, stacklevel=3)
        self._thread = threading.get_ident()
        self._active = True
        self._first_call = len(self.trace.calls)

    def stop(self, exc_type=None, exc=None, tb=None) -> None:
        steps.remove_recorder(self._callback)
        self._callback = None
        self._remove_hooks()
        self._exit_external(exc_type, exc, tb)
        self._stacks.clear()
        self._foreign_depth.clear()
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
        """A model of another library with a registered adapter (a transformers model, once `moelab.hf` is
        imported): the adapter prepares it and its MoE blocks are hooked like SparseMoE layers. {} otherwise."""
        context = adapter_context(self.module)  # None for a moelab module
        if context is None:
            return {}
        layers, note = context.__enter__()
        self._external_context = context
        self.trace.notes.append(note)
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
            thread = threading.get_ident()
            if thread != self._thread:
                depth = self._foreign_depth.get(thread, 0)
                self.trace.other_thread_calls += depth == 0  # an Experts inside its SparseMoE is the same call
                self._foreign_depth[thread] = depth + 1
                return
            stack = self._stacks.setdefault(thread, [])
            if stack:  # an Experts inside an open SparseMoE call: same layer, same call
                call = stack[-1][1]
                call.backend = _backend_of(module) or call.backend
                stack.append([module, call, stack[-1][2]])
                seed_inputs(stack[-1][2], args)
                return
            stage = current_stage()
            call = Call(index=len(self.trace.calls), layer=layer, stage=stage.name if stage else None,
                        decode_step=stage.decode_step if stage else None, backend=_backend_of(module))
            hidden = args[0] if args and isinstance(args[0], torch.Tensor) else None
            call.sizes = layer_sizes(module)
            call.has_router = hasattr(module, "router")
            external = self._external.get(id(module))
            if external is not None:  # a transformers MoE block: its moelab.hf layer knows backend and sizes
                call.backend, call.sizes = external.backend, external.sizes
                call.has_router = external.router is not None
            if hidden is not None and call.sizes and hidden.shape[-1] == call.sizes["hidden_size"]:
                call.num_tokens = hidden.numel() // hidden.shape[-1]
                call.dtype = hidden.dtype
            # autograd records the call: grad mode on and an input or a weight requires grad (not `module.training`)
            inputs = [a for a in args if isinstance(a, torch.Tensor)]
            call.needs_grad = torch.is_grad_enabled() and (any(t.requires_grad for t in inputs) or any(
                p.requires_grad for p in module.parameters()))
            call.hidden_grad = hidden is not None and hidden.requires_grad
            # an Experts call's top_k_weights (a SparseMoE's router makes them, with a gradient)
            call.weights_grad = len(inputs) < 3 or inputs[2].requires_grad
            if len(args) >= 2 and isinstance(args[1], torch.Tensor) and args[1].dim() == 2 and call.sizes:
                call.sizes["top_k"] = int(args[1].shape[1])  # an Experts call: k from top_k_index
            elif call.sizes and getattr(getattr(module, "config", None), "top_k", None) is not None:
                call.sizes["top_k"] = int(module.config.top_k)
            self.trace.calls.append(call)
            seen: dict[int, weakref.ref] = {}
            seed_inputs(seen, args)
            stack.append([module, call, seen])

        return pre_hook

    def _post_hook(self, module, args, output) -> None:
        if torch.compiler.is_compiling():
            return
        thread = threading.get_ident()
        if thread != self._thread:
            if self._foreign_depth.get(thread):
                self._foreign_depth[thread] -= 1
            return
        stack = self._stacks.get(thread)
        if stack and stack[-1][0] is module:
            stack.pop()

    def _record(self, name: str, explanation: str, tensors: dict, derived: dict, copied: frozenset) -> None:
        if threading.get_ident() != self._thread:
            return  # another thread's step: its call is counted in other_thread_calls, not recorded
        stack = self._stacks.get(threading.get_ident())
        if not stack:
            self.trace.unattributed += 1
            return
        call, seen = stack[-1][1], stack[-1][2]
        kept = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
        info = {k: v for k, v in tensors.items() if not isinstance(v, torch.Tensor)}
        new_bytes = new_storage_bytes(seen, kept.values())
        for key, value in derived.items():
            if isinstance(value, torch.Tensor):
                kept[key] = value
            else:
                info[key] = value
        step = Step(name=name, explanation=explanation, layer=call.layer, stage=call.stage,
                    decode_step=call.decode_step, backend=call.backend, call=call.index, index=len(call.steps),
                    tensors=kept, derived=frozenset(derived), info=info, new_bytes=new_bytes, copied=copied)
        call.steps.append(step)
        self._seen_names.add(name)
        for fn in self.trace.callbacks_for(name):
            fn(step)
        if not self.trace.keep_tensors:
            step.tensors = {k: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
                            for k, t in step.tensors.items()}

    def _warn_on_exit(self) -> None:
        new_calls = self.trace.calls[self._first_call:]
        if not new_calls and self._handles_registered and not self.trace.unattributed:
            warnings.warn(f"no MoE layer of the inspected {type(self.module).__name__} ran inside the block; if a "
                          "torch.compile'd copy of it ran, note that steps are not recorded under compilation",
                          InspectionWarning, stacklevel=4)
        silent = [c for c in new_calls if not c.steps]
        if silent:
            layers = sorted({c.layer for c in silent})
            backends = sorted({str(c.backend) for c in silent})
            warnings.warn(
                f"{len(silent)} MoE call(s) of {', '.join(layers)} ran but recorded no steps: steps are not recorded "
                f"under torch.compile, and a backend records only what it passes to moelab.record_step "
                f"(backend: {', '.join(backends)}).", InspectionWarning, stacklevel=4)
        if any(call.steps for call in self.trace.calls):
            missing = sorted(n for n in self.trace.subscribed_names() if n not in self._seen_names)
            if missing:
                warnings.warn(f"callbacks subscribed to {missing} never ran: no step of that name was recorded "
                              f"(steps recorded: {sorted(self._seen_names)})", InspectionWarning, stacklevel=4)
