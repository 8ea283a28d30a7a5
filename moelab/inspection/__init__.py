"""moelab.inspection: step-by-step traces of MoE layers, with the very tensors each backend made.

`inspect(module)` returns a `Trace` (a context manager) that records a `Call` per MoE layer call, each holding the
`Step`s its backend emitted through `moelab.record_step`. One idea a module: `trace` (Trace, inspect), `records`
(Call, Step), `recorder` (the hooks and step callback a Trace owns), `render` (text and HTML), `accounting` (bytes
per step beside the analytic model), `plots` (routing, tokens per expert, the permutation, `plot_trace`),
`layouts` (the rows each layout computes, `layout_rows`, and their strips, `plot_layouts`),
`adapters` (how a package such as `moelab.hf` lets inspection trace another library's models).

Imports `moelab.core`, `moelab.layer` and `moelab.memory`; never models, bench, hf or widgets (those register
with it instead).
"""

from .adapters import register_adapter
from .recorder import InspectionWarning
from .records import Call, Step
from .trace import StepCallback, Trace, inspect

__all__ = ["inspect", "Trace", "Call", "Step", "InspectionWarning", "StepCallback", "register_adapter"]
