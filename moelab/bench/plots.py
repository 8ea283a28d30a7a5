"""Plots of a sweep; each function returns its matplotlib Figure (nothing is shown or saved behind your back).

- `plot_time`: time vs tokens per backend (log-log), the dense limit dashed, crossovers annotated;
- `plot_memory`: peak extra memory vs tokens; skipped points drawn hollow at the guard's estimate;
- `plot_speedup_map`: baseline time / target time over (top_k, num_experts), one map per token count;
- `crossover_points`: where one backend overtakes another, as a table.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from ..backends.calibration import AUTO_CANDIDATES
from ..core.colors import backend_color
from .io import label

_MARKERS = "osD^vP*X<>"


def _prepare(table: pd.DataFrame, dtype=None) -> pd.DataFrame:
    if table.empty:
        raise ValueError("the table is empty: nothing to plot")
    t = table.copy()
    t["variant"] = t.apply(label, axis=1)
    if dtype is not None:
        dtype = str(dtype).removeprefix("torch.")
        if dtype not in set(t["dtype"]):
            raise ValueError(f"dtype {dtype!r} is not in the table (it has {sorted(set(t['dtype']))})")
        t = t[t["dtype"] == dtype]
    return t


def _facets(t: pd.DataFrame):
    rows = list(dict.fromkeys(zip(t["dtype"], t["num_experts"])))
    cols = sorted(t["top_k"].unique())
    return rows, cols


def _styles(variants):
    """(colour, marker) per variant: the backend's own colour (`moelab.core.colors`), a marker per variant."""
    return {v: (backend_color(v), _MARKERS[i % len(_MARKERS)]) for i, v in enumerate(variants)}


def crossover_points(table: pd.DataFrame, a: str = "eager", b: str = "grouped_mm", value: str = "median_ms",
                     min_gap: float = 0.0):
    """Where variant `b` overtakes `a` (or back) along num_tokens, per (dtype, num_experts, top_k, ...).

    min_gap: only count a crossing where the two differ by more than this fraction on both sides of it (0.05
    ignores near-ties, which on a noisy machine cross back and forth).

    Variants are named as in `moelab.bench.io.label` ("grouped_mm", "hf:eager", "batched_mm+compile").
    Columns: dtype, num_experts, top_k, hidden_size, intermediate_size, between (T_low, T_high),
    num_tokens_at (log-log interpolation), pairs_at, faster_after (the variant faster above the point).
    """
    t = _prepare(table)
    t = t[(t["status"] == "ok") & t["variant"].isin([a, b])]
    keys = ["dtype", "num_experts", "top_k", "hidden_size", "intermediate_size"]
    out = []
    for key, part in t.groupby(keys):
        wide = part.pivot_table(index="num_tokens", columns="variant", values=value, aggfunc="first")
        if a not in wide or b not in wide:
            continue
        wide = wide[[a, b]].dropna().sort_index()
        r = np.log(wide[a].to_numpy() / wide[b].to_numpy())  # > 0: b faster
        tokens = wide.index.to_numpy(dtype=float)
        for i in range(len(r) - 1):
            if r[i] == 0 or np.sign(r[i]) == np.sign(r[i + 1]):
                continue
            if min(abs(r[i]), abs(r[i + 1])) <= math.log1p(min_gap):
                continue
            frac = r[i] / (r[i] - r[i + 1])
            at = math.exp(math.log(tokens[i]) + frac * (math.log(tokens[i + 1]) - math.log(tokens[i])))
            out.append({**dict(zip(keys, key)), "between": (int(tokens[i]), int(tokens[i + 1])),
                        "num_tokens_at": at, "pairs_at": at * key[2], "faster_after": b if r[i + 1] > 0 else a})
    return pd.DataFrame(out, columns=keys + ["between", "num_tokens_at", "pairs_at", "faster_after"])


def _panel_grid(rows, cols) -> tuple[Figure, np.ndarray]:
    """One panel per (dtype, num_experts) row x top_k column."""
    fig = Figure(figsize=(4.2 * len(cols), 3.3 * len(rows)), layout="constrained")
    return fig, np.atleast_2d(fig.subplots(len(rows), len(cols), squeeze=False))


def _finish_panel(ax, dt, E, k, ylabel: str) -> None:
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_title(f"{dt}, E={E}, k={k}", fontsize=10)
    ax.set_xlabel("tokens T")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.25)


