"""Pictures of a training run's routing; each function returns its Figure (nothing is shown or saved for you).

- `plot_load_over_training`: load / mean load per expert over the steps, one heatmap per MoE layer;
- `plot_balance_curves`: a history metric over the steps, one line per run (collapse and recovery);
- `plot_drop_rate_vs_capacity`: dropped pairs vs the capacity factor, one line per policy;
- `plot_specialisation`: the expert x topic shares, NMI in the title;
- `plot_expert_by_token`, `plot_expert_by_position`: routing by token id, and by position with its drop rate.

Letters as in `moelab.training.analysis` (U steps, M MoE layers, K topics, N positions, V vocabulary).
Load is drawn as load / mean load on one diverging scale: white = the uniform share, red = overloaded,
blue = starved.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from matplotlib import colormaps
from matplotlib.colors import TwoSlopeNorm
from matplotlib.ticker import MaxNLocator, PercentFormatter

from ..memory.plots import new_axes, new_figure
from .analysis import (LAYER_METRICS, load_array, metric_by_layer, normalized_mutual_information, to_numpy,
                       token_id_routing_consistency)

__all__ = [
    "plot_load_over_training", "plot_balance_curves", "plot_drop_rate_vs_capacity", "plot_specialisation",
    "plot_expert_by_token", "plot_expert_by_position",
]

BALANCE_CMAP = "RdBu_r"
LINE_STYLES = ("-", "--", ":", "-.")
LAYER_REDUCTIONS = ("max", "min", "mean")  # plot_balance_curves' ways to make one line of a per-layer metric
SHARE_CMAP = "Blues"


def _relative_load(load: np.ndarray) -> np.ndarray:
    """load / mean over experts (the last axis); NaN where nothing was routed."""
    mean = load.mean(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, load / mean, np.nan)


def _balance_norm(relative: np.ndarray) -> TwoSlopeNorm:
    top = np.nanmax(relative) if np.isfinite(relative).any() else 2.0
    return TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, float(top)))


def _shares(counts: np.ndarray) -> np.ndarray:
    """Each row over its sum (rows sum to 1); NaN rows where the row is empty."""
    total = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, counts / total, np.nan)


def _cmap(name: str):
    return colormaps[name].with_extremes(bad="0.85")  # empty rows / steps: light grey


def _annotate(ax, shares: np.ndarray) -> None:
    """Writes each share in its cell, white on the dark end of the [0, 1] scale."""
    for (i, j), value in np.ndenumerate(shares):
        if np.isfinite(value):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize="x-small",
                    color="white" if value > 0.6 else "black")


def plot_load_over_training(source, layer: int | Sequence[int] | None = None):
    """Load / mean load of each expert at each step, a heatmap experts x steps per MoE layer (one row of axes a
    layer, one shared colorbar). `source`: a history DataFrame (`load/{l}/{e}` columns) or a load array
    [U, M, E] (or [U, E], one layer); `layer`: an int or a list of them (default every layer)."""
    if isinstance(source, pd.DataFrame):
        load = load_array(source)  # [U, M, E]
        steps = source["step"].to_numpy() if "step" in source else np.arange(1, len(source) + 1)
    else:
        load = to_numpy(source, "source")
        if load.ndim == 2:
            load = load[:, None, :]
        if load.ndim != 3:
            raise ValueError(f"source must be a history DataFrame or a load array [U, M, E], got shape {load.shape}")
        steps = np.arange(1, load.shape[0] + 1)
    if load.shape[0] == 0:
        raise ValueError("source has no steps: nothing to plot")
    num_layers, num_experts = load.shape[1:]
    layers = list(range(num_layers)) if layer is None else [layer] if np.isscalar(layer) else list(layer)
    bad = [l for l in layers if not isinstance(l, (int, np.integer)) or not 0 <= l < num_layers]
    if bad or not layers:
        raise ValueError(f"layer must be None, or ids in [0, {num_layers}) of the source's layers, got {layer!r}")
    relative = _relative_load(load[:, layers, :])  # [U, layers, E]
    norm = _balance_norm(relative)
    fig = new_figure(figsize=(8.0, 0.8 + max(1.6, 0.14 * num_experts) * len(layers)))
    axes = fig.subplots(len(layers), 1, sharex=True, squeeze=False)[:, 0]
    half = (steps[1] - steps[0]) / 2 if len(steps) > 1 else 0.5
    extent = (steps[0] - half, steps[-1] + half, num_experts - 0.5, -0.5)
    for ax, l, values in zip(axes, layers, np.moveaxis(relative, 1, 0)):
        image = ax.imshow(values.T, aspect="auto", cmap=_cmap(BALANCE_CMAP), norm=norm, extent=extent,
                          interpolation="nearest")
        ax.set_ylabel(f"layer {l}\nexpert (id)")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(num_experts, 8)))
    axes[-1].set_xlabel("optimizer step")
    axes[0].set_title("Load per expert over training (load / mean load; 1 = uniform)", fontsize="medium")
    fig.colorbar(image, ax=list(axes), label="load / mean load (x)")
    return fig


def _curves(history: pd.DataFrame, metric: str, layer) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], bool]:
    """({label suffix: (steps, values)} of one run, NaN points left out; whether `metric` is per layer)."""
    steps = history["step"].to_numpy() if "step" in history else np.arange(1, len(history) + 1)
    if metric in history.columns:
        series = {"": history[metric].to_numpy(dtype=np.float64)}
    elif metric in LAYER_METRICS or any(str(c).startswith(f"{metric}/") for c in history.columns):
        per_layer = metric_by_layer(history, metric)  # [U, M]
        if layer in LAYER_REDUCTIONS:
            with warnings.catch_warnings():  # a step no layer logged: NaN, left out below
                warnings.simplefilter("ignore", RuntimeWarning)
                series = {"": getattr(np, f"nan{layer}")(per_layer, axis=1)}
        elif layer == "each":
            series = {f", layer {l}": per_layer[:, l] for l in range(per_layer.shape[1])}
        elif isinstance(layer, (int, np.integer)) and not isinstance(layer, bool) and 0 <= layer < per_layer.shape[1]:
            series = {"": per_layer[:, layer]}
        else:
            raise ValueError(f"layer must be 'max', 'min', 'mean' (over layers), 'each' or an id in "
                             f"[0, {per_layer.shape[1]}), got {layer!r}")
        return {suffix: (steps[np.isfinite(v)], v[np.isfinite(v)]) for suffix, v in series.items()}, True
    else:
        raise ValueError(f"metric {metric!r} is not a column of the history nor a per-layer metric "
                         f"({list(LAYER_METRICS)})")
    return {suffix: (steps[np.isfinite(v)], v[np.isfinite(v)]) for suffix, v in series.items()}, False


def plot_balance_curves(histories, metric: str = "max_mean_load", *, layer: int | str | None = "max", smooth: int = 1,
                        logy: bool = False, ax=None):
    """One history metric over the steps, one line per run: `histories` {run name: history DataFrame} (or one
    DataFrame). A per-layer metric ("max_mean_load", "drop_rate", "router_entropy") is reduced over the layers
    (`layer="max"` or None, "min", "mean"), taken from one layer (`layer=l`) or drawn one line a layer (`"each"`);
    any other column (`loss`, `aux_loss`, `z_loss`, `val_loss`, ...) is drawn as is. NaN steps are left out;
    `smooth`: a rolling mean over this many points. max_mean_load gets the y = 1 line of perfect balance."""
    layer = "max" if layer is None else layer
    if isinstance(histories, pd.DataFrame):
        histories = {"run": histories}
    if not isinstance(histories, Mapping) or not histories:
        raise ValueError("histories must be a non-empty {run name: history DataFrame} dict (or one DataFrame)")
    if isinstance(smooth, bool) or not isinstance(smooth, int) or smooth < 1:
        raise ValueError(f"smooth must be an int >= 1 (points in the rolling mean), got {smooth!r}")
    fig, ax = new_axes(ax, figsize=(7.0, 4.0))
    per_layer = False
    for i, (name, history) in enumerate(histories.items()):
        if not isinstance(history, pd.DataFrame):
            raise ValueError(f"histories[{name!r}] must be a history DataFrame, got {type(history).__name__}")
        curves, per_layer = _curves(history, metric, layer)
        for j, (suffix, (steps, values)) in enumerate(curves.items()):
            if smooth > 1:
                values = pd.Series(values).rolling(smooth, min_periods=1).mean().to_numpy()
            ax.plot(steps, values, LINE_STYLES[j % len(LINE_STYLES)], color=f"C{i % 10}", linewidth=1.3,
                    marker="o" if len(steps) <= 50 else None, markersize=3, label=f"{name}{suffix}")
    if metric == "max_mean_load":
        ax.axhline(1.0, color="0.4", linestyle=":", linewidth=1, label="perfect balance (1)")
    if logy:
        ax.set_yscale("log")
    if metric == "drop_rate":
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    which = (f"{layer} over layers" if layer in LAYER_REDUCTIONS else "each layer" if layer == "each"
             else f"layer {layer}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"{metric} ({which})" if per_layer else metric)
    ax.set_title(f"{metric} over training" + (f", rolling mean of {smooth} steps" if smooth > 1 else ""),
                 fontsize="medium")
    ax.legend(fontsize="small")
    return fig


def plot_drop_rate_vs_capacity(capacity_factors, drop_rates, labels: Sequence[str] | None = None, *, ax=None):
    """Fraction of pairs dropped vs capacity factor, one line per policy: `drop_rates` [C] (one line) or [P, C]
    (one per row), or {label: [C]}; `capacity_factors` [C] shared by all lines, or [P, C]."""
    if isinstance(drop_rates, Mapping):
        if labels is not None:
            raise ValueError("labels must be None when drop_rates is a {label: rates} dict")
        labels, drop_rates = list(drop_rates), [to_numpy(v, "drop_rates") for v in drop_rates.values()]
    rates = to_numpy(drop_rates, "drop_rates")
    rates = rates[None, :] if rates.ndim == 1 else rates  # [P, C]
    factors = to_numpy(capacity_factors, "capacity_factors")
    if factors.ndim == 1 and rates.ndim == 2 and factors.shape[0] == rates.shape[1]:
        factors = np.broadcast_to(factors, rates.shape)  # one x axis for every line
    if rates.ndim != 2 or factors.shape != rates.shape:
        raise ValueError(f"capacity_factors {np.shape(capacity_factors)} and drop_rates {np.shape(drop_rates)} must "
                         "be [C] and [C] or [P, C], capacity_factors may be [C] for all P lines")
    if labels is not None and len(labels) != rates.shape[0]:
        raise ValueError(f"labels must name each of the {rates.shape[0]} lines, got {len(labels)}")
    fig, ax = new_axes(ax)
    for i, (x, y) in enumerate(zip(factors, rates)):
        order = np.argsort(x)
        ax.plot(x[order], y[order], "-o", markersize=4, color=f"C{i % 10}",
                label=None if labels is None else str(labels[i]))
    ax.axvline(1.0, color="0.5", linestyle=":", linewidth=1, label="capacity = T*k/E pairs per expert")
    ax.set_xlabel("capacity factor (x the balanced share T*k/E)")
    ax.set_ylabel("pairs dropped (% of T*k)")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylim(bottom=0)
    ax.set_title("Drop rate vs capacity factor", fontsize="medium")
    ax.legend(fontsize="small")
    return fig


def plot_specialisation(counts, topic_names: Sequence[str] | None = None, *, ax=None):
    """The expert x topic matrix counts [E, K] (`specialisation_matrix`) as shares of each expert's pairs (rows
    sum to 1; grey = an expert with no pair), the normalised mutual information in the title."""
    c = to_numpy(counts, "counts")
    if c.ndim != 2:
        raise ValueError(f"counts must be [E, K], got shape {c.shape}")
    num_experts, num_topics = c.shape
    if topic_names is not None and len(topic_names) != num_topics:
        raise ValueError(f"topic_names must name each of the K = {num_topics} topics, got {len(topic_names)}")
    shares = _shares(c)  # [E, K]
    fig, ax = new_axes(ax, figsize=(2.6 + 0.6 * min(num_topics, 16), min(8.0, 1.6 + 0.3 * num_experts)))
    image = ax.imshow(shares, aspect="auto", cmap=_cmap(SHARE_CMAP), vmin=0, vmax=1, interpolation="nearest")
    ax.figure.colorbar(image, ax=ax, label="share of the expert's pairs", aspect=30)
    if num_experts <= 16 and num_topics <= 12:
        _annotate(ax, shares)
    names = [str(t) for t in topic_names] if topic_names is not None else [str(t) for t in range(num_topics)]
    ax.set_xticks(range(num_topics), names, rotation=45 if topic_names is not None else 0, ha="right"
                  if topic_names is not None else "center")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(num_experts, 16)))
    ax.set_xlabel("topic" if topic_names is not None else "topic (id)")
    ax.set_ylabel("expert (id)")
    ax.set_title(f"Expert specialisation: NMI = {normalized_mutual_information(c):.3f}", fontsize="medium")
    return ax.figure


def plot_expert_by_token(counts, top: int = 32, *, top_k: int = 1,
                         token_names: Sequence[str] | Callable[[int], str] | None = None, ax=None):
    """Where the `top` most frequent token ids of counts [V, E] (`expert_by_token`) go: shares of each id's
    pairs over the experts (rows sum to 1). `token_names`: a list indexed by id or a function id -> text
    (e.g. a tokenizer's decode); the title gives `token_id_routing_consistency` over all ids."""
    c = to_numpy(counts, "counts")
    if c.ndim != 2:
        raise ValueError(f"counts must be [V, E], got shape {c.shape}")
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be an int >= 1 (token ids to show), got {top!r}")
    totals = c.sum(axis=1)  # [V]
    ids = [i for i in np.argsort(-totals, kind="stable")[:top] if totals[i] > 0]
    if not ids:
        raise ValueError("counts must hold at least one pair")
    name = token_names if callable(token_names) else (lambda i: str(token_names[i])) if token_names else None
    tick_labels = [f"{i}" if name is None else f"{name(int(i))!r} ({i})" for i in ids]
    shares = _shares(c[ids])  # [top, E]
    num_experts = c.shape[1]
    fig, ax = new_axes(ax, figsize=(2.4 + max(3.0, 0.3 * num_experts), 1.4 + 0.2 * len(ids)))
    image = ax.imshow(shares, aspect="auto", cmap=_cmap(SHARE_CMAP), vmin=0, vmax=1, interpolation="nearest")
    ax.figure.colorbar(image, ax=ax, label="share of the id's pairs")
    ax.set_yticks(range(len(ids)), tick_labels, fontsize="small" if len(ids) <= 32 else "x-small")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(num_experts, 16)))
    ax.set_xlabel("expert (id)")
    ax.set_ylabel("token id (most frequent first)")
    consistency = token_id_routing_consistency(c, top_k=min(top_k, num_experts))
    ax.set_title(f"Routing by token id: top-{top_k} consistency = {consistency:.2f}", fontsize="medium")
    return ax.figure


