"""Pictures of the memory model: live bytes after each step (`plot_memory`) and batched_mm's weight duplication
against the number of tokens (`plot_duplication`); and `NotebookFigure`, the Figure every moelab plot returns.

Drawn with matplotlib, headless-safe (nothing here picks a backend or calls `show`); axes carry units.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from .estimate import MODELLED_BACKENDS, analytic
from .records import MemoryEstimate, format_bytes

__all__ = ["NotebookFigure", "new_figure", "new_axes", "plot_memory", "plot_duplication"]

MIB = 2 ** 20


class NotebookFigure(Figure):
    """A matplotlib Figure outside pyplot (no global figure list, no GUI, no double display in Jupyter) that still
    shows itself as a PNG when it is a notebook cell's value, even in a kernel that never imported pyplot."""

    def __repr__(self) -> str:
        return super().__repr__().replace(type(self).__name__, "Figure", 1)  # as any Figure prints

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.savefig(buffer, format="png", dpi=80)
        return buffer.getvalue()


def new_figure(**kwargs) -> NotebookFigure:
    """A constrained-layout `NotebookFigure` (kwargs as for `matplotlib.figure.Figure`)."""
    return NotebookFigure(layout="constrained", **kwargs)


def new_axes(ax, figsize=(6.4, 4.0)):
    """(figure, ax): the given `ax` and its figure, or a new figure with one axes."""
    if ax is not None:
        return ax.figure, ax
    fig = new_figure(figsize=figsize)
    return fig, fig.add_subplot()


def _estimates(source, num_tokens, dtype, backends) -> list[MemoryEstimate]:
    if isinstance(source, MemoryEstimate):
        return [source]
    # a trace's Call has `memory_estimate()`, a Trace has `calls` (duck-typed: memory sits below inspection)
    if hasattr(source, "memory_estimate") or hasattr(source, "calls"):
        calls = [source] if hasattr(source, "memory_estimate") else source.calls
        seen, out = set(), []
        for c in calls:
            estimate = c.memory_estimate()
            if estimate is not None and c.backend not in seen:
                seen.add(c.backend)
                out.append(estimate)
        if not out:
            raise ValueError("no call of this trace has a memory model (backends with one: "
                             f"{list(MODELLED_BACKENDS)})")
        return out
    if isinstance(source, (list, tuple)) and source and all(isinstance(e, MemoryEstimate) for e in source):
        return list(source)
    if hasattr(source, "num_experts"):
        if num_tokens is None:
            raise ValueError("plot_memory(config, ...) needs num_tokens")
        return [analytic(source, num_tokens, b, dtype) for b in backends]
    raise TypeError("plot_memory takes a MoEConfig (with num_tokens), a MemoryEstimate, a list of them, "
                    f"a Trace or a Call; got {type(source).__name__}")


def plot_memory(source, num_tokens: int | None = None, dtype=torch.float32, *, backends: Sequence[str] = MODELLED_BACKENDS,
                axes=None):
    """Analytic live memory after each step, one panel per backend (each with its own scale): bars = bytes live at
    the end of the step, dots = the highest inside it, dashed line = the call's peak."""
    estimates = _estimates(source, num_tokens, dtype, backends)
    if axes is None:
        fig = new_figure(figsize=(4.2 * len(estimates), 3.8))
        axes = fig.subplots(1, len(estimates), squeeze=False)[0]
    else:
        axes = np.atleast_1d(axes)
        fig = axes[0].figure
    for ax, est in zip(axes, estimates):
        labels = [s.step if s.step != "expert" else s.detail.split(",")[0].replace("expert_id=", "expert ")
                  for s in est.steps]
        x = np.arange(len(labels))
        live = np.array([s.live_bytes for s in est.steps]) / MIB
        peak = np.array([s.peak_bytes for s in est.steps]) / MIB
        ax.bar(x, live, color="tab:blue", label="live at end of step")
        ax.plot(x, peak, "o", color="tab:orange", markersize=4, label="highest inside step")
        ax.axhline(est.peak_bytes / MIB, color="tab:red", linestyle="--", linewidth=1,
                   label=f"peak {format_bytes(est.peak_bytes)}")
        ax.set_xticks(x, labels, rotation=60, ha="right", fontsize="small")
        ax.set_ylabel("live memory (MiB)")
        ax.set_xlabel("step")
        s = est.sizes
        path = "" if est.path == "plain" else f" ({est.path} path)"
        ax.set_title(f"{est.backend}, T={s['T']}{path}", fontsize="medium")
        ax.legend(fontsize="x-small", loc="upper left")
    return fig


def plot_duplication(config, token_counts: Sequence[int] | None = None, dtype=torch.float32, *,
                     measured: dict[int, int] | None = None, ax=None):
    """batched_mm's duplication factor vs tokens: bytes of the per-pair weight copies over the layer's own expert
    weights (= T*k/E), on log axes; `measured`: {T: duplicated bytes} from traces, drawn as points."""
    if token_counts is None:
        token_counts = [2 ** i for i in range(0, 13)]
    token_counts = sorted(int(t) for t in token_counts)
    estimates = [analytic(config, t, "batched_mm", dtype) for t in token_counts]
    factors = np.array([e.duplication_factor for e in estimates])
    fig, ax = new_axes(ax)
    ax.plot(token_counts, factors, "-o", color="tab:blue", markersize=3, label="analytic: T*k/E")
    ax.axhline(1.0, color="0.5", linestyle=":", label="copies = the layer's expert weights")
    if measured:
        weight_bytes = estimates[0].weight_bytes
        ts = sorted(measured)
        ax.plot(ts, [measured[t] / weight_bytes for t in ts], "s", color="tab:red", label="recorded in traces")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("tokens T (count)")
    ax.set_ylabel("duplicated weight bytes / expert weight bytes (x)")
    weight = estimates[0].weight_bytes
    secondary = ax.secondary_yaxis("right", functions=(lambda f: f * weight / MIB, lambda m: m * MIB / weight))
    secondary.set_ylabel("duplicated weights (MiB)")
    ax.set_title(f"batched_mm duplication: E={config.num_experts}, k={config.top_k}, "
                 f"weights {format_bytes(weight)}", fontsize="medium")
    ax.legend(fontsize="small")
    return fig
