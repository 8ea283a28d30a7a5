"""The rows each layout computes, read from real traces: `layout_rows` against references written from the
definitions, and the pictures `plot_layout`, `plot_layouts` and `backend_view` draw from them."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

import moelab
from moelab.backends.block_aligned import BLOCK_SIZE
from moelab.inspection import Call, plots
from moelab.inspection.layouts import LayoutRows, layout_rows, plot_layout, plot_layouts

BACKENDS = ["eager", "batched_mm", "grouped_mm", "capacity", "block_aligned"]
T, E, K, H, I = 20, 4, 2, 16, 8
CAPACITY_FACTOR = 0.75  # C * E = 32 rows for S = 40 pairs: 8 pairs must drop


def config(drops: bool) -> moelab.MoEConfig:
    return moelab.MoEConfig(hidden_size=H, intermediate_size=I, num_experts=E, top_k=K,
                            capacity_factor=CAPACITY_FACTOR if drops else None)


def traced(backend: str, drops: bool, num_tokens: int = T, **inspect_kwargs):
    """(trace, top_k_index [T, k] as lists, kept [S] as a list) of one fixed-seed call in training mode."""
    moe = moelab.SparseMoE(config(drops), backend, seed=0).train()  # the capacity factor drops in training mode
    x = torch.randn(num_tokens, H, generator=torch.Generator().manual_seed(0))
    # dropless calls run without autograd: grouped_mm then takes its CPU fast path, which records the same steps
    with moelab.inspect(moe, **inspect_kwargs) as trace, torch.set_grad_enabled(drops):
        _, routing = moe(x, return_router_output=True)
    kept = (~routing.dropped).flatten().tolist() if drops else [True] * routing.top_k_index.numel()
    return trace, routing.top_k_index.tolist(), kept


# ------------------------------------------------------------------------------------ references by definition


def pairs_of(top_k_index, kept, expert):
    """Kept pair ids t * k + j routed to `expert`, in token order."""
    return [t * K + j for t, row in enumerate(top_k_index) for j, e in enumerate(row) if e == expert and kept[t * K + j]]


def reference(backend, top_k_index, kept):
    """(expert per row, pair per row, group ends, unused rows), straight from each layout's definition."""
    num_pairs = len(kept)
    expert_of = [e for row in top_k_index for e in row]  # [S]
    groups = [pairs_of(top_k_index, kept, e) for e in range(E)]
    if backend == "eager":  # per hit expert: its mask [k, T] read row by row (slot-major, then token order)
        experts, pairs, ends = [], [], []
        for e in range(E):
            mine = [t * K + j for j in range(K) for t in range(len(top_k_index))
                    if top_k_index[t][j] == e and kept[t * K + j]]
            if mine:
                experts += [e] * len(mine)
                pairs += mine
                ends.append(len(pairs))
        return experts, pairs, ends, 0
    if backend == "batched_mm":  # every pair in token order, dropped ones too
        return expert_of, list(range(num_pairs)), None, 0
    if backend == "grouped_mm":  # stable sort of the kept pairs by expert
        pairs = sorted((s for s in range(num_pairs) if kept[s]), key=lambda s: expert_of[s])
        return [expert_of[s] for s in pairs], pairs, list(np.cumsum([len(g) for g in groups])), 0
    if backend == "capacity":  # row e * C + rank among expert e's kept pairs; the rest of the C rows: padding
        dropless = all(kept)
        capacity = max(len(g) for g in groups) if dropless else min(math.ceil(CAPACITY_FACTOR * num_pairs / E),
                                                                      len(top_k_index))
        experts, pairs = [], []
        for e, group in enumerate(groups):
            experts += [e] * len(group) + [-1] * (capacity - len(group))
            pairs += group + [-1] * (capacity - len(group))
        return experts, pairs, [(e + 1) * capacity for e in range(E)], 0
    if backend == "block_aligned":  # each group rounded up to a multiple of M rows, inside S + E * (M - 1)
        experts, pairs, ends = [], [], []
        for e, group in enumerate(groups):
            padded = -(-len(group) // BLOCK_SIZE) * BLOCK_SIZE
            experts += [e] * len(group) + [-1] * (padded - len(group))
            pairs += group + [-1] * (padded - len(group))
            ends.append(len(pairs))
        return experts, pairs, ends, num_pairs + E * (BLOCK_SIZE - 1) - len(pairs)
    raise AssertionError(backend)


# ---------------------------------------------------------------------------------------------- layout_rows


@pytest.mark.parametrize("drops", [False, True], ids=["dropless", "drops"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_rows_match_the_definition_of_each_layout(backend, drops):
    trace, top_k_index, kept = traced(backend, drops)
    rows = layout_rows(trace)
    assert isinstance(rows, LayoutRows) and rows.backend == backend
    experts, pairs, ends, unused = reference(backend, top_k_index, kept)
    assert rows.expert.tolist() == experts
    assert rows.pair.tolist() == pairs
    assert rows.rows_computed == len(pairs)
    assert rows.padding_rows == sum(p < 0 for p in pairs)
    assert (None if rows.group_ends is None else rows.group_ends.tolist()) == ends
    assert rows.unused_rows == unused
    not_kept = [s for s, k in enumerate(kept) if not k]
    assert drops == bool(not_kept)  # the fixed routing does drop, and only with a capacity factor
    useful = rows.pair[(rows.pair >= 0) & ~rows.dropped_computed]
    assert sorted(useful.tolist()) == [s for s, k in enumerate(kept) if k]  # each kept pair exactly once
    assert rows.useful_rows == len(kept) - len(not_kept)
    if backend == "batched_mm":  # computes the dropped pairs in place, weighed by 0
        assert rows.pair[rows.dropped_computed].tolist() == not_kept and rows.dropped_pairs.size == 0
    else:  # the drop-aware layouts give a dropped pair no row
        assert not rows.dropped_computed.any() and rows.dropped_pairs.tolist() == not_kept
        assert rows.dropped_experts.tolist() == [top_k_index[s // K][s % K] for s in not_kept]
    assert rows.dropped == len(not_kept)


@pytest.mark.parametrize("drops", [False, True], ids=["dropless", "drops"])
def test_auto_reports_the_backend_it_chose(drops):
    trace, top_k_index, kept = traced("auto", drops)
    chosen = trace.calls[0]["auto"].info["chosen"]
    rows = layout_rows(trace.calls[0])
    assert rows.backend == chosen and trace.calls[0].backend == "auto"
    experts, pairs, _, _ = reference(chosen, top_k_index, kept)
    assert rows.expert.tolist() == experts and rows.pair.tolist() == pairs


def test_a_trace_without_tensors_or_without_layout_steps_is_a_clear_error():
    trace, _, _ = traced("capacity", True, keep_tensors=False)
    with pytest.raises(ValueError, match=r"capacity.*keep_tensors=False"):
        layout_rows(trace)
    with pytest.raises(ValueError, match="keep_tensors=False"):
        plot_layout(trace)
    trace, _, _ = traced("eager", True, keep_tensors=False)
    with pytest.raises(ValueError, match=r"eager.*keep_tensors=False"):
        layout_rows(trace)
    empty = Call(index=0, layer="moe", stage=None, decode_step=None, backend="mine")
    with pytest.raises(ValueError, match=r"backend mine.*none of the steps"):
        layout_rows(empty)
    with pytest.raises(TypeError, match="Trace or Call"):
        layout_rows("not a trace")


# ------------------------------------------------------------------------------------------------- pictures


def _labelled(ax):
    assert ax.get_xlabel() and ax.get_ylabel(), "axes must be labelled"


@pytest.mark.parametrize("backend", BACKENDS)
def test_plot_layout_draws_one_cell_per_computed_row(backend):
    trace, _, _ = traced(backend, True)
    rows = layout_rows(trace)
    fig = plot_layout(trace)
    try:
        assert isinstance(fig, Figure)
        ax = fig.axes[0]
        _labelled(ax)
        assert "row" in ax.get_xlabel()
        assert ax.images[0].get_array().shape == (1, rows.rows_computed)
        assert f"{rows.rows_computed} rows computed for {rows.useful_rows} useful pairs" in ax.get_title()
        assert f"{rows.padding_rows} padding, {rows.dropped} dropped" in ax.get_title()
        texts = [t.get_text() for t in ax.texts]
        assert ("dropped (no row)" in texts) == (rows.dropped_pairs.size > 0)
        assert any("expert id" in a.get_ylabel() for a in fig.axes[1:]), "a colorbar for the expert ids"
        fig.canvas.draw()
    finally:
        plt.close(fig)


def test_plot_layouts_stacks_the_five_layouts_on_a_shared_row_axis():
    traces = {backend: traced(backend, True)[0] for backend in BACKENDS}
    fig = plot_layouts(traces)
    try:
        assert isinstance(fig, Figure)
        strips = [a for a in fig.axes if a.get_label() != "<colorbar>"]
        assert len(strips) == len(BACKENDS)
        assert [a.get_ylabel() for a in strips] == BACKENDS
        for ax in strips[1:]:
            assert strips[0].get_shared_x_axes().joined(strips[0], ax)
            assert ax.get_xlim() == strips[0].get_xlim()
        _labelled(strips[-1])
        widths = [a.images[0].get_array().shape[1] for a in strips]
        assert widths == [layout_rows(t).rows_computed for t in traces.values()]
        assert len([a for a in fig.axes if a.get_label() == "<colorbar>"]) == 1, "one colorbar for all strips"
        labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
        assert any("padding" in label for label in labels) and any("dropped" in label for label in labels)
        fig.canvas.draw()
    finally:
        plt.close(fig)
    fig, axes = plt.subplots(2, 1)  # on the caller's axes, from a list of Calls
    try:
        out = plot_layouts([traces["grouped_mm"].calls[0], traces["capacity"].calls[0]], axes=axes)
        assert out is fig and axes[0].get_shared_x_axes().joined(axes[0], axes[1])
        assert [a.get_ylabel() for a in axes] == ["grouped_mm", "capacity"]
    finally:
        plt.close(fig)


def test_many_rows_still_draw_without_cell_borders():
    trace, _, _ = traced("block_aligned", True, num_tokens=256)
    rows = layout_rows(trace)
    fig = plot_layout(trace)
    try:
        ax = fig.axes[0]
        assert ax.images[0].get_array().shape == (1, rows.rows_computed) and rows.rows_computed > 256
        assert len(ax.collections) <= 2, "no per-cell borders, only the group ends (and no crosses: drop-aware)"
        fig.canvas.draw()
    finally:
        plt.close(fig)


@pytest.mark.parametrize("backend", ["capacity", "block_aligned"])
def test_backend_view_draws_the_rows_of_capacity_and_block_aligned(backend):
    trace, _, _ = traced(backend, True)
    fig = trace.plot()
    try:
        titles = [a.get_title() for a in fig.axes]
        assert any("rows computed for" in title for title in titles)
        assert not any("no picture" in t.get_text() for a in fig.axes for t in a.texts)
    finally:
        plt.close(fig)


def test_the_layout_names_are_exported_beside_the_other_plots():
    for name in ("LayoutRows", "layout_rows", "plot_layout", "plot_layouts"):
        assert name in plots.__all__ and getattr(plots, name) is getattr(moelab.inspection.layouts, name)
