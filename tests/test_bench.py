"""moelab.bench on tiny shapes: one row per grid point, consistent values, the memory guard, plots, CLI, files.

No timing thresholds here: the figures themselves are for BENCHMARKS.md, produced by benchmarks/run_benchmarks.py.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

import moelab
import moelab.cli
from moelab import bench
from moelab.bench import guard

TINY = dict(tokens=[1, (2, 4)], num_experts=[4], top_k=[2, 8], hidden_size=[16], intermediate_size=[32],
            dtypes=["float32", "bfloat16"], min_run_time=0.01, progress=False)


@pytest.fixture(scope="module")
def table():
    return bench.sweep(**TINY)


def test_one_row_per_grid_point_skipped_ones_included(table):
    # 2 token shapes x 1 E x 2 k x 2 dtypes x 4 backends; k=8 > E=4 is invalid and recorded, not dropped
    assert len(table) == 2 * 2 * 2 * len(bench.DEFAULT_BACKENDS)
    assert list(table.columns) == bench.COLUMNS
    skipped = table[table.top_k == 8]
    assert (skipped.status == "skipped").all() and skipped.reason.str.contains("top_k = 8 > num_experts").all()
    assert skipped.median_ms.isna().all() and skipped.gflops.isna().all()
    ok = table[table.top_k == 2]
    assert (ok.status == "ok").all()
    assert set(ok.num_tokens) == {1, 8} and set(ok[ok.num_tokens == 8].batch_size) == {2}
    assert (ok.pairs == ok.num_tokens * ok.top_k).all()


def test_values_are_consistent(table):
    ok = table[table.status == "ok"]
    flops = 6 * ok.num_tokens * ok.top_k * ok.hidden_size * ok.intermediate_size
    np.testing.assert_allclose(ok.useful_gflop, flops / 1e9)
    np.testing.assert_allclose(ok.gflops, ok.useful_gflop / (ok.median_ms / 1e3), rtol=1e-9)
    np.testing.assert_allclose(ok.frac_dense, ok.dense_median_ms / ok.median_ms, rtol=1e-9)
    assert (ok.runs >= 1).all() and (ok.iqr_ms >= 0).all()
    assert ((ok.q1_ms <= ok.median_ms) & (ok.median_ms <= ok.q3_ms)).all()
    assert (ok.peak_extra_bytes > 0).all() and (ok.estimate_bytes > 0).all()
    assert (ok.max_abs_diff_to_eager <= np.where(ok.dtype == "float32", 1e-5, 3e-2)).all()
    assert set(ok[ok.backend == "auto"].chosen) <= set(moelab.backends.AUTO_CANDIDATES)
    env = table.attrs["environment"]
    for key in ("torch_version", "device", "num_threads", "cpu_capability", "clock", "budget_bytes"):
        assert key in env
    assert env["num_threads"] == 1 and env["clock"] == "process"


def test_memory_guard_skips_and_runs_nothing():
    calls = []

    def spy(experts, hidden_states, top_k_index, top_k_weights):
        calls.append(hidden_states.shape)
        return moelab.ExpertsInterface.get("eager")(experts, hidden_states, top_k_index, top_k_weights)
    moelab.ExpertsInterface.register("spy", spy)
    try:
        t = bench.sweep(["spy", "grouped_mm"], tokens=[4], num_experts=[4], top_k=[2], hidden_size=[16],
                        intermediate_size=[32], dtypes=["float32"], memory_budget=1000, progress=False)
    finally:
        moelab.ExpertsInterface.unregister("spy")
    assert calls == []  # nothing ran, not even the warm-up
    assert len(t) == 2 and (t.status == "skipped").all()
    assert t.reason.str.contains("memory guard").all() and t.reason.str.contains("> budget 1000 B").all()
    assert t.median_ms.isna().all() and t.dense_median_ms.isna().all()
    assert (t.estimate_bytes > 1000).all()


def test_guard_skips_batched_mm_where_its_weight_copies_do_not_fit():
    cfg = moelab.MoEConfig(hidden_size=64, intermediate_size=64, num_experts=4, top_k=2)
    T = 16
    batched = guard.estimate(cfg, T, "batched_mm", torch.float32)
    grouped = guard.estimate(cfg, T, "grouped_mm", torch.float32)
    assert batched.total_bytes - grouped.total_bytes >= T * 2 * 3 * 64 * 64 * 4 * 0.9  # T*k*3*I*H elements
    budget = (batched.total_bytes + grouped.total_bytes) // 2
    t = bench.sweep(["batched_mm", "grouped_mm", "eager"], tokens=[T], num_experts=[4], top_k=[2],
                    hidden_size=[64], intermediate_size=[64], dtypes=["float32"], memory_budget=budget,
                    min_run_time=0.01, progress=False, transformers=_has_transformers())
    by = t.set_index(["library", "backend"]).status
    assert by[("moelab", "batched_mm")] == "skipped" and by[("moelab", "grouped_mm")] == "ok"
    if _has_transformers():  # the guard covers transformers' side too
        assert by[("transformers", "batched_mm")] == "skipped" and by[("transformers", "grouped_mm")] == "ok"


@pytest.mark.parametrize("text, expected", [("8GiB", 8 * 2 ** 30), ("512MB", 512 * 10 ** 6), ("0.5", 0.5),
                                            ("1e6", 10 ** 6), ("2048", 2048)])
def test_budget_parsing(text, expected):
    assert guard.parse_bytes(text) == expected


def test_budget_validation():
    assert guard.resolve_budget(123) == 123
    assert 0 < guard.resolve_budget(0.25) < guard.resolve_budget(None) <= guard.available_memory()
    for bad in ("lots", -1, 1.5, True):
        with pytest.raises(ValueError, match="budget"):
            guard.resolve_budget(bad)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown experts_implementation 'fast'"):
        bench.sweep(["fast"], progress=False)
    with pytest.raises(ValueError, match="tokens must be ints >= 1"):
        bench.sweep(tokens=[0], progress=False)
    with pytest.raises(ValueError, match=r"dtype must be a floating torch.dtype or one of \[.float32., .bfloat16., .float16., .float64.\]"):
        bench.sweep(dtypes=["int8"], progress=False)
    with pytest.raises(ValueError, match="num_threads"):
        bench.sweep(num_threads=0, progress=False)


def test_backward_and_wall_clock():
    t = bench.sweep(["grouped_mm"], tokens=[3], num_experts=[4], top_k=[2], hidden_size=[16],
                    intermediate_size=[32], dtypes=["float32"], backward=True, clock="wall", min_run_time=0.01,
                    progress=False)
    row = t.iloc[0]
    assert row.status == "ok" and row["pass"] == "forward+backward" and row.clock == "wall"
    assert math.isclose(row.useful_gflop, 3 * 6 * 3 * 2 * 16 * 32 / 1e9)
    assert row.frac_dense == pytest.approx(row.dense_median_ms / row.median_ms)


def test_compiled_variant_and_errors_are_rows():
    t = bench.sweep(["batched_mm"], tokens=[2], num_experts=[4], top_k=[2], hidden_size=[16],
                    intermediate_size=[32], dtypes=["float32"], compiled=[True], min_run_time=0.01,
                    measure_memory=False, progress=False)
    row = t.iloc[0]
    assert row.status == "ok" and row.compiled and row.fullgraph and row.compile_mode == "default"
    assert row.max_abs_diff_to_eager < 1e-5

    def broken(experts, hidden_states, top_k_index, top_k_weights):
        raise RuntimeError("this backend cannot run here")
    moelab.ExpertsInterface.register("broken", broken)
    try:
        t = bench.sweep(["broken"], tokens=[2], num_experts=[4], top_k=[2], hidden_size=[16],
                        intermediate_size=[32], dtypes=["float32"], min_run_time=0.01, progress=False)
    finally:
        moelab.ExpertsInterface.unregister("broken")
    assert t.iloc[0].status == "error" and "cannot run here" in t.iloc[0].reason


def test_save_and_load_round_trip(table, tmp_path):
    paths = bench.save(table, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["environment"]["torch_version"] == torch.__version__ and len(data["rows"]) == len(table)
    for path in paths.values():
        back = bench.load(path)
        assert len(back) == len(table) and back.attrs["environment"]["torch_version"] == torch.__version__
        np.testing.assert_allclose(back.median_ms.astype(float), table.median_ms.astype(float), rtol=1e-8)  # saved to 10 significant digits
        assert list(back.status) == list(table.status)


def test_summary_pivots_one_line_per_configuration(table):
    s = bench.summary(table)
    assert len(s) == 2 * 2 * 2 and "dense" in s.columns and "grouped_mm" in s.columns
    assert (s[s.index.get_level_values("top_k") == 8]["eager"] == "skip").all()


def test_plots_return_figures(table):
    for fig in (bench.plot_time(table), bench.plot_memory(table, dtype="float32"),
                bench.plot_speedup_map(table, "eager", "grouped_mm")):
        assert isinstance(fig, Figure) and fig.axes
    with pytest.raises(ValueError, match="variant 'nope'"):
        bench.plot_speedup_map(table, "nope", "grouped_mm")


def test_crossover_points_are_found_between_the_right_tokens():
    rows = []
    for T, (ta, tb) in zip([1, 10, 100], [(1.0, 2.0), (2.0, 2.0 * 10 ** 0.5), (4.0, 3.0)]):
        for backend, t in (("eager", ta), ("grouped_mm", tb)):
            rows.append(dict(status="ok", library="moelab", backend=backend, compiled=False, dtype="float32",
                             num_experts=8, top_k=2, hidden_size=16, intermediate_size=32, num_tokens=T,
                             median_ms=t))
    points = bench.crossover_points(pd.DataFrame(rows), "eager", "grouped_mm")
    assert len(points) == 1
    p = points.iloc[0]
    assert p["between"] == (10, 100) and p.faster_after == "grouped_mm" and 10 < p.num_tokens_at < 100
    assert p.pairs_at == pytest.approx(2 * p.num_tokens_at)


def test_crossovers_from_a_sweep_follow_the_fastest_backend():
    rows = []
    times = {2: {"eager": 1.0, "batched_mm": 0.5, "grouped_mm": 0.9},
             32: {"eager": 1.0, "batched_mm": 2.0, "grouped_mm": 1.2},
             512: {"eager": 3.0, "batched_mm": 50.0, "grouped_mm": 2.0}}
    for S, by_backend in times.items():
        for backend, t in by_backend.items():
            rows.append(dict(status="ok", library="moelab", backend=backend, compiled=False, dtype="float32",
                             device="cpu", num_experts=8, top_k=2, hidden_size=16, intermediate_size=32,
                             num_tokens=S // 2, pairs=S, median_ms=t))
    table = bench.crossovers_from_sweep(pd.DataFrame(rows))
    assert table.rules["cpu/float32/eager"] == [[8, "batched_mm"], [128, "eager"], [None, "grouped_mm"]]
    assert table.choose(100, torch.float32, "cpu") == ("eager", table.choose(100, torch.float32, "cpu")[1])
    assert table.source == "calibrated" and table.unit == "pairs"  # one E: both units fit alike, pairs wins ties
    assert "cpu/*/compiled" in table.rules  # defaults kept for what was not measured


def test_crossovers_from_a_sweep_take_capacity_where_it_wins_but_never_compiled():
    rows = []
    times = {2: {"eager": 1.0, "batched_mm": 0.9, "grouped_mm": 0.8, "capacity": 0.5},
             512: {"eager": 3.0, "batched_mm": 50.0, "grouped_mm": 2.0, "capacity": 2.5}}
    for compiled in (False, True):
        for S, by_backend in times.items():
            for backend, t in by_backend.items():
                rows.append(dict(status="ok", library="moelab", backend=backend, compiled=compiled,
                                 dtype="bfloat16", device="cpu", num_experts=8, top_k=2, hidden_size=16,
                                 intermediate_size=32, num_tokens=S // 2, pairs=S, median_ms=t))
    table = bench.crossovers_from_sweep(pd.DataFrame(rows), unit="pairs")
    assert table.rules["cpu/bfloat16/eager"] == [[32, "capacity"], [None, "grouped_mm"]]
    # compiled, capacity (0.5) is left out; grouped_mm's compiled time counts as the uncompiled lean path's
    assert table.rules["cpu/bfloat16/compiled"] == [[None, "grouped_mm"]]
    assert "capacity" in table.meta["scores"]["cpu/bfloat16/eager"]["2"]


def _has_transformers():
    try:
        import transformers  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.mark.skipif(not _has_transformers(), reason="transformers not installed (pip install -e .[hf])")
def test_transformers_namesakes_are_the_ones_compared():
    from moelab.bench import hf
    from moelab.hf.inspect_adapter import NAMESAKE_BACKENDS

    for name in NAMESAKE_BACKENDS:
        assert callable(hf.backend(name))
    with pytest.raises(ValueError, match="transformers has no experts backend 'auto'"):
        hf.backend("auto")


@pytest.mark.skipif(not _has_transformers(), reason="transformers not installed (pip install -e .[hf])")
def test_transformers_side_by_side_on_identical_weights():
    t = bench.sweep(["eager", "batched_mm", "grouped_mm", "auto"], tokens=[5], num_experts=[4], top_k=[2],
                    hidden_size=[16], intermediate_size=[32], dtypes=["float32"], transformers=True,
                    min_run_time=0.01, measure_memory=False, progress=False)
    hf = t[t.library == "transformers"]
    assert sorted(hf.backend) == ["batched_mm", "eager", "grouped_mm"]  # transformers has no "auto"
    assert (hf.status == "ok").all() and (hf.max_abs_diff_to_eager < 1e-5).all()
    assert "grouped_mm/hf" in bench.summary(t).columns


def test_missing_transformers_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    code = moelab.cli.main(["bench", "--tokens", "1", "--experts", "4", "--top-k", "2", "--hidden", "16",
                            "--intermediate", "32", "--dtype", "float32", "--compare-transformers", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "--compare-transformers" in err
    assert moelab.hf.INSTALL_HINT in err  # the one message, from moelab.hf.require_transformers
    with pytest.raises(ImportError, match="hf` extra"):
        bench.sweep(["eager"], tokens=[1], num_experts=[4], top_k=[2], transformers=True, progress=False)


def test_environment_names_the_cpu_and_its_features():
    from importlib.metadata import version

    env = bench.environment()
    if not Path("/proc/cpuinfo").exists():
        pytest.skip("no /proc/cpuinfo to check the CPU flags against")
    flags = set()
    with open("/proc/cpuinfo") as f:  # read here, independently of moelab.core.machine
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    assert env["cpu_flags"] == sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c", "sse4")))
    assert ("avx2" in env["cpu_flags"]) == ("avx2" in flags)
    assert env["native_bf16"] is bool({"avx512_bf16", "amx_bf16"} & flags)
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["cpu_capability"] in env["cpu_description"] and env["cpu_model"] in env["cpu_description"]
    assert ("no native bf16" in env["cpu_description"]) is not env["native_bf16"]
    assert env["moelab_version"] == version("moelab")
    assert env["transformers_version"] == (moelab.hf.require_transformers().__version__ if _has_transformers()
                                           else None)
    json.dumps(env)  # a JSON-able record


def test_timing_helper_interleaves_torch_benchmark_blocks():
    from moelab.bench.timing import measure_interleaved, measure_time

    calls = {"a": 0, "b": 0}

    def stmt(name):
        def fn():
            calls[name] += 1
            return torch.ones(8).sum()
        return fn
    a, b = measure_interleaved([stmt("a"), stmt("b")], num_threads=1, clock="process", min_run_time=0.01,
                               min_runs=5)
    for name, timing in (("a", a), ("b", b)):
        assert set(timing) == {"median_ms", "iqr_ms", "q1_ms", "q3_ms", "runs"}
        assert timing["q1_ms"] <= timing["median_ms"] <= timing["q3_ms"] and timing["median_ms"] > 0
        assert timing["iqr_ms"] == pytest.approx(timing["q3_ms"] - timing["q1_ms"])
        assert calls[name] >= timing["runs"] >= 5  # every timed call really ran (plus torch's own warm-ups)
    one = measure_time(stmt("a"), num_threads=1, clock="wall", min_run_time=0.01, min_runs=3)
    assert one["runs"] >= 3 and one["median_ms"] > 0


def test_report_names_its_backend_sets():
    from moelab.bench import analysis
    from moelab.bench.report_sections import pct, shape_text, span
    from moelab.hf.inspect_adapter import NAMESAKE_BACKENDS

    assert bench.FIXED_BACKENDS is analysis.FIXED_BACKENDS
    assert set(bench.FIXED_BACKENDS) < set(bench.DEFAULT_BACKENDS) and "auto" not in bench.FIXED_BACKENDS
    assert set(NAMESAKE_BACKENDS) <= set(moelab.ExpertsInterface.names())
    assert pct(0.934) == "93%" and pct(float("nan")) == "" and pct(None) == ""
    assert span([0.5, float("nan"), 0.25], pct) == "25%–50%" and span([]) == "n/a"
    row = {"dtype": "bfloat16", "num_experts": 8, "top_k": 2, "num_tokens": 512}
    assert shape_text(row) == "bfloat16 E=8 k=2 T=512"


def test_cli_prints_a_table_and_writes_its_files(tmp_path):
    out = tmp_path / "bench"
    args = [sys.executable, "-m", "moelab", "bench", "--tokens", "1,2x3", "--experts", "4", "--top-k", "2",
            "--hidden", "16", "--intermediate", "32", "--dtype", "float32", "--min-run-time", "0.01", "--quiet",
            "--out", str(out)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "median time per call" in result.stdout and "grouped_mm" in result.stdout
    for name in ("sweep.csv", "sweep.json", "time_float32.png", "memory_float32.png",
                 "speedup_grouped_mm_over_eager_float32.png"):
        assert (out / name).stat().st_size > 0, name
    assert len(pd.read_csv(out / "sweep.csv")) == 2 * len(bench.DEFAULT_BACKENDS)


def test_cli_rejects_bad_lists():
    result = subprocess.run([sys.executable, "-m", "moelab", "bench", "--tokens", "1,x", "--quiet"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--tokens takes comma-separated" in result.stderr


def test_analysis_helpers(table):
    from moelab.bench import analysis

    r = analysis.auto_vs_best(table)
    assert len(r) == 2 * 2 and set(r.chosen) <= set(moelab.backends.AUTO_CANDIDATES)
    np.testing.assert_allclose(r.ratio, r.auto_ms / r.best_ms)
    f = analysis.fastest(table)
    assert len(f) == 4 and all(row.fastest in row.tied_with_fastest for row in f.itertuples())
    d = analysis.dense_fractions(table, min_pairs=0)
    assert len(d) == 4 and {"eager", "grouped_mm"} <= set(d.columns)
    assert analysis.dense_fractions(table, min_pairs=10 ** 9).empty
    same = analysis.ratio_table(table, "grouped_mm", "grouped_mm")
    assert (same.ratio == 1).all() and (same.verdict == "faster").all()


def test_gemm_bound_columns_and_the_cached_variant():
    from moelab.bench import analysis
    from moelab.bench.baselines import grouped_gemm_pair

    t = bench.sweep(["grouped_mm"], tokens=[8], num_experts=[4], top_k=[2], hidden_size=[16], intermediate_size=[32],
                    dtypes=["float32"], min_run_time=0.01, progress=False, measure_memory=False, gemm_bound=True)
    row = t.iloc[0]
    assert row.grouped_gemm_median_ms > 0 and row.grouped_gemm_cached_median_ms > 0
    d = analysis.dense_fractions(t, min_pairs=0).iloc[0]
    assert d.grouped_gemm_bound == pytest.approx(row.dense_median_ms / row.grouped_gemm_median_ms)
    assert d.cached_gemm_bound == pytest.approx(row.dense_median_ms / row.grouped_gemm_cached_median_ms)
    # the cached pair multiplies every group by expert 0's weights: check against plain matmuls
    experts = moelab.SparseMoE(moelab.MoEConfig(hidden_size=16, intermediate_size=32, num_experts=4, top_k=2),
                               seed=0).experts
    top_k_index = torch.tensor([[0, 3], [1, 2], [3, 1]])
    streamed = grouped_gemm_pair(experts, top_k_index, torch.float32, "cpu", torch.Generator().manual_seed(0))
    cached = grouped_gemm_pair(experts, top_k_index, torch.float32, "cpu", torch.Generator().manual_seed(0),
                                cached=True)
    (up_s, _), (up_c, down_c) = streamed(), cached()
    generator = torch.Generator().manual_seed(0)  # the same draws as inside the pair
    x, a = torch.randn(6, 16, generator=generator), torch.randn(6, 32, generator=generator)
    torch.testing.assert_close(up_c, x @ experts.gate_up_proj[0].T)
    torch.testing.assert_close(down_c, a @ experts.down_proj[0].T)
    assert not torch.allclose(up_s, up_c)  # the streamed pair really reads the other experts


def test_report_is_computed_from_the_sweep():
    from moelab.bench import analysis
    from moelab.bench.report import markdown

    t = bench.sweep(tokens=[4, 8], num_experts=[4], top_k=[2], hidden_size=[16], intermediate_size=[32],
                    dtypes=["float32"], transformers=True, gemm_bound=True, min_run_time=0.01, measure_memory=False,
                    progress=False)
    text = markdown(t, None, {}, min_pairs=0)
    for heading in ("## Summary", "## 1. moelab vs transformers", "## 2. The dense limit at S = T·k ≥ 0",
                    "## 3. `auto` vs the fastest fixed backend", "## 4. The reference page's CPU claims",
                    "## 6. What was not measured"):
        assert heading in text
    for backend in ("eager", "batched_mm", "grouped_mm"):  # the side-by-side table carries the sweep's ratios
        r = analysis.ratio_table(t, backend, f"hf:{backend}")
        assert f"| `{backend}` | {len(r)} | {r.ratio.median():.3f} | {r.ratio.max():.3f} |" in text
    auto = analysis.auto_vs_best(t)
    assert f"above 1.10 at {(auto.ratio > 1.1).sum()} of {len(auto)} shapes" in text
    assert "hidden 16, expert-intermediate 32, dtypes float32" in text


def test_the_forward_backward_section_is_computed_from_its_sweep():
    from moelab.bench import analysis
    from moelab.bench.report import markdown

    t = bench.sweep(tokens=[4, 8], num_experts=[4], top_k=[2], hidden_size=[16], intermediate_size=[32],
                    dtypes=["float32"], transformers=True, min_run_time=0.01, measure_memory=False, progress=False)
    b = bench.sweep(tokens=[4, 8], num_experts=[4], top_k=[2], hidden_size=[16], intermediate_size=[32],
                    dtypes=["float32"], transformers=True, backward=True, min_run_time=0.01, measure_memory=False,
                    progress=False)
    assert "## 8. Forward + backward" not in markdown(t, None, {}, min_pairs=0)
    text = markdown(t, None, {}, min_pairs=0, backward=b)
    section = text[text.index("## 8. Forward + backward"):]
    for backend in ("eager", "batched_mm", "grouped_mm"):  # the backward sweep's own ratios, not the forward's
        r = analysis.ratio_table(b, backend, f"hf:{backend}")
        assert f"| `{backend}` | {len(r)} | {r.ratio.median():.3f} | {r.ratio.max():.3f} |" in section
    frac = analysis.dense_fractions(b, 1).set_index("num_tokens")
    assert f"| float32 | 4 | 2 | 8 | 16 | {frac.loc[8, 'grouped_mm']:.0%} | {frac.loc[8, 'eager']:.0%} |" in section
    # every target names its verdict; no shape of this tiny grid reaches S >= 8192
    assert section.count("**not measured**") == 3


def test_the_gpu_section_says_it_was_not_measured_or_reads_the_gpu_sweep(table):
    from moelab.bench import analysis
    from moelab.bench.report_sections import section_gpu

    assert "**Not measured.**" in "\n".join(section_gpu(None)) and "benchmarks/gpu.py" in "\n".join(section_gpu(None))
    # a sweep in place of a GPU one: the section is computed from whatever it is given
    text = "\n".join(section_gpu({"forward": table, "decode_switch": {"grouped_mm throughout": 2.0,
                                                                     "decode switch": 1.0, "same tokens": True}}))
    best = analysis.fastest(table, backends=("eager", "batched_mm", "grouped_mm"))
    small = best[best["num_tokens"] <= 16]
    assert f"fastest at {(small['fastest'] == 'batched_mm').sum()} of {len(small)} shapes" in text
    assert "(2.00x); same tokens: True" in text


def test_compiled_variants_are_judged_within_one_run(table):
    from moelab.bench.report_sections import compiled_run

    compiled_only = table.assign(compiled=True)
    assert compiled_run(table, None) is None
    assert len(compiled_run(table, compiled_only)) == 2 * len(table)  # two runs: both tables
    same_run = pd.concat([table, compiled_only], ignore_index=True)  # a sweep with compiled=(False, True)
    assert compiled_run(table, same_run) is same_run


def test_profile_steps_splits_a_call_by_operator():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_steps.py"
    spec = importlib.util.spec_from_file_location("profile_steps", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    table = module.profile_call("grouped_mm", torch.float32, 4, 2, 8, 16, 32, calls=2)
    assert table.share.sum() == pytest.approx(1.0)
    assert (table.ms_per_call.diff().dropna() <= 0).all()  # largest first
    assert "aten::mm" in set(table.op) or "aten::_grouped_mm" in set(table.op)  # the GEMMs are in the split


@pytest.mark.parametrize("kwargs, message", [
    ({"memory_budget": "2.0"}, "ambiguous"), ({"min_run_time": float("nan")}, "min_run_time"),
    ({"min_run_time": float("inf")}, "min_run_time"), ({"device": "cud"}, "device"),
    pytest.param({"device": "cuda"}, "device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_sweep_arguments_from_python_are_named_before_anything_runs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bench.sweep(["eager"], tokens=[1], num_experts=[4], top_k=[2], hidden_size=[16], intermediate_size=[32],
                    dtypes=["float32"], progress=False, **kwargs)
