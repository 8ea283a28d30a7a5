"""The rows each experts layout computes, in its order, read from a trace: `layout_rows` and its pictures.

A backend lays the S = T * k (token, expert) pairs out as the rows of its expert matmuls: eager loops over the hit
experts, batched_mm keeps token order (dropped pairs too, weighed by 0), grouped_mm sorts the kept pairs by
expert, capacity writes them into E fixed groups of C rows (padding where a group is short) and block_aligned pads
each sorted group up to a multiple of M rows inside a static bound of R rows. `layout_rows(call)` reads that layout
back from the call's recorded tensors only (nothing is recomputed), `plot_layout` draws it as one strip of cells,
`plot_layouts` stacks several on one shared row axis so their lengths compare directly.

Imports `moelab.core` and `moelab.memory` (its figure helpers) and the records; `plots` uses it, never the
reverse.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.collections import LineCollection
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.transforms import ScaledTranslation

from ..core.colors import expert_colormap
from ..core.stage import stage_label
from ..memory.plots import new_axes, new_figure
from .records import Call

__all__ = ["LayoutRows", "layout_rows", "plot_layout", "plot_layouts"]

PADDING_COLOR = "0.88"
DROPPED_COLOR = "black"
GROUP_END_COLOR = "red"
BORDERS_UP_TO = 96  # cell borders only while a cell is wide enough to see one


@dataclass(frozen=True, eq=False)
class LayoutRows:
    """The rows a call's backend computes, in the order it computes them.

    expert [N], pair [N]: expert id and pair id (t * k + j) of each row, -1 for a padding row (computed, holds no
    pair); dropped_computed [N]: rows of a dropped pair computed anyway (batched_mm, weight 0); dropped_pairs [D]:
    dropped pairs given no row, dropped_experts [D] their experts (-1 where the trace has no routing);
    group_ends: where each expert's group of rows ends (None without groups: batched_mm); unused_rows: rows
    allocated but not computed (block_aligned's static bound slack); num_experts, top_k: E and k.
    """

    backend: str
    expert: np.ndarray
    pair: np.ndarray
    dropped_computed: np.ndarray
    dropped_pairs: np.ndarray
    dropped_experts: np.ndarray
    group_ends: np.ndarray | None
    unused_rows: int
    num_experts: int
    top_k: int

    @property
    def rows_computed(self) -> int:
        """N: the rows the expert matmuls run over."""
        return int(self.expert.shape[0])

    @property
    def padding_rows(self) -> int:
        """Computed rows that hold no pair."""
        return int((self.pair < 0).sum())

    @property
    def useful_rows(self) -> int:
        """Computed rows whose pair counts (kept): N minus padding minus dropped-but-computed."""
        return self.rows_computed - self.padding_rows - int(self.dropped_computed.sum())

    @property
    def dropped(self) -> int:
        """Dropped pairs, computed or not."""
        return int(self.dropped_computed.sum()) + int(self.dropped_pairs.shape[0])

    def __repr__(self) -> str:
        return (f"LayoutRows({self.backend}: {self.rows_computed} rows computed, {self.useful_rows} useful, "
                f"{self.padding_rows} padding, {self.dropped} dropped, {self.unused_rows} unused)")


# --------------------------------------------------------------------------------------------- reading a call


def source_call(source, call: int) -> Call:
    """The Call itself, or call number `call` of a Trace."""
    if isinstance(source, Call):
        return source
    if hasattr(source, "calls"):  # a Trace (duck-typed: trace imports plots, which imports this module)
        if not source.calls:
            raise ValueError("the trace recorded no MoE call: run the module inside the `with moelab.inspect(...)` "
                             "block")
        try:
            return source.calls[call]
        except IndexError:
            raise ValueError(f"call={call} but the trace has {len(source.calls)} calls") from None
    raise TypeError(f"expected a moelab Trace or Call, got {type(source).__name__}")


def _backend(c: Call) -> str:
    """The backend that ran: `auto` delegates and says which in its step."""
    auto = c.find("auto")
    if auto and "chosen" in auto[0].info:
        return str(auto[0].info["chosen"])
    return str(c.backend)


def _array(c: Call, backend: str, step, key: str) -> np.ndarray:
    """Tensor `key` of `step` as an int numpy array; a shapes-only trace cannot give one."""
    if key not in step.tensors:
        raise ValueError(f"call {c.index} ({c.layer}, backend {backend}): step {step.name!r} recorded no {key!r}, "
                         f"which the {backend} layout needs")
    t = step.tensors[key]
    if t.device.type == "meta":
        raise ValueError(f"call {c.index} ({c.layer}, backend {backend}): the {backend} layout needs the values of "
                         f"step {step.name!r}, but this trace kept only shapes (keep_tensors=False); inspect with "
                         "keep_tensors=True")
    return t.detach().to("cpu", torch.long).numpy()


def _values(c: Call, backend: str, name: str, *keys: str) -> list[np.ndarray]:
    """The tensors `keys` of the (first) step `name`; a ValueError says which step is missing."""
    found = c.find(name)
    if not found:
        raise ValueError(f"call {c.index} ({c.layer}, backend {backend}) has no {name!r} step, which the {backend} "
                         "layout is read from")
    return [_array(c, backend, found[0], k) for k in keys]


def _kept(c: Call, backend: str) -> np.ndarray | None:
    """route's kept [S] bool (None where the router could not drop, or there is no router in the trace)."""
    route = c.find("route")
    if not route or "kept" not in route[0].tensors:
        return None
    return _values(c, backend, "route", "kept")[0].reshape(-1).astype(bool)


def _routed_experts(c: Call, backend: str) -> np.ndarray | None:
    """route's top_k_index.flatten() [S], or None without a router step."""
    route = c.find("route")
    if not route:
        return None
    return _values(c, backend, "route", "top_k_index")[0].reshape(-1)


# Each reader below turns its backend's steps into (expert [N], pair [N], group_ends or None, unused_rows,
# S, E, k); `layout_rows` adds what the routing says about drops.


def _eager(c, backend):
    (mask,) = _values(c, backend, "expert_mask", "expert_mask")  # [E, k, T]
    num_experts, top_k, num_tokens = mask.shape
    expert, pair, ends = [], [], []
    for step in c.find("expert"):  # one per hit expert, in the loop's order
        token_idx = _array(c, backend, step, "token_idx")  # [n]
        top_k_pos = _array(c, backend, step, "top_k_pos")  # [n]: the slot j of each pair
        expert.append(np.full(token_idx.shape[0], int(step.info["expert_id"])))
        pair.append(token_idx * top_k + top_k_pos)
        ends.append(token_idx.shape[0])
    expert = np.concatenate(expert) if expert else np.zeros(0, dtype=np.int64)  # [N]
    pair = np.concatenate(pair) if pair else np.zeros(0, dtype=np.int64)  # [N]
    return expert, pair, np.cumsum(ends).astype(np.int64), 0, num_tokens * top_k, num_experts, top_k


def _batched_mm(c, backend):
    (expert_ids,) = _values(c, backend, "gather_weights", "expert_ids")  # [S]: top_k_index.flatten()
    num_pairs = expert_ids.shape[0]
    top_k = _top_k(c, backend)
    num_experts = c.find("gather_weights")[0].tensors["gate_up_proj"].shape[0]
    return expert_ids, np.arange(num_pairs), None, 0, num_pairs, num_experts, top_k


def _top_k(c, backend):
    """k, from the routing or the layer's sizes."""
    route = c.find("route")
    if route:
        return int(route[0].tensors["top_k_index"].shape[-1])
    if c.sizes and "top_k" in c.sizes:
        return int(c.sizes["top_k"])
    raise ValueError(f"call {c.index} ({c.layer}, backend {backend}) says neither k nor its routing")


def _grouped_mm(c, backend):
    perm, sorted_expert_ids = _values(c, backend, "sort", "perm", "sorted_expert_ids")  # [S_kept] each
    (offsets,) = _values(c, backend, "offsets", "offsets")  # [E]
    route = c.find("route")
    if route:  # with drops perm holds the kept pairs only: S comes from the routing
        num_pairs, top_k = route[0].tensors["top_k_index"].numel(), int(route[0].tensors["top_k_index"].shape[-1])
    elif c.find("unsort"):  # an Experts call: the unsorted rows are all S pairs
        num_pairs, top_k = c.find("unsort")[0].tensors["unsorted"].shape[0], _top_k(c, backend)
    else:
        num_pairs, top_k = perm.shape[0], _top_k(c, backend)
    return sorted_expert_ids, perm, offsets, 0, num_pairs, offsets.shape[0], top_k


def _capacity(c, backend):
    buffer_rows, tokens_per_expert = _values(c, backend, "positions", "buffer_rows", "tokens_per_expert")
    step = c.find("positions")[0]
    if "capacity" not in step.info:
        raise ValueError(f"call {c.index} ({c.layer}, backend {backend}): step 'positions' recorded no capacity")
    capacity, num_experts = int(step.info["capacity"]), tokens_per_expert.shape[0]
    num_rows = num_experts * capacity  # E * C; row E * C is the spare row of the dropped pairs, never computed
    top_k = int(buffer_rows.shape[-1])
    flat_rows = buffer_rows.reshape(-1)  # [S]
    placed = flat_rows < num_rows
    pair = np.full(num_rows, -1, dtype=np.int64)  # [E * C]; -1 where no pair was written: padding
    pair[flat_rows[placed]] = np.flatnonzero(placed)
    expert = np.repeat(np.arange(num_experts), capacity)  # [E * C]: row e * C + slot
    expert = np.where(pair >= 0, expert, -1)
    ends = (np.arange(num_experts) + 1) * capacity  # [E]
    return expert, pair, ends, 0, flat_rows.shape[0], num_experts, top_k


def _block_aligned(c, backend):
    sorted_pair_ids, padded_offsets, buffer_rows = _values(c, backend, "align", "sorted_pair_ids", "padded_offsets",
                                                           "buffer_rows")  # [R], [E], [S]
    num_pairs, bound = buffer_rows.shape[0], sorted_pair_ids.shape[0]  # S, R = S + E * (M - 1)
    used = int(padded_offsets[-1]) if padded_offsets.shape[0] else 0  # the grouped matmul stops here
    ids = sorted_pair_ids[:used]  # [N]
    pair = np.where(ids == num_pairs, -1, ids)  # the sentinel S marks a padding row
    group = np.searchsorted(padded_offsets, np.arange(used), side="right")  # [N]: each row's padded group
    expert = np.where(pair >= 0, group, -1)
    return expert, pair, padded_offsets, bound - used, num_pairs, padded_offsets.shape[0], _top_k(c, backend)


def layout_rows(call) -> LayoutRows:
    """The rows call `call` (a Call, or a Trace's first call) computes, in its backend's order, from its recorded
    tensors: eager's `expert` steps, batched_mm's `gather_weights`, grouped_mm's `sort` and `offsets`, capacity's
    `positions`, block_aligned's `align` (an `auto` call: the backend it chose)."""
    c = source_call(call, 0)
    backend = _backend(c)
    if c.find("align"):
        read = _block_aligned
    elif c.find("positions"):
        read = _capacity
    elif c.find("sort") and c.find("offsets"):
        read = _grouped_mm
    elif c.find("gather_weights"):
        read = _batched_mm
    elif c.find("expert_mask"):
        read = _eager
    else:
        raise ValueError(f"call {c.index} ({c.layer}, backend {backend}) recorded none of the steps a layout is read "
                         "from (eager's 'expert_mask', batched_mm's 'gather_weights', grouped_mm's 'sort' and "
                         "'offsets', capacity's 'positions', block_aligned's 'align'); steps: "
                         f"{[s.name for s in c.steps]}")
    expert, pair, ends, unused, num_pairs, num_experts, top_k = read(c, backend)
    expert, pair = np.asarray(expert, dtype=np.int64), np.asarray(pair, dtype=np.int64)  # [N], [N]
    kept = _kept(c, backend)  # [S] or None
    dropped_computed = np.zeros(pair.shape[0], dtype=bool)  # [N]
    if kept is not None:
        dropped_computed = (pair >= 0) & ~kept[np.clip(pair, 0, None)]
    has_row = np.zeros(num_pairs, dtype=bool)  # [S]
    has_row[pair[pair >= 0]] = True
    dropped_pairs = np.flatnonzero(~has_row)  # [D]: pairs that no row holds
    routed = _routed_experts(c, backend)
    dropped_experts = routed[dropped_pairs] if routed is not None else np.full(dropped_pairs.shape[0], -1)
    return LayoutRows(backend=backend, expert=expert, pair=pair, dropped_computed=dropped_computed,
                      dropped_pairs=dropped_pairs.astype(np.int64), dropped_experts=dropped_experts.astype(np.int64),
                      group_ends=None if ends is None else np.asarray(ends, dtype=np.int64), unused_rows=int(unused),
                      num_experts=int(num_experts), top_k=int(top_k))


# ------------------------------------------------------------------------------------------------- pictures


def _expert_colors(num_experts: int) -> tuple[ListedColormap, Normalize]:
    """`moelab.core.colors.expert_colormap` (plot_permutation's colours too), masked cells drawn as padding."""
    cmap, norm = expert_colormap(num_experts)
    return cmap.with_extremes(bad=PADDING_COLOR), norm  # masked cells: the padding rows


def _counts(rows: LayoutRows) -> str:
    return (f"{rows.rows_computed} rows computed for {rows.useful_rows} useful pairs: {rows.padding_rows} padding, "
            f"{rows.dropped} dropped")


def _gap(width: int) -> int:
    """Cells of empty space between the computed rows and the dropped pairs drawn after them."""
    return max(2, int(round(0.03 * width)))


def _extent(rows: LayoutRows, gap: int) -> int:
    """How far right the strip reaches: computed rows, unused bound rows, then the gap and dropped pairs."""
    return rows.rows_computed + rows.unused_rows + (gap + rows.dropped_pairs.shape[0] if rows.dropped_pairs.size else 0)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, length) of each run of True in `mask` [N]: one hatched patch per run, not per row."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return list(zip(starts.tolist(), (ends - starts).tolist()))


