"""The notebooks' widgets, driven from Python without a browser or a kernel: set sliders, press Run, read state."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pandas as pd
import pytest

import moelab
from moelab import bench, widgets
from moelab.widgets import BOUNDS, BackendExplorer, crossovers, seq_len_points


# median_ms = a * T**p per backend position: the first two cross at T = 100, the third never crosses within range
SCALE = [(0.01, 1.0), (0.1, 0.5), (0.5, 0.5)]


class SpyRunner:
    """Stands in for the timing function: records its calls and returns a deterministic tidy table."""

    def __init__(self):
        self.calls = []

    def __call__(self, config, batch_size, seq_lens, backends, dtype, compile, seed):
        self.calls.append(dict(config=config, batch_size=batch_size, seq_lens=list(seq_lens), backends=backends,
                               dtype=dtype, compile=compile, seed=seed))
        rows = []
        for i, name in enumerate(backends):
            for seq_len in seq_lens:
                t = batch_size * seq_len
                rows.append({"backend": name, "batch_size": batch_size, "seq_len": seq_len, "num_tokens": t,
                             "top_k": config.top_k, "num_experts": config.num_experts, "dtype": dtype,
                             "compile": compile, "median_ms": SCALE[i][0] * t ** SCALE[i][1],
                             "iqr_ms": 0.0, "peak_bytes": 1000.0 * (i + 1) * t})
        return pd.DataFrame(rows)


def _lines(ax):
    return {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}


def test_real_run_rows_carry_the_slider_settings_and_the_figure_matches_the_table():
    ex = BackendExplorer(min_run_time=0.005)
    ex.set(num_experts=6, top_k=3, batch_size=2, seq_len=5, dtype="bfloat16")
    results = ex.run()
    assert results is ex.last_results and not ex.refused and ex.runs == 1
    assert tuple(dict.fromkeys(results["backend"])) == widgets.BACKENDS == moelab.backends.REFERENCE_BACKENDS
    for column, value in {"top_k": 3, "num_experts": 6, "batch_size": 2, "dtype": "bfloat16", "compile": False}.items():
        assert (results[column] == value).all(), column
    assert sorted(set(results["seq_len"])) == seq_len_points(5) == [1, 2, 4, 5]
    assert results["seq_len"].max() == ex.seq_len.value
    assert (results["num_tokens"] == results["batch_size"] * results["seq_len"]).all()
    assert (results["median_ms"] > 0).all()
    # every backend computes the same thing (bfloat16: loose)
    assert (results["max_abs_diff_to_eager"] < 1e-2).all()

    ax_time, ax_mem = ex.figure.axes[:2]
    time_lines, mem_lines = _lines(ax_time), _lines(ax_mem)
    for name, group in results.groupby("backend"):
        group = group.sort_values("num_tokens")
        np.testing.assert_allclose(time_lines[name].get_xdata(), group["num_tokens"])
        np.testing.assert_allclose(time_lines[name].get_ydata(), group["median_ms"])
        np.testing.assert_allclose(mem_lines[name].get_ydata(), group["peak_bytes"] / 2**20)
    # the memory column is the peak of one call: for batched_mm at least its weight copies
    row = results[(results.backend == "batched_mm") & (results.seq_len == 5)].iloc[0]
    assert row["peak_bytes"] >= moelab.memory.analytic(ex.config(), 10, "batched_mm", "bfloat16").duplicated_bytes
    # moelab.bench.sweep ran it: every measurement ok, memory measured
    assert (results["status"] == "ok").all() and (results["peak_extra_bytes"] == results["peak_bytes"]).all()
    assert (results["peak_estimate"] == "measured").all()

    # the widgets show it: a table naming the settings, a PNG of the figure, a green status
    html = ex.table_out.outputs[0]["data"]["text/html"]
    assert "bfloat16" in html and html.count("<tr") == len(results) + 1
    assert "image/png" in ex.plot_out.outputs[0]["data"]
    assert "top_k=3" in ex.status.value and "green" in ex.status.value


def test_moving_a_slider_and_clicking_run_changes_table_and_figure():
    spy = SpyRunner()
    ex = BackendExplorer(runner=spy)
    ex.run_button.click()
    first_table, first_fig = ex.last_results, ex.figure
    ex.top_k.value = 4
    ex.seq_len.value = 32
    ex.backends.value = ("eager", "grouped_mm")
    ex.compile.value = True
    ex.dtype.value = "bfloat16"
    ex.run_button.click()
    assert ex.runs == 2 and len(spy.calls) == 2
    assert spy.calls[-1]["compile"] is True and spy.calls[-1]["dtype"] == "bfloat16"
    assert (ex.last_results["compile"] == True).all() and (ex.last_results["dtype"] == "bfloat16").all()  # noqa: E712
    assert "compile=on" in ex.message and "compile=on" in ex.figure._suptitle.get_text()
    assert ex.figure is not first_fig and not ex.last_results.equals(first_table)
    assert (ex.last_results["top_k"] == 4).all() and ex.last_results["seq_len"].max() == 32
    assert set(ex.last_results["backend"]) == {"eager", "grouped_mm"}
    assert set(_lines(ex.figure.axes[0])) == {"eager", "grouped_mm"}
    assert spy.calls[-1]["seq_lens"] == [1, 8, 32]  # compile thins the sweep to 3 points (compiles are slow)
    ex.compile.value = False
    ex.run_button.click()
    assert spy.calls[-1]["seq_lens"] == [1, 2, 4, 8, 16, 32]


def test_over_budget_configuration_is_refused_with_the_reason_and_runs_nothing():
    spy = SpyRunner()
    ex = BackendExplorer(runner=spy)
    ex.run()
    assert ex.runs == 1
    ex.set(num_experts=64, top_k=8, batch_size=16, seq_len=256)
    assert "over budget" in ex.status.value  # the live preview warns before Run
    ex.run_button.click()
    assert ex.refused and ex.runs == 1 and len(spy.calls) == 1  # nothing ran
    assert ex.last_results is None and ex.figure is None
    assert "refused" in ex.message and "batched_mm" in ex.message and "budget" in ex.message
    assert "T=4096" in ex.message
    assert ex.message in ex.table_out.outputs[0]["data"]["text/html"]
    assert ex.plot_out.outputs == ()
    over = ex.last_guard[~ex.last_guard["fits"]]
    assert list(over["backend"]) == ["batched_mm"]
    assert over["peak_bytes"].iloc[0] > ex.budget_bytes

    # without batched_mm the same sizes fit, and run
    ex.backends.value = ("eager", "grouped_mm")
    assert ex.run() is not None and not ex.refused and ex.runs == 2


def test_a_small_budget_refuses_every_backend_that_does_not_fit():
    spy = SpyRunner()
    ex = BackendExplorer(runner=spy, budget_bytes=100_000)
    ex.set(seq_len=64)
    assert ex.run() is None and not spy.calls
    # 256 tokens: even grouped_mm's few activations per pair exceed 100 kB
    assert moelab.memory.analytic(ex.config(), 4 * 64, "grouped_mm").peak_bytes > 100_000
    assert set(ex.last_guard.loc[~ex.last_guard["fits"], "backend"]) == {"eager", "batched_mm", "grouped_mm"}
    for name in ("eager", "batched_mm", "grouped_mm"):
        assert f"{name} " in ex.message
    assert "97.7 KiB" in ex.message  # the budget, as the reason states it


def test_sliders_are_bounded_and_the_guard_covers_what_the_bounds_allow():
    ex = BackendExplorer(runner=SpyRunner())
    ex.top_k.value = 100
    assert ex.top_k.value == BOUNDS["top_k"][1]
    ex.num_experts.value = 3
    assert ex.top_k.max == 3 and ex.top_k.value == 3  # top_k never exceeds num_experts
    ex.num_experts.value = 10_000
    assert ex.num_experts.value == BOUNDS["num_experts"][1]
    ex.seq_len.value, ex.batch_size.value = 10**9, 10**9
    assert (ex.seq_len.value, ex.batch_size.value) == (BOUNDS["seq_len"][1], BOUNDS["batch_size"][1])
    # at the bounds' largest call, the memory-friendly backends fit and batched_mm is refused
    ex.top_k.value = 8
    table = ex.check().set_index("backend")
    assert table.loc["eager", "fits"] and table.loc["grouped_mm", "fits"]
    assert not table.loc["batched_mm", "fits"]


def test_no_backend_selected_is_refused():
    spy = SpyRunner()
    ex = BackendExplorer(runner=spy)
    ex.backends.value = ()
    assert ex.run() is None and ex.refused and not spy.calls
    assert "select at least one backend" in ex.message


def test_crossovers_are_found_and_marked():
    spy = SpyRunner()  # eager grows as 0.01 T, grouped_mm as 0.1 sqrt(T): they cross at T = 100
    ex = BackendExplorer(runner=spy, backends=("eager", "grouped_mm"))
    ex.set(batch_size=1, seq_len=256, backends=("eager", "grouped_mm"))
    results = ex.run()
    found = crossovers(results)
    assert len(found) == 1
    row = found.iloc[0]
    assert (row.faster_before, row.faster_after) == ("eager", "grouped_mm")
    assert (row.x_before, row.x_after) == (64, 128)
    wide = results.pivot_table(index="num_tokens", columns="backend", values="median_ms")
    before, after = wide.loc[row.x_before], wide.loc[row.x_after]
    assert before["eager"] < before["grouped_mm"] and after["grouped_mm"] < after["eager"]
    marks = [line for line in ex.figure.axes[0].get_lines() if line.get_label().startswith("_")]
    assert len(marks) == 1 and math.isclose(marks[0].get_xdata()[0], math.sqrt(row.x_before * row.x_after))
    assert any("grouped_mm overtakes" in t.get_text() for t in ex.figure.axes[0].texts)


def test_seq_len_points():
    assert seq_len_points(1) == [1]
    assert seq_len_points(8) == [1, 2, 4, 8]
    assert seq_len_points(100) == [1, 2, 4, 8, 16, 32, 64, 100]


def test_trace_stepper_slides_through_a_backend_steps():
    pytest.importorskip("moelab.inspection")
    import torch

    cfg = moelab.MoEConfig(hidden_size=16, intermediate_size=32, num_experts=4, top_k=2)
    moe = moelab.SparseMoE(cfg, "grouped_mm", seed=0)
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    stepper = widgets.TraceStepper(moe, x)
    names = [step.name for step in stepper.trace.steps]
    assert "sort" in names and (stepper.step_slider.min, stepper.step_slider.max) == (1, len(names))
    stepper.step_slider.value = names.index("sort") + 1  # the slider counts from 1, as the header does
    assert stepper.step.name == "sort"
    assert f"step {names.index('sort') + 1}/{len(names)}: sort" in stepper.header.value
    assert "perm" in list(stepper.table["key"])
    assert stepper.figure is not None and "image/png" in stepper.plot_out.outputs[0]["data"]
    assert "sort" in stepper.header.value
    stepper.backend.value = "eager"
    assert stepper.step_slider.value == 1 and stepper.step.name == stepper.trace.steps[0].name
    assert "expert_mask" in [step.name for step in stepper.trace.steps]


def test_a_backend_without_memory_model_is_guarded_like_the_sweep_and_nothing_is_built():
    # issue 16 item 5: the explorer once built the layer to probe a custom backend (768 MiB at E=64, H=I=1024; a
    # failed 2 GiB allocation at H=I=2048) and then counted only the probe's 530 KiB; now it asks the bench guard
    import torch
    from moelab.bench import guard as bench_guard

    def dense(experts, hidden_states, top_k_index, top_k_weights):  # every expert on every token: [E, T, 2I]
        gate, up = torch.einsum("th,eih->eti", hidden_states, experts.gate_up_proj).chunk(2, dim=-1)
        outputs = torch.einsum("eti,ehi->eth", experts.act_fn(gate) * up, experts.down_proj)  # [E, T, H]
        chosen = outputs[top_k_index, torch.arange(hidden_states.shape[0])[:, None]]  # [T, k, H]
        return (chosen * top_k_weights[..., None]).sum(1)

    moelab.ExpertsInterface.register("dense_test", dense, overwrite=True)
    try:
        with moelab.memory.quiet_stderr():
            built = moelab.memory.measure(lambda: BackendExplorer(
                runner=SpyRunner(), hidden_size=2048, intermediate_size=2048, num_experts=64,
                backends=("dense_test",)))
        assert built.peak_bytes < 2 ** 20  # the 3 GiB of weights were never allocated
        cfg = moelab.MoEConfig(hidden_size=64, intermediate_size=128, num_experts=8, top_k=2)
        # no estimate registered: sized as the hungriest built-in (batched_mm's weight copies), like the sweep
        table = widgets.guard(cfg, 160, ["batched_mm", "dense_test"], "float32", 2 ** 40)
        rows = table.set_index("backend")
        assert rows.loc["dense_test", "estimate"] == "assumed"
        assert rows.loc["dense_test", "peak_bytes"] == rows.loc["batched_mm", "peak_bytes"]
        sweep_est = bench_guard.estimate(cfg, 160, "dense_test", torch.float32)
        assert rows.loc["dense_test", "peak_bytes"] == sweep_est.total_bytes  # one guard, the same numbers
        spy = SpyRunner()
        ex = BackendExplorer(runner=spy, backends=("grouped_mm", "dense_test"),
                             budget_bytes=int(rows.loc["dense_test", "peak_bytes"]) - 1)
        ex.set(batch_size=10, seq_len=16)
        assert ex.run() is None and not spy.calls
        assert "dense_test" in ex.message and "no memory estimate registered" in ex.message
        # with its own estimate (the [E, T, 2I] and [E, T, H] einsum outputs), that figure is used
        E, H, I = 8, 64, 128
        moelab.ExpertsInterface.register(
            "dense_test", dense, overwrite=True,
            memory_estimate=lambda ex_, x, idx, dropped, backward: E * x.shape[0] * (3 * I + H) * x.element_size())
        table = widgets.guard(cfg, 160, ["dense_test"], "float32", 2 ** 40).set_index("backend")
        assert table.loc["dense_test", "estimate"] == "registered"
        resident = bench_guard.estimate(cfg, 160, "dense_test", torch.float32).resident_bytes
        assert table.loc["dense_test", "peak_bytes"] == resident + E * 160 * (3 * I + H) * 4
        real = widgets.local_sweep(cfg, 2, [1, 4], ("eager", "dense_test"), min_run_time=0.005)
        assert (real["max_abs_diff_to_eager"] < 1e-5).all()
        assert set(real.loc[real.backend == "dense_test", "peak_estimate"]) == {"registered"}
    finally:
        moelab.ExpertsInterface.unregister("dense_test")


# the tiny seeded configuration the explorer and a direct moelab.bench.sweep run alike
TINY = dict(num_experts=4, top_k=2, batch_size=2, seq_len=3)
DETERMINISTIC = ["status", "reason", "library", "backend", "chosen", "compiled", "pass", "num_tokens", "batch_size",
                 "seq_len", "num_experts", "top_k", "pairs", "hidden_size", "intermediate_size", "dtype", "device",
                 "num_threads", "clock", "useful_gflop", "estimate_bytes", "budget_bytes", "max_abs_diff_to_eager"]


def test_the_explorer_sweep_is_moelab_bench_sweep(monkeypatch):
    from moelab.widgets import sweeps

    bench_sweep_module = importlib.import_module("moelab.bench.sweep")  # the module (`bench.sweep` is the function)

    sweep_calls, timing_calls = [], []

    def spy_sweep(*args, **kwargs):
        sweep_calls.append(kwargs)
        return bench.sweep(*args, **kwargs)

    def spy_timing(stmts, **kwargs):
        timing_calls.append(len(stmts))
        return bench.measure_interleaved(stmts, **kwargs)
    monkeypatch.setattr(sweeps, "sweep", spy_sweep)
    monkeypatch.setattr(bench_sweep_module, "measure_interleaved", spy_timing)
    ex = BackendExplorer(min_run_time=0.005, seed=3, backends=("eager", "grouped_mm", "auto"))
    ex.set(**TINY)
    results = ex.run()
    assert len(sweep_calls) == 1 and timing_calls == [3, 3, 3]  # one sweep; each seq_len's 3 backends timed in turn
    call = sweep_calls[0]
    assert call["tokens"] == [(2, 1), (2, 2), (2, 3)] and call["backends"] == ("eager", "grouped_mm", "auto")
    assert call["memory_budget"] == ex.budget_bytes and call["seed"] == 3
    assert set(bench.COLUMNS) <= set(results.columns)
    # a direct sweep over the same settings gives the same rows (timings aside: they are measured anew)
    direct = bench.sweep(("eager", "grouped_mm", "auto"), tokens=[(2, 1), (2, 2), (2, 3)], num_experts=[4],
                         top_k=[2], hidden_size=[ex.hidden_size], intermediate_size=[ex.intermediate_size],
                         dtypes=["float32"], min_run_time=0.005, memory_budget=ex.budget_bytes, dense_limit=False,
                         measure_memory=False, seed=3, progress=False)
    pd.testing.assert_frame_equal(results[DETERMINISTIC], direct[DETERMINISTIC])
    assert (results["median_ms"] > 0).all() and (results["max_abs_diff_to_eager"] < 1e-5).all()
    assert set(results.loc[results.backend == "auto", "chosen"]) <= set(moelab.backends.AUTO_CANDIDATES)


def test_local_sweep_is_the_bench_sweep_with_estimated_memory_and_keeps_the_guard():
    cfg = moelab.MoEConfig(hidden_size=64, intermediate_size=128, num_experts=4, top_k=2)
    table = widgets.local_sweep(cfg, 2, [1, 4], ("eager", "batched_mm"), min_run_time=0.005)
    assert set(bench.COLUMNS) <= set(table.columns) and (table["status"] == "ok").all()
    assert table["peak_extra_bytes"].isna().all()  # not measured ...
    for row in table.itertuples():  # ... but estimated by the memory model
        assert row.peak_estimate == "analytic"
        assert row.peak_bytes == moelab.memory.analytic(cfg, row.num_tokens, row.backend, "float32").peak_bytes
    # over the budget nothing runs: the rows say why
    calls = []

    def spy(experts, hidden_states, top_k_index, top_k_weights):
        calls.append(hidden_states.shape)
        return moelab.ExpertsInterface.get("eager")(experts, hidden_states, top_k_index, top_k_weights)
    moelab.ExpertsInterface.register("spy_widgets", spy)
    try:
        refused = widgets.bench_sweep(cfg, 2, [4], ("batched_mm", "spy_widgets"), budget_bytes=10_000)
    finally:
        moelab.ExpertsInterface.unregister("spy_widgets")
    assert calls == [] and (refused["status"] == "skipped").all()
    assert refused["reason"].str.contains("memory guard").all() and refused["median_ms"].isna().all()
