"""Adapters: how `moelab.inspect` traces a model whose MoE layers are not moelab's (a transformers model).

Inspection sits below the packages that know other libraries, so it never imports them: such a package registers
an adapter here when it is imported (`moelab.hf` does). An adapter is `fn(module)` returning None when `module` is
not its kind, else a context manager; entering it prepares the model for recording (e.g. runs moelab's backends on
the model's own weights) and gives `(layers, note)`: the MoE blocks to hook, each with `.block` (the module),
`.backend`, `.sizes` (E, H, I, ... as `moelab.inspection` reads them) and `.router` (None if it has none), and one
sentence the trace shows. Leaving it restores the model, also on error.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Callable

from torch import nn

Adapter = Callable[[nn.Module], AbstractContextManager | None]

_adapters: dict[str, Adapter] = {}


def register_adapter(name: str, adapter: Adapter) -> None:
    """Let `moelab.inspect` trace the modules `adapter` recognises (registering `name` again replaces it)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    if not callable(adapter):
        raise TypeError(f"adapter must be callable as adapter(module), got {type(adapter).__name__}")
    _adapters[name] = adapter


def adapter_context(module: nn.Module) -> AbstractContextManager | None:
    """The context of the first adapter that recognises `module`, or None (a moelab module needs none)."""
    for adapter in _adapters.values():
        context = adapter(module)
        if context is not None:
            return context
    return None
