"""moelab.bench: benchmarks that measure instead of claim: sweeps over the experts backends, their plots, and
calibration of the `auto` backend's crossover points.

    from moelab import bench
    table = bench.sweep(tokens=[1, 16, 128], num_experts=[8], top_k=[2], dtypes=["bfloat16"])
    bench.save(table, "out/")                 # sweep.csv + sweep.json (with the environment)
    bench.plot_time(table)                    # a matplotlib Figure
    bench.calibrate()                         # measure crossovers for `auto` and store them for this machine

One concept a module: `sweep` (the one sweep: grid, guard, timing, rows), `timing` (the one timing helper on
torch.utils.benchmark: `measure_time`, `measure_interleaved`), `guard` (memory estimates and the budget), `env`
(the environment record), `baselines` (useful FLOPs, the dense limit, the bare grouped GEMMs), `compare`
(`compare_backends`, the default job of `python -m moelab`), `layouts` (`layout_sweep`: the five layouts over
T and routing skew, with their waste), `calibrate`, `analysis` / `report` /
`report_sections` (questions asked of a sweep, BENCHMARKS.md), `plots`, `io`, `hf` (transformers' namesake
backends) and `cli` (the `bench` / `calibrate` sub-commands).

Imports `moelab.core`, `moelab.backends`, `moelab.layer`, `moelab.memory`, `moelab.models` (the version) and
`moelab.hf` (transformers only lazily, through `moelab.hf.require_transformers`); never `moelab.widgets`.
"""

from .analysis import FIXED_BACKENDS
from .baselines import useful_flops
from .calibrate import calibrate, crossovers_from_sweep
from .compare import compare_backends
from .env import environment
from .guard import available_memory, resolve_budget
from .io import load, save, summary
from .layouts import fastest_layouts, layout_sweep, plot_layout_sweep
from .plots import crossover_points, plot_memory, plot_speedup_map, plot_time
from .sweep import COLUMNS, DEFAULT_BACKENDS, DEFAULT_GRID, sweep
from .timing import measure_interleaved, measure_time

__all__ = [
    "sweep", "calibrate", "crossovers_from_sweep", "environment", "available_memory", "resolve_budget", "save",
    "load", "summary", "plot_time", "plot_memory", "plot_speedup_map", "crossover_points", "COLUMNS",
    "DEFAULT_BACKENDS", "DEFAULT_GRID", "FIXED_BACKENDS", "useful_flops", "compare_backends", "measure_time",
    "measure_interleaved", "layout_sweep", "plot_layout_sweep", "fastest_layouts",
]
