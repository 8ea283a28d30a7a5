"""`layout_sweep`: the five experts layouts timed on made-up routings, over the tokens T and the routing skew
(balanced -> one hot expert), with each call's waste beside its time; `plot_layout_sweep` draws it.

Every point is one `Experts` call (no router: the routing is `moelab.layer.skewed_routing`, the same for every
backend), timed with `measure_interleaved` (the backends of a point in alternating blocks) under `torch.no_grad()`,
after a check that its output equals eager's. The waste columns come from `moelab.memory.waste_table` on the same
routing. A point whose analytic peak is over the memory budget is skipped, with why, before anything runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import matplotlib.ticker as mticker
import pandas as pd
import torch

from .. import memory
from ..core.colors import backend_color
from ..core.dtypes import parse_dtype
from ..layer import SparseMoE, drop_pairs, skewed_routing
from ..memory.plots import new_figure
from .env import resolve_clock
from .guard import resolve_budget
from .timing import measure_interleaved

LAYOUTS = memory.MODELLED_BACKENDS  # eager, batched_mm, grouped_mm, capacity, block_aligned
WASTE_COLUMNS = ["rows_computed", "useful_pairs", "padding_rows", "dropped_pairs", "computed_over_useful",
                 "extra_memory_analytic", "bytes_moved"]


def layout_sweep(config, tokens: Sequence[int] = (16, 64, 256), skews: Sequence[float] = (0.0,),
                 backends: Sequence[str] = LAYOUTS, dtype="float32", *, capacity_factor: float | None = None,
                 drop_policy: str = "position", min_run_time: float = 0.1, min_runs: int = 5, num_threads: int = 1,
                 clock: str = "auto", memory_budget=None, seed: int = 0) -> pd.DataFrame:
    """One row per (T, skew, backend): status ("ok" / "skipped" with `reason`), median_ms, iqr_ms, runs,
    max_abs_diff_to_eager and the waste columns (`WASTE_COLUMNS`). capacity_factor: drop pairs over
    C = ceil(f*T*k/E) (`drop_policy`) and pass the mask on (the layer in training mode, so capacity uses f);
    None: dropless. memory_budget: as `moelab.bench.sweep` (bytes, a fraction of the free memory, default half).
    """
    dtype = parse_dtype(dtype)
    for name, values in (("tokens", tokens), ("skews", skews), ("backends", backends)):
        if isinstance(values, (str, bytes)) or not len(values):
            raise ValueError(f"{name} must be a non-empty list, got {values!r}")
    for value in tokens:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"tokens must be ints >= 1, got {value!r}")
    for name in backends:
        if name not in LAYOUTS:
            raise ValueError(f"backends: {name!r} is not one of the layouts {list(LAYOUTS)}")
    clock = resolve_clock(clock, "cpu", num_threads)
    budget = resolve_budget(memory_budget)
    layer_config = config if capacity_factor is None else _with_capacity(config, capacity_factor, drop_policy)
    experts = {name: SparseMoE(layer_config, name, seed=seed, dtype=dtype).experts.train(capacity_factor is not None)
               for name in dict.fromkeys(("eager", *backends))}
    rows = []
    for num_tokens in tokens:
        x = torch.randn(num_tokens, config.hidden_size, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
        for skew in skews:
            top_k_index, top_k_weights = skewed_routing(num_tokens, config.num_experts, config.top_k, skew, seed=seed)
            dropped = None
            if capacity_factor is not None:
                dropped = drop_pairs(top_k_index, top_k_weights, capacity_factor, drop_policy, config.num_experts)
            top_k_weights = top_k_weights.to(dtype)
            waste = memory.waste_table(layer_config, top_k_index, dropped, dtype, backends=list(backends),
                                       training=capacity_factor is not None).set_index("backend")
            point = {"num_tokens": num_tokens, "skew": float(skew), "pairs": num_tokens * config.top_k,
                     "num_experts": config.num_experts, "top_k": config.top_k, "dtype": str(dtype).split(".")[-1],
                     "capacity_factor": capacity_factor}
            # the guard: the analytic peak of this very routing (it is known), plus the inputs, never run over budget
            over = {name: int(waste.loc[name, "extra_memory_analytic"]) for name in backends
                    if waste.loc[name, "extra_memory_analytic"] + x.nbytes > budget}
            runnable = [name for name in backends if name not in over]
            timings, diffs = {}, {}
            if runnable:
                with torch.no_grad():
                    reference = experts["eager"](x, top_k_index, top_k_weights, dropped).float()
                    calls = {name: (lambda e=experts[name]: e(x, top_k_index, top_k_weights, dropped))
                             for name in runnable}
                    diffs = {name: (call().float() - reference).abs().max().item() for name, call in calls.items()}
                    measured = measure_interleaved(list(calls.values()), num_threads=num_threads, clock=clock,
                                                   min_run_time=min_run_time, min_runs=min_runs)
                timings = dict(zip(runnable, measured))
            for name in backends:
                row = {**point, "backend": name, **{c: waste.loc[name, c] for c in WASTE_COLUMNS}}
                if name in over:
                    row.update(status="skipped", reason=f"analytic peak {memory.format_bytes(over[name])} is over "
                                                        f"the memory budget {memory.format_bytes(budget)}")
                else:
                    row.update(status="ok", reason="", max_abs_diff_to_eager=diffs[name], **timings[name])
                rows.append(row)
    table = pd.DataFrame(rows)
    table.attrs["clock"] = clock
    return table


def _with_capacity(config, capacity_factor, drop_policy):
    return dataclasses.replace(config, capacity_factor=capacity_factor, drop_policy=drop_policy)


def plot_layout_sweep(table: pd.DataFrame, *, skew: float | None = None, num_tokens: int | None = None):
    """2 x 2 panels: time and analytic extra memory vs T (at `skew`, default the smallest swept) and vs skew (at
    `num_tokens`, default the largest swept), one line per backend. Returns the Figure."""
    ok = table[table["status"] == "ok"]
    if ok.empty:
        raise ValueError("the sweep has no measured point (status 'ok') to plot")
    skew = float(ok["skew"].min()) if skew is None else float(skew)
    num_tokens = int(ok["num_tokens"].max()) if num_tokens is None else int(num_tokens)
    fig = new_figure(figsize=(12, 7.5))
    axes = fig.subplots(2, 2)
    panels = [(ok[ok["skew"] == skew], "num_tokens", f"tokens T (skew {skew:g})"),
              (ok[ok["num_tokens"] == num_tokens], "skew", f"routing skew (T = {num_tokens}): 0 balanced, "
                                                          "1 one hot expert")]
    for col, (part, x, xlabel) in enumerate(panels):
        if part.empty:
            raise ValueError(f"the sweep has no point at {'skew' if x == 'num_tokens' else 'T'} = "
                             f"{skew if x == 'num_tokens' else num_tokens}")
        for name, line in part.groupby("backend", sort=False):
            line = line.sort_values(x)
            color = backend_color(name)  # the package's colour for this backend, as in every other plot
            axes[0, col].plot(line[x], line["median_ms"], marker="o", label=name, color=color)
            axes[1, col].plot(line[x], line["extra_memory_analytic"] / 2 ** 20, marker="o", label=name, color=color)
        for row, ylabel in enumerate(("median time of one call (ms)", "extra memory, analytic (MiB)")):
            ax = axes[row, col]
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            if x == "num_tokens":
                ax.set_xscale("log", base=2)
                ax.xaxis.set_major_formatter(mticker.ScalarFormatter())
            ax.set_yscale("log")
            ax.grid(True, alpha=0.3)
    axes[0, 0].legend(fontsize="small")
    first = ok.iloc[0]
    fig.suptitle(f"The five layouts: E = {first['num_experts']}, k = {first['top_k']}, {first['dtype']}, "
                 f"{'dropless' if pd.isna(first['capacity_factor']) else 'capacity factor ' + str(first['capacity_factor'])}"
                 f" ({table.attrs.get('clock', '?')} clock)")
    return fig


def fastest_layouts(table: pd.DataFrame) -> pd.DataFrame:
    """Per (T, skew): the fastest backend and each backend's time over the fastest's (a pivot for reading)."""
    ok = table[table["status"] == "ok"]
    pivot = ok.pivot_table(index=["num_tokens", "skew"], columns="backend", values="median_ms", sort=False)
    ratios = pivot.div(pivot.min(axis=1), axis=0).round(2)
    ratios.insert(0, "fastest", pivot.idxmin(axis=1))
    return ratios.reset_index()


__all__ = ["layout_sweep", "plot_layout_sweep", "fastest_layouts", "LAYOUTS"]