def _shared_legend(fig: Figure, axes: np.ndarray, max_cols: int) -> None:
    """One legend below the panels with every label any panel drew, each once."""
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), max_cols), fontsize=8)


def plot_time(table: pd.DataFrame, dtype=None, variants=None, dense: bool = True, annotate=True,
              value: str = "median_ms", min_gap: float = 0.05) -> Figure:
    """Median time vs tokens per variant, log-log, one panel per (dtype, num_experts) x top_k.

    Error bars: the interquartile range. annotate: True marks where the backends `auto` chooses among overtake
    one another (the crossovers it is calibrated by; all pairs of five backends would crowd the panels);
    or a list of (a, b) variant pairs to mark instead; crossings between near-ties (< min_gap apart on either
    side) are not marked.
    """
    t = _prepare(table, dtype)
    variants = list(variants or dict.fromkeys(t["variant"]))
    styles = _styles(variants)
    rows, cols = _facets(t)
    fig, axes = _panel_grid(rows, cols)
    if annotate is True:
        fixed = [v for v in variants if v in AUTO_CANDIDATES]
        annotate = list(itertools.combinations(fixed, 2))
    for (r, (dt, E)), (c, k) in itertools.product(enumerate(rows), enumerate(cols)):
        ax = axes[r, c]
        part = t[(t["dtype"] == dt) & (t["num_experts"] == E) & (t["top_k"] == k)]
        for v in variants:
            pts = part[(part["variant"] == v) & (part["status"] == "ok")].sort_values("num_tokens")
            if pts.empty:
                continue
            color, marker = styles[v]
            yerr = None
            if value == "median_ms":
                yerr = [pts["median_ms"] - pts["q1_ms"], pts["q3_ms"] - pts["median_ms"]]
            ax.errorbar(pts["num_tokens"], pts[value], yerr=yerr, color=color, marker=marker, ms=4, lw=1.2,
                        capsize=2, label=v, linestyle="--" if ":" in v else "-")
        if dense and value == "median_ms":
            d = part.drop_duplicates("num_tokens").dropna(subset=["dense_median_ms"]).sort_values("num_tokens")
            if not d.empty:
                ax.plot(d["num_tokens"], d["dense_median_ms"], color="k", ls=":", lw=1.2, label="dense limit")
        marks = []
        for a, b in annotate or []:
            for _, p in crossover_points(part, a, b, value, min_gap).iterrows():
                slower = a if p["faster_after"] == b else b
                text = f"{p['faster_after']} overtakes\n{slower} at T~{p['num_tokens_at']:.3g}"
                marks.append((p["num_tokens_at"], text))
        tokens = part["num_tokens"]
        for i, (at, text) in enumerate(sorted(marks)):
            ax.axvline(at, color="0.55", lw=0.8, ls="-.")
            # right of the line in the left half of the (log) axis, left of it in the right half: inside the axes
            right_half = np.log(at / tokens.min()) > 0.5 * np.log(tokens.max() / tokens.min())
            note = ax.annotate(text, (at, 0.98 - 0.15 * i), xycoords=("data", "axes fraction"),
                               xytext=(-2 if right_half else 2, 0), textcoords="offset points", va="top",
                               ha="right" if right_half else "left", fontsize=6.5, color="0.25")
            note.set_in_layout(False)  # a long note must not squeeze the plots
        if part[part["status"] == "ok"].empty:
            reasons = part["reason"].dropna()
            ax.text(0.5, 0.5, "nothing measured" + (f":\n{reasons.iloc[0][:60]}" if len(reasons) else ""),
                    ha="center", va="center", transform=ax.transAxes, fontsize=7, wrap=True)
        _finish_panel(ax, dt, E, k, "time per call (ms)" if value == "median_ms" else value)
    _shared_legend(fig, axes, 6)
    fig.suptitle("Experts forward: time vs tokens" + _env_suffix(table))
    return fig