def _draw_strip(ax, rows: LayoutRows, num_experts: int, gap: int, width: int):
    """One strip on `ax`, cells [r, r + 1) x [0, 1]; returns the image (for a colorbar) and the legend handles."""
    cmap, norm = _expert_colors(num_experts)
    n = rows.rows_computed
    values = np.ma.masked_less(rows.expert.astype(float), 0)[None, :]  # [1, N]; padding masked: drawn grey
    image = ax.imshow(values if n else np.ma.masked_all((1, 1)), extent=(0, max(n, 1), 0, 1), aspect="auto",
                      cmap=cmap, norm=norm, interpolation="nearest")
    handles = []
    padding = _runs(rows.pair < 0)
    for start, length in padding:  # hatch over the grey, one patch per run of padding rows
        ax.add_patch(Rectangle((start, 0), length, 1, facecolor="none", edgecolor="0.55", hatch="///",
                               linewidth=0))
    if padding:
        handles.append(Patch(facecolor=PADDING_COLOR, edgecolor="0.55", hatch="///", label="padding row (no pair)"))
    cell_points = ax.get_window_extent().width * 72 / ax.figure.dpi / max(width, 1)  # one row's width in points
    if n <= BORDERS_UP_TO and n:
        ax.add_collection(LineCollection([((x, 0), (x, 1)) for x in range(1, n)], colors="white", linewidths=0.6))
    if rows.dropped_computed.any():
        xs = np.flatnonzero(rows.dropped_computed) + 0.5
        size = float(np.clip(0.7 * cell_points, 3.0, 9.0)) ** 2
        ax.scatter(xs, np.full(xs.shape, 0.5), marker="x", s=size, c=DROPPED_COLOR, linewidths=1.0, zorder=4)
        handles.append(Line2D([], [], marker="x", color=DROPPED_COLOR, linestyle="none",
                              label="dropped pair, computed (weight 0)"))
    if rows.unused_rows:
        ax.add_patch(Rectangle((n, 0.2), rows.unused_rows, 0.6, facecolor="none", edgecolor="0.45", linewidth=0.8,
                               linestyle=":"))
        ax.text(n + rows.unused_rows / 2, 0.5, f"{rows.unused_rows} unused", ha="center", va="center",
                fontsize="x-small", color="0.35", clip_on=True)
        handles.append(Patch(facecolor="none", edgecolor="0.45", linestyle=":",
                             label="allocated, not computed (static bound)"))
    if rows.dropped_pairs.size:
        start = n + rows.unused_rows + gap
        for i, e in enumerate(np.sort(rows.dropped_experts, kind="stable").tolist()):  # by expert: reads as groups
            face = cmap(norm(e)) if e >= 0 else PADDING_COLOR
            ax.add_patch(Rectangle((start + i, 0.15), 1, 0.7, facecolor=face, alpha=0.35, edgecolor="none"))
        ax.add_patch(Rectangle((start, 0.15), rows.dropped_pairs.size, 0.7, facecolor="none", edgecolor="0.3",
                               linestyle="--", linewidth=0.8))
        ax.text(start + rows.dropped_pairs.size / 2, 1.0, "dropped (no row)", ha="center", va="bottom",
                fontsize="x-small", color="0.25")
        handles.append(Patch(facecolor="0.8", alpha=0.6, edgecolor="0.3", linestyle="--",
                             label="dropped pair, no row"))
    if rows.group_ends is not None and rows.group_ends.size:
        ax.vlines(rows.group_ends, -0.08, 1.08, colors=GROUP_END_COLOR, linewidth=1.0, zorder=5)
        handles.append(Line2D([], [], color=GROUP_END_COLOR, label="end of an expert's group"))
    ax.set_xlim(0, width + max(1, gap // 2))  # a little room after the last cell
    ax.set_ylim(-0.15, 1.3)
    ax.set_yticks([])
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    return image, handles


def _colorbar(fig, image, axes, num_experts):
    fig.colorbar(image, ax=axes, label="expert id", ticks=range(num_experts) if num_experts <= 20 else None,
                 fraction=0.04, pad=0.01)


XLABEL = "row of the expert matmul, in the layout's order"


def plot_layout(source, call: int = 0, *, ax=None):
    """One strip, a cell per computed row in the layout's order, coloured by expert: padding grey and hatched,
    dropped-but-computed rows crossed, dropped pairs without a row after a gap, block_aligned's unused bound rows
    outlined, red lines where each expert's group ends."""
    c = source_call(source, call)
    rows = layout_rows(c)
    gap = _gap(rows.rows_computed + rows.unused_rows)
    width = _extent(rows, gap)
    fig, ax = new_axes(ax, figsize=(max(6.4, min(16.0, width / 10)), 2.6))
    image, handles = _draw_strip(ax, rows, rows.num_experts, gap, width)
    _colorbar(fig, image, ax, rows.num_experts)
    ax.set_xlabel(XLABEL)
    ax.set_ylabel(rows.backend, rotation=0, ha="right", va="center")
    if handles:  # below the x label, a fixed distance whatever the axes' height
        below = ax.transAxes + ScaledTranslation(0, -0.5, fig.dpi_scale_trans)
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0), bbox_transform=below,
                  ncol=min(len(handles), 3), fontsize="x-small", frameon=False)
    ax.set_title(f"{rows.backend} · {c.layer} · {stage_label(c.stage, c.decode_step)}\n{_counts(rows)}",
                 fontsize="medium")
    return fig


