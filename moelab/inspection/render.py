"""How a trace reads: the text of `repr(trace)`, `repr(call)` and `repr(step)`, and the HTML Jupyter shows.

Plain functions of the records in `moelab.inspection.records` (and of a `Trace`), so the records stay
data and all the formatting sits in one place: one row per step (text), one row per tensor (HTML), bytes as
`moelab.memory.format_bytes` prints them, keys made only for display marked "derived", copies the recorder took
(the backend overwrites the original later) marked "copy".
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from ..core.stage import stage_label
from ..memory import format_bytes

if TYPE_CHECKING:
    from .trace import Trace
    from .records import Call, Step


def describe(value) -> tuple[str, str, int | None]:
    """(shape, dtype, bytes) of a tensor for display; ("", repr, None) for context values."""
    if isinstance(value, torch.Tensor):
        return str(list(value.shape)), str(value.dtype).removeprefix("torch."), value.nbytes
    text = repr(value)
    return "", text if len(text) <= 60 else text[:57] + "...", None


def _table(header: list[str], rows: list[list[str]], right: Iterable[int] = ()) -> list[str]:
    right = set(right)
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return [line(header).rstrip(), *(line(r).rstrip() for r in rows)]


_CSS = ("<style>.moelab-trace td,.moelab-trace th{text-align:left;vertical-align:top;padding:2px 8px}"
        ".moelab-trace td.num{text-align:right;font-family:monospace}.moelab-trace .derived{color:#888}</style>")


_DERIVED_CLASS = " class='derived'"


_DERIVED_NOTE = "* derived for display, not computed by the backend"
_COPY_NOTE = "^ a copy taken at the step: the backend's fast path overwrites the original later"


def _marks(step: Step, keys) -> str:
    return ("*" if any(k in step.derived for k in keys) else "") + ("^" if any(k in step.copied for k in keys) else "")


def tensor_list(step: Step, limit: int = 4) -> str:
    keys = list(step.tensors)
    parts = [f"{k}{list(step.tensors[k].shape)}" + _marks(step, [k]) for k in keys]
    if len(parts) > limit:  # the hidden ones keep their marks, so every footnote printed has its star
        parts = parts[:limit] + [f"+{len(parts) - limit} more" + _marks(step, keys[limit:])]
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------------- a step


def step_rows(step: Step) -> list[list[str]]:
    """[key, shape, dtype, bytes] per tensor and context value of `step`."""
    rows = []
    for key, value in [*step.tensors.items(), *step.info.items()]:
        shape, dtype, nbytes = describe(value)
        mark = " (derived)" if key in step.derived else " (copy)" if key in step.copied else ""
        rows.append([key + mark, shape, dtype, "" if nbytes is None else format_bytes(nbytes)])
    return rows


def step_title(step: Step) -> str:
    return (f"step {step.name!r} of call {step.call} (layer {step.layer}, "
            f"{stage_label(step.stage, step.decode_step)}, {step.backend})")


def step_text(step: Step) -> str:
    lines = [step_title(step), f"  {step.explanation}"]
    lines += ["  " + line for line in _table(["key", "shape", "dtype", "bytes"], step_rows(step), right=[3])]
    return "\n".join(lines)


def step_html(step: Step) -> str:
    body = "".join(
        f"<tr{_DERIVED_CLASS if r[0].endswith('(derived)') else ''}><td><code>{html.escape(r[0])}</code></td>"
        f"<td>{html.escape(r[1])}</td><td>{html.escape(r[2])}</td><td class='num'>{html.escape(r[3])}</td></tr>"
        for r in step_rows(step))
    return (f"{_CSS}<div class='moelab-trace'><b>{html.escape(step_title(step))}</b><br>"
            f"<i>{html.escape(step.explanation)}</i><table><tr><th>key</th><th>shape</th><th>dtype</th>"
            f"<th>bytes</th></tr>{body}</table></div>")


# ---------------------------------------------------------------------------------------------------- calls, a trace


def _notes(steps: list[Step]) -> list[str]:
    """The footnotes the marks in `tensor_list` need."""
    return ([_DERIVED_NOTE] if any(s.derived for s in steps) else []) + \
        ([_COPY_NOTE] if any(s.copied for s in steps) else [])


def call_text(call: Call) -> str:
    path = f" ({call.code_path} path)" if call.code_path else ""
    head = (f"call {call.index}: layer {call.layer}, {stage_label(call.stage, call.decode_step)}, "
            f"backend {call.backend}{path}, {len(call.steps)} steps")
    rows = [[str(s.index), s.name, tensor_list(s), format_bytes(s.nbytes)] for s in call.steps]
    lines = [head] + ["  " + ln for ln in _table(["#", "step", "tensors", "bytes"], rows, right=[3])]
    return "\n".join(lines + ["  " + note for note in _notes(call.steps)])


def calls_html(calls: list[Call], max_steps: int = 200, summary: str = "") -> str:
    """One table of the steps of `calls`, one row per tensor (the step's cells span its rows)."""
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
            rows = step_rows(s) or [["", "", "", ""]]
            span = f" rowspan='{len(rows)}'"
            for i, (key, shape, dtype, nbytes) in enumerate(rows):
                cls = _DERIVED_CLASS if key.endswith("(derived)") else ""
                head = ""
                if i == 0:
                    head = "".join(f"<td{span}>{html.escape(str(v))}</td>" for v in (
                        s.call, s.layer, stage_label(s.stage, s.decode_step), s.backend)) + \
                        f"<td{span}><b>{html.escape(s.name)}</b></td><td{span}>{html.escape(s.explanation)}</td>"
                out.append(f"<tr{cls}>{head}<td><code>{html.escape(key)}</code></td><td>{html.escape(shape)}</td>"
                           f"<td>{html.escape(dtype)}</td><td class='num'>{html.escape(nbytes)}</td></tr>")
    out.append("</table>")
    if any(s.copied for c in calls for s in c.steps):
        out.append(f"<i>(copy): {html.escape(_COPY_NOTE[2:])}</i><br>")
    total = sum(len(c.steps) for c in calls)
    if total > shown:
        out.append(f"<i>... {total - shown} more steps: trace.to_frame() has them all</i>")
    out.append("</div>")
    return "".join(out)


def trace_summary(trace: Trace) -> str:
    state = "recording" if trace.active else "finished"
    text = f"Trace ({state}): {len(trace.calls)} MoE call(s), {len(trace)} step(s)"
    if trace.unattributed:
        text += f", {trace.unattributed} step(s) emitted outside the inspected layers (not kept)"
    if trace.other_thread_calls:
        text += (f", {trace.other_thread_calls} MoE call(s) from other threads not recorded (a trace records the "
                 f"thread that opened it)")
    for note in trace.notes:
        text += f"\n  note: {note}"
    return text


def trace_text(trace: Trace, max_steps: int = 60) -> str:
    """The summary line, then one row per step (the first `max_steps`)."""
    rows = []
    for s in trace.steps[:max_steps]:
        rows.append([str(s.call), s.layer, stage_label(s.stage, s.decode_step), str(s.backend), s.name,
                     tensor_list(s), format_bytes(s.nbytes)])
    lines = [trace_summary(trace)]
    if rows:
        lines += ["  " + ln for ln in _table(["call", "layer", "stage", "backend", "step", "tensors", "bytes"],
                                              rows, right=[6])]
    if len(trace) > max_steps:
        lines.append(f"  ... {len(trace) - max_steps} more steps (trace.to_frame() has them all)")
    lines += ["  " + note for note in _notes(trace.steps[:max_steps])]
    return "\n".join(lines)