def plot_expert_by_position(counts, drop_rate=None):
    """Load / mean load of each expert at each position of the sequence, from counts [N, E]
    (`expert_by_position`); with `drop_rate` [N] (`drop_rate_by_position`) a second panel below draws it."""
    c = to_numpy(counts, "counts")
    if c.ndim != 2:
        raise ValueError(f"counts must be [N, E], got shape {c.shape}")
    seq_len, num_experts = c.shape
    rates = None if drop_rate is None else to_numpy(drop_rate, "drop_rate")
    if rates is not None and rates.shape != (seq_len,):
        raise ValueError(f"drop_rate must be [N] with N = {seq_len} positions, got shape {rates.shape}")
    relative = _relative_load(c)  # [N, E]
    heat_height = max(1.8, 0.14 * num_experts)
    fig = new_figure(figsize=(8.0, 1.2 + heat_height + (1.8 if rates is not None else 0)))
    # a narrow column for the colorbar, so a drop-rate panel below lines up with the heatmap
    grid = fig.add_gridspec(1 if rates is None else 2, 2, width_ratios=[40, 1],
                            height_ratios=[heat_height] if rates is None else [heat_height, 1.6])
    heat = fig.add_subplot(grid[0, 0])
    image = heat.imshow(relative.T, aspect="auto", cmap=_cmap(BALANCE_CMAP), norm=_balance_norm(relative),
                        extent=(-0.5, seq_len - 0.5, num_experts - 0.5, -0.5), interpolation="nearest")
    fig.colorbar(image, cax=fig.add_subplot(grid[0, 1]), label="load / mean load (x)")
    heat.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(num_experts, 8)))
    heat.set_ylabel("expert (id)")
    heat.set_title("Routing by position in the sequence (load / mean load; 1 = uniform)", fontsize="medium")
    bottom = heat
    if rates is not None:
        bottom = fig.add_subplot(grid[1, 0], sharex=heat)
        heat.tick_params(labelbottom=False)
        bottom.plot(np.arange(seq_len), rates, color="tab:red", linewidth=1.3)
        bottom.yaxis.set_major_formatter(PercentFormatter(1.0))
        bottom.set_ylim(bottom=0)
        bottom.set_ylabel("pairs dropped")
    bottom.set_xlabel("position in the sequence")
    return fig
