"""`moelab.bench.layouts`: the layouts sweep over T and routing skew (issue 15). No timing is asserted (benchmarks
print; tests check what they print is of the right calls): outputs against eager, waste against `waste_table`,
the memory guard, the plot."""

import matplotlib.pyplot as plt
import pytest

from moelab import MoEConfig, memory
from moelab.bench.layouts import LAYOUTS, fastest_layouts, layout_sweep, plot_layout_sweep
from moelab.layer import drop_pairs, skewed_routing

CONFIG = MoEConfig(hidden_size=16, intermediate_size=24, num_experts=4, top_k=2)


@pytest.fixture(scope="module")
def table():
    return layout_sweep(CONFIG, tokens=(4, 12), skews=(0.0, 1.0), min_run_time=0.001, min_runs=1)


def test_every_point_runs_every_layout_and_matches_eager(table):
    assert len(table) == 2 * 2 * len(LAYOUTS) and (table["status"] == "ok").all()
    assert (table["max_abs_diff_to_eager"] < 1e-5).all() and (table["median_ms"] > 0).all()


def test_the_waste_columns_are_the_waste_table_of_the_same_routing(table):
    row = table[(table["num_tokens"] == 12) & (table["skew"] == 1.0)].set_index("backend")
    top_k_index, _ = skewed_routing(12, 4, 2, 1.0, seed=0)
    waste = memory.waste_table(CONFIG, top_k_index).set_index("backend")
    for column in ("rows_computed", "padding_rows", "extra_memory_analytic", "bytes_moved"):
        assert row[column].tolist() == waste.loc[list(LAYOUTS), column].tolist(), column
    assert row.loc["capacity", "rows_computed"] == 4 * 12  # one hot expert: C = T


def test_drops_reach_every_layout():
    table = layout_sweep(CONFIG, tokens=(16,), skews=(1.0,), capacity_factor=1.0, min_run_time=0.001, min_runs=1)
    top_k_index, top_k_weights = skewed_routing(16, 4, 2, 1.0, seed=0)
    dropped = drop_pairs(top_k_index, top_k_weights, 1.0, "position", 4)
    assert int(dropped.sum()) > 0 and (table["dropped_pairs"] == int(dropped.sum())).all()
    assert (table["max_abs_diff_to_eager"] < 1e-5).all()
    assert table.set_index("backend").loc["capacity", "rows_computed"] == 4 * 8  # C = ceil(1.0 * 16 * 2 / 4)


def test_the_guard_skips_what_would_not_fit_before_running_it():
    table = layout_sweep(CONFIG, tokens=(8,), backends=("grouped_mm", "batched_mm"), memory_budget=20_000,
                         min_run_time=0.001, min_runs=1).set_index("backend")
    assert table.loc["batched_mm", "status"] == "skipped" and "over the memory budget" in table.loc["batched_mm",
                                                                                                   "reason"]
    assert table.loc["grouped_mm", "status"] == "ok"


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="backends: 'auto' is not one of the layouts"):
        layout_sweep(CONFIG, backends=("auto",))
    with pytest.raises(ValueError, match="tokens must be ints >= 1"):
        layout_sweep(CONFIG, tokens=(0,))
    with pytest.raises(ValueError, match="skews must be a non-empty list"):
        layout_sweep(CONFIG, skews=())


def test_plot_and_fastest(table):
    fig = plot_layout_sweep(table)
    assert len(fig.axes) == 4 and all(ax.get_xlabel() and ax.get_ylabel() for ax in fig.axes)
    assert len(fig.axes[0].get_lines()) == len(LAYOUTS)
    from matplotlib.colors import same_color

    from moelab.core.colors import BACKEND_COLORS
    for line in fig.axes[0].get_lines():  # each layout in the package's colour for its backend
        assert same_color(line.get_color(), BACKEND_COLORS[line.get_label()])
    plt.close(fig)
    fastest = fastest_layouts(table)
    assert len(fastest) == 4 and fastest["fastest"].isin(LAYOUTS).all()
    ratios = fastest[list(LAYOUTS)]
    assert (ratios.min(axis=1) == 1.0).all()
    with pytest.raises(ValueError, match="no point at T = 99"):
        plot_layout_sweep(table, num_tokens=99)
