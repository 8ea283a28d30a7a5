"""The peak-vs-T table and plot of moelab.memory.scaling, and the package's one colour per backend."""

from __future__ import annotations

import matplotlib.colors as mcolors
import pytest
import torch

import moelab
from moelab.core.colors import BACKEND_COLORS, OTHER_COLORS, backend_color
from moelab.memory.scaling import byte_unit, peak_table, plot_peaks

CONFIG = moelab.MoEConfig(hidden_size=64, intermediate_size=128, num_experts=8, top_k=2)


def test_peak_table_is_the_analytic_model_per_t_and_backend():
    table = peak_table(CONFIG, [1, 16, 256], dtype=torch.bfloat16)
    assert list(table.index) == [1, 16, 256] and list(table.columns) == ["eager", "batched_mm", "grouped_mm"]
    for t in table.index:
        for backend in table.columns:
            assert table.loc[t, backend] == moelab.memory.analytic(CONFIG, t, backend, torch.bfloat16).peak_bytes
    assert (table["batched_mm"].diff().dropna() > 0).all()  # its weight copies grow with T


@pytest.mark.parametrize("bad", [[], [0], [4, -1], [2.0], [True], "16"])
def test_peak_table_names_bad_token_counts(bad):
    with pytest.raises(ValueError, match="token_counts must be a non-empty list of ints >= 1"):
        peak_table(CONFIG, bad)


@pytest.mark.parametrize("largest, unit", [(0, "B"), (1023, "B"), (1024, "KiB"), (70_000, "KiB"),
                                           (5 * 2 ** 20, "MiB"), (3 * 2 ** 30, "GiB")])
def test_byte_unit_reads_the_largest_value_as_1_to_1023(largest, unit):
    name, size = byte_unit(largest)
    assert name == unit and (largest == 0 or 1 <= largest / size < 1024)


def test_plot_scales_its_unit_to_the_data_and_colours_each_backend_as_everywhere():
    small = moelab.MoEConfig(hidden_size=8, intermediate_size=8, num_experts=4, top_k=2)
    fig = plot_peaks(small, [1, 4, 16])
    ax = fig.axes[0]
    peaks = peak_table(small, [1, 4, 16])
    unit, size = byte_unit(max(peaks.to_numpy().max(), moelab.memory.analytic(small, 1, "eager").weight_bytes))
    assert unit == "KiB" and ax.get_ylabel() == "analytic peak (KiB)"
    lines = {line.get_label(): line for line in ax.get_lines()}
    for backend in peaks.columns:
        assert list(lines[backend].get_ydata()) == pytest.approx(list(peaks[backend] / size))
        assert mcolors.same_color(lines[backend].get_color(), BACKEND_COLORS[backend])


def test_every_backend_has_one_colour_its_variants_share_and_others_never_take_a_builtins():
    assert len(set(BACKEND_COLORS.values())) == len(BACKEND_COLORS)  # the built-ins are told apart
    for name in ("eager", "grouped_mm"):
        assert backend_color(f"hf:{name}") == backend_color(f"{name}+compile") == BACKEND_COLORS[name]
    for mine in ("dense", "mine", "my_backend_2"):
        color = backend_color(mine)
        assert color in OTHER_COLORS and color not in BACKEND_COLORS.values()
        assert backend_color(mine) == color  # stable, call after call (crc32 of the name, not hash())
    import subprocess
    import sys
    other_process = subprocess.run([sys.executable, "-c", "from moelab.core.colors import backend_color; "
                                    "print(backend_color('dense'))"], capture_output=True, text=True, timeout=120)
    assert other_process.stdout.strip() == backend_color("dense")


@pytest.mark.parametrize("num_experts", [1, 8, 10, 16, 64])
def test_the_expert_colormap_has_exactly_one_colour_per_expert(num_experts):
    from moelab.core.colors import expert_colormap

    cmap, norm = expert_colormap(num_experts)
    assert cmap.N == num_experts  # a colorbar shows E bands, not the palette's 10 or 20
    colors = [mcolors.to_hex(cmap(norm(e))) for e in range(num_experts)]
    assert len(set(colors)) == num_experts  # every expert told apart
