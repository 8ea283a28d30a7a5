"""How the analytic peak of one MoE call grows with the tokens T, backend by backend: a table and its plot.

The estimates assume balanced routing (T*k/E pairs per expert) unless the config's call says otherwise; see
`analytic`. The plot's unit follows the data (KiB, MiB or GiB), so small layers are not drawn in fractions of MiB.
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd
import torch
from matplotlib.figure import Figure

from ..core.colors import backend_color
from .estimate import analytic

UNITS = (("B", 1), ("KiB", 2 ** 10), ("MiB", 2 ** 20), ("GiB", 2 ** 30), ("TiB", 2 ** 40))


def byte_unit(largest_bytes: float) -> tuple[str, int]:
    """The unit (name, bytes) in which `largest_bytes` reads as 1 ... 1023."""
    name, size = UNITS[0]
    for name_, size_ in UNITS:
        if largest_bytes >= size_:
            name, size = name_, size_
    return name, size


def peak_table(config, token_counts: Sequence[int],
               backends: Sequence[str] = ("eager", "batched_mm", "grouped_mm"), dtype=torch.float32) -> pd.DataFrame:
    """Analytic peak bytes of one call: one row per T in `token_counts` (index "T"), one column per backend."""
    if not token_counts or any(not isinstance(t, int) or isinstance(t, bool) or t < 1 for t in token_counts):
        raise ValueError(f"token_counts must be a non-empty list of ints >= 1 (drawn on a log axis), "
                         f"got {token_counts!r}")
    rows = [{"T": t, **{b: analytic(config, t, b, dtype).peak_bytes for b in backends}} for t in token_counts]
    return pd.DataFrame(rows).set_index("T")


def plot_peaks(config, token_counts: Sequence[int],
               backends: Sequence[str] = ("eager", "batched_mm", "grouped_mm"), dtype=torch.float32,
               ax=None) -> Figure:
    """`peak_table` drawn log-log against T, each backend in its colour, the layer's expert weights as a line."""
    peaks = peak_table(config, token_counts, backends, dtype)
    weights = analytic(config, 1, backends[0], dtype).weight_bytes
    unit, size = byte_unit(max(peaks.to_numpy().max(), weights))
    if ax is None:
        fig = Figure(figsize=(6.5, 4))
        ax = fig.subplots()
    else:
        fig = ax.figure
    for backend in peaks.columns:
        ax.plot(peaks.index, peaks[backend] / size, "o-", label=backend, color=backend_color(backend))
    ax.axhline(weights / size, color="gray", ls=":", label="the layer's expert weights")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens T")
    ax.set_ylabel(f"analytic peak ({unit})")
    ax.set_title(f"peak of one call, {str(dtype).removeprefix('torch.')}, balanced routing", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig
