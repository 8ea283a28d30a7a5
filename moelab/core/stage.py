"""The generation stage channel: which stage (`prefill`, or `decode` step n) the current forward belongs to.

`generate()` publishes the stage here; inspection reads it to label each MoE call. Outside generation the
stage is None (a plain forward).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str  # "prefill" or "decode"
    decode_step: int | None = None  # 0, 1, ... during decode; None in prefill


_current_stage: contextvars.ContextVar[Stage | None] = contextvars.ContextVar("moelab_stage", default=None)


def current_stage() -> Stage | None:
    """The stage of the forward now running, or None outside generation."""
    return _current_stage.get()


@contextlib.contextmanager
def generation_stage(name: str, decode_step: int | None = None):
    """Publish `Stage(name, decode_step)` for the duration of the block (restored afterwards, also on error)."""
    if name not in ("prefill", "decode"):
        raise ValueError(f"name must be 'prefill' or 'decode', got {name!r}")
    if (name == "decode") != (decode_step is not None):
        raise ValueError("decode_step must be given for 'decode' and only for 'decode'")
    token = _current_stage.set(Stage(name, decode_step))
    try:
        yield _current_stage.get()
    finally:
        _current_stage.reset(token)


def stage_label(stage: Stage | str | None, decode_step: int | None = None) -> str:
    """The one name of a stage, in traces, `generate()`'s `backends_used` and the notebooks.

    None (a plain forward, outside `generate()`) -> "forward"; "prefill" -> "prefill"; "decode" with step 3 ->
    "decode 3". Takes a `Stage` or its `name` and `decode_step` separately (as a trace's `Call` stores them).
    """
    if isinstance(stage, Stage):
        stage, decode_step = stage.name, stage.decode_step
    if stage is None:
        return "forward"
    return f"{stage} {decode_step}" if stage == "decode" and decode_step is not None else stage
