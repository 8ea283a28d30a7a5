"""Benchmarks that measure instead of claim: sweeps over the experts backends, their plots, and calibration of
the `auto` backend's crossover points.

    from moelab import bench
    table = bench.sweep(tokens=[1, 16, 128], num_experts=[8], top_k=[2], dtypes=["bfloat16"])
    bench.save(table, "out/")                 # sweep.csv + sweep.json (with the environment)
    bench.plot_time(table)                    # a matplotlib Figure
    bench.calibrate()                         # measure crossovers for `auto` and store them for this machine
"""

from .baselines import useful_flops
from .calibrate import calibrate, crossovers_from_sweep
from .compare import compare_backends
from .env import environment
from .guard import available_memory, resolve_budget
from .io import load, save, summary
from .plots import crossover_points, plot_memory, plot_speedup_map, plot_time
from .sweep import COLUMNS, DEFAULT_BACKENDS, DEFAULT_GRID, sweep

__all__ = [
    "sweep", "calibrate", "crossovers_from_sweep", "environment", "available_memory", "resolve_budget", "save",
    "load", "summary", "plot_time", "plot_memory", "plot_speedup_map", "crossover_points", "COLUMNS",
    "DEFAULT_BACKENDS", "DEFAULT_GRID", "useful_flops", "compare_backends",
]
