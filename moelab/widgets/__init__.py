"""moelab.widgets: the notebooks' widgets, the backend explorer (notebook 7), the trace stepper (notebooks 3-5),
the training explorer (notebook 12) and the EP scale explorer (notebook 15, `parallel`).

All keep their state on plain Python attributes, so a test (or a curious learner) can drive them without a
browser or even a kernel: set a slider's `.value`, call `.run()` (what the Run button does), then read
`.last_results` (a pandas DataFrame), `.figure` (a matplotlib Figure) and `.message`.

One concept a module: `sweeps` is the explorer's measuring side (memory guard, sweeps, crossovers; no widgets),
which measures with `moelab.bench.sweep` (the package's one sweep and timing), `explorer` the `BackendExplorer`
UI, `stepper` the `TraceStepper` and its step pictures, `training` the `TrainingExplorer` (it trains with
`moelab.training.balancing_run`), `_shared` what the widgets share. Everything public is re-exported here; to
monkeypatch a name, patch it in the module that defines it (e.g. `moelab.widgets.sweeps.bench_sweep`): rebinding
it here would not reach the code that uses it.

Imports `moelab.bench` (sweeps, guard, timing), `moelab.inspection` (the stepper's traces and plots),
`moelab.training` (the training explorer's runs and curves), `moelab.parallel` (the EP scale explorer's model),
`moelab.memory`, `moelab.layer`, `moelab.backends` and `moelab.core`, plus ipywidgets and IPython; nothing imports
`moelab.widgets` but the notebooks.
"""

# Re-exports. Some public names stay out of __all__, as before the split, so a star import brings what it did:
# BACKENDS, BOUNDS, COLORS, PROBE_TOKENS, bench_sweep, measured, step_figure, step_table.
# ruff: noqa: F401

from ..memory import quiet_stderr
from ._shared import BACKENDS
from .explorer import BOUNDS, COLORS, BackendExplorer
from .parallel import EPScaleExplorer
from .stepper import TraceStepper, step_figure, step_table
from .training import TrainingExplorer
from .sweeps import (
    DEFAULT_BUDGET_BYTES,
    PROBE_TOKENS,
    bench_sweep,
    crossovers,
    estimate_peak_bytes,
    guard,
    local_sweep,
    measured,
    probed_peak_bytes,
    seq_len_points,
)

__all__ = ["DEFAULT_BUDGET_BYTES", "BackendExplorer", "EPScaleExplorer", "TraceStepper", "TrainingExplorer",
           "crossovers", "estimate_peak_bytes", "guard", "local_sweep", "probed_peak_bytes", "quiet_stderr",
           "seq_len_points"]
