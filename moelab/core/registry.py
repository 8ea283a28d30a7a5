"""`ExpertsInterface`: the one global registry of experts backends, used at class level as in transformers."""

from __future__ import annotations

from typing import Callable

import torch

# fn(experts, hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]
ExpertsFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# estimate(experts, hidden_states [T, H], top_k_index [T, k], dropped [T, k] or None, backward: bool) -> bytes
MemoryEstimateFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, "torch.Tensor | None", bool], int]


class ExpertsInterface:
    """Maps a backend name to its function. Class-level: `ExpertsInterface.register("mine", fn)`.

    A backend is any callable `fn(experts, hidden_states, top_k_index, top_k_weights) -> [T, H]`; a function
    defined in a notebook cell works (nothing inspects its source).

    Drops (capacity, `moelab.layer.capacity`): a dropped pair keeps a valid expert id and has weight 0, so a backend
    written to the transformers signature gives the right output by computing it with weight 0. A backend that
    can skip the dropped pairs registers with `accepts_dropped=True` and is then also called with
    `dropped=` a bool [T, k] mask (None when the layer is dropless).

    Memory: `memory_estimate=estimate` registers the bytes of the backend's big intermediates for one call,
    `estimate(experts, hidden_states, top_k_index, dropped, backward) -> int` (read the shapes; `backward`: the
    call needs gradients, so autograd keeps them). `Experts` checks it against the memory this process may take
    before calling (`moelab.core.memory_guard`); a backend without one is not guarded.
    """

    _global_mapping: dict[str, ExpertsFn] = {}
    _accepts_dropped: set[str] = set()
    _memory_estimates: dict[str, MemoryEstimateFn] = {}

    @classmethod
    def register(cls, name: str, fn: ExpertsFn, overwrite: bool = False, accepts_dropped: bool = False,
                 memory_estimate: MemoryEstimateFn | None = None) -> ExpertsFn:
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty str, got {name!r}")
        if not callable(fn):
            raise TypeError(f"fn must be callable as fn(experts, hidden_states, top_k_index, top_k_weights), "
                            f"got {type(fn).__name__}")
        if name in cls._global_mapping and not overwrite:
            raise ValueError(f"experts backend {name!r} is already registered; pass overwrite=True to replace it")
        if not isinstance(accepts_dropped, bool):
            raise ValueError(f"accepts_dropped must be a bool, got {accepts_dropped!r}")
        if memory_estimate is not None and not callable(memory_estimate):
            raise TypeError(f"memory_estimate must be None or callable as estimate(experts, hidden_states, "
                            f"top_k_index, dropped, backward) -> bytes, got {type(memory_estimate).__name__}")
        cls._global_mapping[name] = fn
        (cls._accepts_dropped.add if accepts_dropped else cls._accepts_dropped.discard)(name)
        if memory_estimate is None:
            cls._memory_estimates.pop(name, None)
        else:
            cls._memory_estimates[name] = memory_estimate
        return fn

    @classmethod
    def unregister(cls, name: str) -> None:
        cls.get(name)  # same error as get() for an unknown name
        del cls._global_mapping[name]
        cls._accepts_dropped.discard(name)
        cls._memory_estimates.pop(name, None)

    @classmethod
    def get(cls, name: str) -> ExpertsFn:
        try:
            return cls._global_mapping[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown experts_implementation {name!r}; valid names are {cls.names()}") from None

    @classmethod
    def accepts_dropped(cls, name: str) -> bool:
        """Whether backend `name` takes the `dropped` mask (and skips the dropped pairs)."""
        cls.get(name)
        return name in cls._accepts_dropped

    @classmethod
    def memory_estimate(cls, name: str) -> MemoryEstimateFn | None:
        """The estimate backend `name` registered (bytes of its big intermediates), None when it has none."""
        cls.get(name)
        return cls._memory_estimates.get(name)

    @classmethod
    def names(cls) -> list[str]:
        return sorted(cls._global_mapping)

    @classmethod
    def validate(cls, name) -> str:
        """Return `name` if registered, else raise the ValueError listing the valid names."""
        cls.get(name)
        return name
