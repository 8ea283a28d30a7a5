"""`record_step`: the one call a backend makes to show a learner what it just did.

A no-op unless an inspection is active (see `moelab.inspect`), and always a no-op while `torch.compile` traces,
so the hooks can stay in the backends' code without costing time or breaking `fullgraph=True`.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Callable

import torch

# Active recorders, innermost last. Each is called as fn(name, explanation, tensors, derived, copied).
StepRecorder = Callable[[str, str, dict, dict, frozenset], None]
_recorders: list[StepRecorder] = []


def is_recording() -> bool:
    """True when an inspection is listening (and we are not inside a torch.compile trace)."""
    return bool(_recorders) and not torch.compiler.is_compiling()


def record_step(name: str, explanation: str, *, derived: dict | None = None, copy: Collection[str] = (),
                **tensors) -> None:
    """Emit one step: its `name`, a one-sentence `explanation` and the tensors it really produced.

    Pass the very tensors the backend uses (not copies): an inspection callback that edits one in place
    changes what the backend computes next. Non-tensor values (ints, strings) are allowed as context.
    `copy` names the keys of tensors the backend overwrites later (a fast path reusing memory): those are cloned
    here, only while recording, so the trace keeps the values of this step; recorders and callbacks then get the
    copy (editing it changes nothing) and the step lists the keys as copied.
    `derived` holds views made only for display (tensors, or zero-argument callables evaluated only while
    recording, so they cost nothing when no inspection is active); traces flag them as derived.
    `explanation` may also be a zero-argument callable returning the sentence: pass one when the sentence is
    formatted from data (`lambda: f"... {len(token_idx)} tokens"`), so it is built only while recording.
    """
    # NOTE: the cheap emptiness check comes first, so hooks-off costs one list truthiness test.
    if not _recorders or torch.compiler.is_compiling():
        return
    if callable(explanation):
        explanation = explanation()
    copied = frozenset(copy)
    if copied:
        if not copied <= {k for k, v in tensors.items() if isinstance(v, torch.Tensor)}:
            raise ValueError(f"step {name!r}: copy names {sorted(copied)}, but its tensors are {sorted(tensors)}")
        tensors = {k: v.clone(memory_format=torch.contiguous_format) if k in copied else v
                   for k, v in tensors.items()}
    shown = {key: value() if callable(value) else value for key, value in (derived or {}).items()}
    for recorder in list(_recorders):
        recorder(name, explanation, tensors, shown, copied)


def add_recorder(fn: StepRecorder) -> None:
    _recorders.append(fn)


def remove_recorder(fn: StepRecorder) -> None:
    # remove by identity: two equal-comparing recorders must not remove each other
    for i in range(len(_recorders) - 1, -1, -1):
        if _recorders[i] is fn:
            del _recorders[i]
            return