def plot_memory(table: pd.DataFrame, dtype=None, variants=None) -> Figure:
    """Measured peak extra bytes vs tokens per variant (log-log); skipped measurements appear as hollow
    markers at the guard's estimate, the budget as a red line."""
    t = _prepare(table, dtype)
    variants = list(variants or dict.fromkeys(t["variant"]))
    styles = _styles(variants)
    rows, cols = _facets(t)
    fig, axes = _panel_grid(rows, cols)
    budget = t["budget_bytes"].dropna()
    for (r, (dt, E)), (c, k) in itertools.product(enumerate(rows), enumerate(cols)):
        ax = axes[r, c]
        part = t[(t["dtype"] == dt) & (t["num_experts"] == E) & (t["top_k"] == k)]
        for v in variants:
            color, marker = styles[v]
            pts = part[(part["variant"] == v) & (part["status"] == "ok")].dropna(subset=["peak_extra_bytes"])
            pts = pts.sort_values("num_tokens")
            if not pts.empty:
                ax.plot(pts["num_tokens"], pts["peak_extra_bytes"] / 2 ** 20, color=color, marker=marker, ms=4,
                        lw=1.2, label=v, linestyle="--" if ":" in v else "-")
            skipped = part[(part["variant"] == v) & (part["status"] == "skipped")].dropna(subset=["estimate_bytes"])
            if not skipped.empty:
                ax.scatter(skipped["num_tokens"], skipped["estimate_bytes"] / 2 ** 20, facecolors="none",
                           edgecolors=color, marker=marker, s=40, label=f"{v} (skipped: estimate)")
        if not budget.empty:
            ax.axhline(budget.iloc[0] / 2 ** 20, color="tab:red", lw=1, ls="--", label="memory budget")
        _finish_panel(ax, dt, E, k, "peak extra memory (MiB)")
    _shared_legend(fig, axes, 4)
    fig.suptitle("Experts forward: peak extra memory vs tokens" + _env_suffix(table))
    return fig


def plot_speedup_map(table: pd.DataFrame, baseline: str = "eager", target: str = "grouped_mm", dtype=None,
                     tokens=None) -> Figure:
    """Speedup = baseline time / target time over (top_k rows, num_experts columns), one map per token count
    (columns) and dtype (rows); > 1 (blue) means `target` is faster. Unmeasured cells are blank."""
    t = _prepare(table, dtype)
    t = t[t["status"] == "ok"]
    for v in (baseline, target):
        if v not in set(t["variant"]):
            raise ValueError(f"variant {v!r} has no measured rows; measured: {sorted(set(t['variant']))}")
    dtypes = list(dict.fromkeys(t["dtype"]))
    tokens = sorted(tokens or t["num_tokens"].unique())
    ks, experts = sorted(t["top_k"].unique()), sorted(t["num_experts"].unique())
    fig = Figure(figsize=(2.6 * len(tokens) + 1, 2.3 * len(dtypes) + 0.8), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(dtypes), len(tokens), squeeze=False))
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-3.0, vmax=3.0)
    image = None
    for (r, dt), (c, T) in itertools.product(enumerate(dtypes), enumerate(tokens)):
        ax = axes[r, c]
        part = t[(t["dtype"] == dt) & (t["num_tokens"] == T)]
        grid = np.full((len(ks), len(experts)), np.nan)
        for (i, k), (j, E) in itertools.product(enumerate(ks), enumerate(experts)):
            cell = part[(part["top_k"] == k) & (part["num_experts"] == E)]
            tb = cell.loc[cell["variant"] == baseline, "median_ms"]
            tt = cell.loc[cell["variant"] == target, "median_ms"]
            if len(tb) and len(tt):
                grid[i, j] = tb.iloc[0] / tt.iloc[0]
        image = ax.imshow(np.log2(grid), cmap="RdBu", norm=norm, aspect="auto")
        for (i, j), s in np.ndenumerate(grid):
            if np.isfinite(s):
                ax.text(j, i, f"{s:.2g}x", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(experts)), [str(e) for e in experts])
        ax.set_yticks(range(len(ks)), [str(k) for k in ks])
        ax.set_xlabel("num_experts")
        ax.set_ylabel("top_k")
        ax.set_title(f"{dt}, T={T}", fontsize=9)
    if image is not None:
        bar = fig.colorbar(image, ax=axes, shrink=0.8, label=f"log2({baseline} time / {target} time)")
        bar.set_ticks([-3, -2, -1, 0, 1, 2, 3])
    fig.suptitle(f"Speedup of {target} over {baseline}" + _env_suffix(table))
    return fig


def _env_suffix(table) -> str:
    env = table.attrs.get("environment") or {}
    if not env:
        return ""
    return (f"\n{env.get('device_name', '')} ({env.get('cpu_capability', '')}), {env.get('num_threads', '?')} "
            f"thread(s), torch {env.get('torch_version', '?')}, {env.get('clock', '')} clock")
