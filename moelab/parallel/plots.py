"""The pictures of expert parallelism: the send matrix as a heatmap, the phases of every rank on one time axis.

Both take plain data (a [ep, ep] array, the `frame` of `moelab.parallel.watch.EPWatch`) and return the matplotlib
Figure, so a notebook shows them and a test reads them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

# one colour per phase; the two exchanges in warm colours, so communication stands out from local work
PHASE_COLORS = {"permute": "#9ecae1", "dispatch": "#e6550d", "experts": "#3182bd", "combine": "#fd8d3c",
                "unpermute": "#c6dbef", "backward": "#756bb1"}


def _axes(ax, size):
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.add_subplot()


def _bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def plot_send_matrix(send_matrix, row_bytes: int | None = None, *, ax=None) -> Figure:
    """send_matrix [ep, ep] (pair rows rank i sends to rank j) as an annotated heatmap; with `row_bytes` (H x
    element size) each cell also gives its bytes. The diagonal stays on its rank: hatched, it never travels."""
    matrix = np.asarray(send_matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"send_matrix must be a square [ep, ep] array, got shape {matrix.shape}")
    ep = matrix.shape[0]
    fig, ax = _axes(ax, (2.8 + 1.1 * ep, 1.6 + 1.0 * ep))
    image = ax.imshow(matrix, cmap="Oranges", vmin=0, vmax=max(1, int(matrix.max())))
    fig.colorbar(image, ax=ax, label="pair rows")
    for i in range(ep):
        for j in range(ep):
            text = f"{int(matrix[i, j])}" + (f"\n{_bytes(matrix[i, j] * row_bytes)}" if row_bytes else "")
            dark = matrix[i, j] > 0.6 * max(1, matrix.max())
            ax.text(j, i, text, ha="center", va="center", fontsize="small", color="white" if dark else "black")
        ax.add_patch(_hatch(i))
    ax.set_xticks(range(ep), [f"rank {j}" for j in range(ep)])
    ax.set_yticks(range(ep), [f"rank {i}" for i in range(ep)])
    ax.set_xlabel("to (holds the experts)")
    ax.set_ylabel("from (holds the tokens)")
    off = int(matrix.sum() - np.trace(matrix))
    ax.set_title(f"send matrix: {int(matrix.sum())} pair rows,\n{off} leave their rank (off the diagonal)",
                 fontsize="medium")
    return fig


def _hatch(i: int) -> Rectangle:
    return Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, hatch="//", edgecolor="grey", linewidth=0)


def plot_timeline(frame: pd.DataFrame, *, ax=None) -> Figure:
    """One row of horizontal bars per rank: each phase from its start (`start_s`) for its `seconds`, in ms on the
    one clock all ranks of a machine share. A gap is time outside the phases (the router, the recording)."""
    missing = {"rank", "phase", "start_s", "seconds"} - set(frame.columns)
    if missing:
        raise ValueError(f"frame needs the columns rank, phase, start_s and seconds; missing {sorted(missing)}")
    ranks = sorted(frame["rank"].unique())
    fig, ax = _axes(ax, (8.0, 0.9 + 0.6 * len(ranks)))
    seen = set()
    for _, row in frame.iterrows():
        color = PHASE_COLORS.get(row["phase"], "grey")
        label = None if row["phase"] in seen else row["phase"]
        seen.add(row["phase"])
        ax.barh(row["rank"], row["seconds"] * 1e3, left=row["start_s"] * 1e3, height=0.6, color=color,
                edgecolor="black", linewidth=0.4, label=label)
    ax.set_yticks(ranks, [f"rank {r}" for r in ranks])
    ax.invert_yaxis()  # rank 0 on top, as in the send matrix
    ax.set_xlabel("ms from the first rank's first phase")
    ax.set_title("the phases of one expert-parallel forward, per rank", fontsize="medium")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    return fig
