"""moelab.memory: the memory of one MoE call, an analytic model per backend and the measured peak.

`analytic(config, num_tokens, backend, dtype)` lists every intermediate a backend's code makes, with its bytes
as a formula of `(T, k, E, H, I, b)` (`b` = bytes per element of `dtype`), and walks them in program order to
find the analytic peak. `measure(fn)` runs `fn()` and reports the peak of the *extra* memory it took. One concept
a module: `records` (what `analytic` returns, `format_bytes`), `timeline` (the walk over allocations and frees),
`formulas` (each backend's steps, and the liveness model in its docstring), `estimate` (`analytic`,
`peak_bytes`), `measurement` (`measure`, `compare`), `backward` (training memory: `saved_for_backward`, what
each backend's autograd graph keeps for backward, beside `measure_saved`; `training_peak`, a whole step's peak;
`compare_training`), `waste` (`waste_table`, `format_waste`: what each layout computes and holds beyond the useful
pairs), `plots` (`plot_memory`, `plot_duplication`).

Imports `moelab.core`, `moelab.backends` (to model the path a call takes) and `moelab.layer` (to measure a
`SparseMoE`); never inspection, models, bench, hf or widgets.
"""

from .estimate import BACKENDS, MODELLED_BACKENDS, analytic, peak_bytes
from .backward import (SavedForBackward, SavedMeasurement, TrainingPeak, compare_training, measure_saved,
                       saved_for_backward, training_peak)
from .measurement import MemoryMeasurement, compare, measure
from .measurement import quiet_stderr as quiet_stderr
from .plots import plot_duplication, plot_memory
from .records import Intermediate, MemoryEstimate, StepMemory, format_bytes
from .waste import format_waste, waste_table

# quiet_stderr stays out of __all__, as before the split: it is re-exported for moelab.widgets
__all__ = [
    "Intermediate", "StepMemory", "MemoryEstimate", "MemoryMeasurement", "BACKENDS",
    "MODELLED_BACKENDS", "analytic", "peak_bytes", "measure", "compare", "format_bytes", "plot_memory",
    "plot_duplication", "waste_table", "format_waste", "SavedForBackward", "SavedMeasurement", "TrainingPeak",
    "saved_for_backward", "measure_saved", "training_peak", "compare_training",
]