def plot_layouts(sources, *, axes=None):
    """One strip per layout (a list of Traces/Calls, or a dict name -> source), stacked on a shared x axis so the
    rows each computes compare directly; one colorbar for the expert ids, one legend for padding and drops."""
    named = list(sources.items()) if isinstance(sources, dict) else [(None, s) for s in sources]
    if not named:
        raise ValueError("plot_layouts needs at least one Trace or Call")
    calls = [(name, source_call(s, 0)) for name, s in named]
    layouts = [(name, c, layout_rows(c)) for name, c in calls]
    num_experts = max(r.num_experts for _, _, r in layouts)
    gap = _gap(max(r.rows_computed + r.unused_rows for _, _, r in layouts))
    width = max(_extent(r, gap) for _, _, r in layouts)
    if axes is None:
        fig = new_figure(figsize=(max(8.0, min(16.0, width / 8)), 1.15 * len(layouts) + 1.6))
        axes = fig.subplots(len(layouts), 1, sharex=True, squeeze=False)[:, 0]
    else:
        axes = list(np.ravel(axes))
        if len(axes) != len(layouts):
            raise ValueError(f"{len(layouts)} layouts but {len(axes)} axes")
        fig = axes[0].figure
        for ax in axes[1:]:
            ax.sharex(axes[0])
    legend, image = {}, None
    for ax, (name, c, rows) in zip(axes, layouts):
        image, handles = _draw_strip(ax, rows, num_experts, gap, width)
        for h in handles:
            legend.setdefault(h.get_label(), h)
        label = rows.backend if name in (None, rows.backend) else f"{name}\n(ran {rows.backend})"
        ax.set_ylabel(label, rotation=0, ha="right", va="center")
        ax.set_title(_counts(rows), fontsize="small", loc="left")
        ax.tick_params(labelbottom=ax is axes[-1])
    axes[-1].set_xlabel(XLABEL)
    _colorbar(fig, image, list(axes), num_experts)
    if legend:
        constrained = type(fig.get_layout_engine()).__name__ == "ConstrainedLayoutEngine"  # "outside" needs it
        fig.legend(handles=list(legend.values()), loc="outside lower center" if constrained else "lower center",
                   ncol=min(len(legend), 5),
                   fontsize="small", frameon=False)
    fig.suptitle("The rows each layout computes: cells coloured by expert, in the layout's order")
    return fig
