"""The headless main job: `python -m moelab` prints each backend's difference to eager and its time."""

import re
import subprocess
import sys

import pandas as pd
import pytest
import torch

import moelab
from moelab.bench import FIXED_BACKENDS, compare_backends
from moelab.core.machine import cpu_description
from moelab.models.io import package_version


def test_default_job_prints_every_backend():
    args = [sys.executable, "-m", "moelab", "--tokens", "8", "--hidden", "32", "--intermediate", "16"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"moelab {package_version()}, torch {torch.__version__}, 1 thread(s)")
    assert cpu_description() in lines  # the CPU: model, kernels, native bf16 or not, cores
    assert "max_abs_diff_to_eager" in result.stdout and "median_ms" in result.stdout
    for backend in FIXED_BACKENDS:
        row = next(line for line in lines if line.split() and line.split()[0] == backend)
        assert float(row.split()[1]) < 1e-5  # the difference to eager


def test_bad_arguments_are_named():
    result = subprocess.run([sys.executable, "-m", "moelab", "--top-k", "9"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "top_k must be in [1, num_experts = 8], got 9" in result.stderr


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-6), ("bfloat16", 2e-2)])
def test_compare_backends_table(dtype, tolerance):
    cfg = moelab.MoEConfig(hidden_size=16, intermediate_size=8, num_experts=4, top_k=2)
    table = compare_backends(cfg, num_tokens=4, dtype=dtype, min_run_time=0.01, seed=3)
    assert isinstance(table, pd.DataFrame)
    assert list(table.columns) == ["backend", "max_abs_diff_to_eager", "max_abs_output", "median_ms", "iqr_ms", "runs",
                                   "skipped"]
    assert list(table.backend) == list(FIXED_BACKENDS)
    assert (table.skipped == "").all()  # a 4-token call fits every backend: the memory guard skips nothing
    # the same comparison, computed here: the layer under the same seed, its input drawn from seed + 1
    torch_dtype = getattr(torch, dtype)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(4)).to(torch_dtype)
    with torch.no_grad():
        reference = moelab.SparseMoE(cfg, "eager", seed=3, dtype=torch_dtype)(x).float()
        for row in table.itertuples():
            out = moelab.SparseMoE(cfg, row.backend, seed=3, dtype=torch_dtype)(x).float()
            assert row.max_abs_diff_to_eager == pytest.approx((out - reference).abs().max().item(), abs=1e-7)
            assert row.max_abs_output == pytest.approx(reference.abs().max().item())
            assert row.max_abs_diff_to_eager <= tolerance * row.max_abs_output
    assert table.loc[table.backend == "eager", "max_abs_diff_to_eager"].item() == 0.0
    # timed by moelab.bench.timing: a positive median, a non-negative IQR, at least min_runs timed calls
    assert (table.median_ms > 0).all() and (table.iqr_ms >= 0).all() and (table.runs >= 5).all()


def test_compare_backends_takes_any_registered_backend_and_names_bad_arguments():
    cfg = moelab.MoEConfig(hidden_size=16, intermediate_size=8, num_experts=4, top_k=2)

    def doubled(experts, hidden_states, top_k_index, top_k_weights):  # twice eager: its difference is |eager|
        return 2 * moelab.ExpertsInterface.get("eager")(experts, hidden_states, top_k_index, top_k_weights)
    moelab.ExpertsInterface.register("doubled_test", doubled)
    try:
        table = compare_backends(cfg, num_tokens=4, backends=["eager", "doubled_test"], min_run_time=0.01)
    finally:
        moelab.ExpertsInterface.unregister("doubled_test")
    row = table.set_index("backend").loc["doubled_test"]
    assert row.max_abs_diff_to_eager == pytest.approx(row.max_abs_output, rel=1e-6) and row.median_ms > 0
    with pytest.raises(ValueError, match=r"dtype must be a floating torch.dtype or one of \[.float32., .bfloat16., .float16., .float64.\]"):
        compare_backends(cfg, dtype="int8")
    with pytest.raises(ValueError, match="num_tokens must be an int >= 1"):
        compare_backends(cfg, num_tokens=0)
    with pytest.raises(ValueError, match="num_threads must be an int >= 1"):
        compare_backends(cfg, num_threads=0)
    with pytest.raises(ValueError, match="unknown experts_implementation 'fast'"):
        compare_backends(cfg, backends=["fast"])


GRID = ["--tokens", "4", "--experts", "4", "--top-k", "2", "--hidden", "8", "--intermediate", "8",
        "--dtype", "float32", "--quiet"]


@pytest.mark.parametrize("flags, message", [
    (["--memory-budget", "2.0"], r"--memory-budget 2.0 is ambiguous: a number with a point and no unit is a "
                                 r"fraction of the available memory, in \(0, 1\]; for bytes give a unit \('2GiB'"),
    (["--min-run-time", "nan"], r"--min-run-time must be a finite number of seconds > 0, got nan"),
    (["--min-run-time", "inf"], r"--min-run-time must be a finite number of seconds > 0, got inf"),
    (["--device", "cud"], r"--device 'cud' is not a torch device"),
    (["--device", "meta"], r"--device meta holds no data to time"),
    pytest.param(["--device", "cuda"], r"--device cuda is not available on this machine",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")),
])
@pytest.mark.parametrize("command", ["bench", "calibrate"])
def test_bench_flags_a_user_mistypes_are_named_before_anything_runs(command, flags, message, capsys, monkeypatch):
    from moelab import cli
    import moelab.bench.cli as bench_cli

    ran = []  # the jobs, replaced: a flag that passes the check reaches them, a bad one must not
    monkeypatch.setattr(bench_cli, "run_bench", lambda args: ran.append(args) or 0)
    monkeypatch.setattr(bench_cli, "run_calibrate", lambda args: ran.append(args) or 0)
    assert cli.main([command, *GRID, *flags]) == 2
    assert re.search(message, capsys.readouterr().err) and not ran
    for good in (["--memory-budget", "0.5"], ["--memory-budget", "2GiB"], ["--memory-budget", "2e9"],
                 ["--min-run-time", "0.05"], ["--device", "cpu"]):
        assert cli.main([command, *GRID, *good]) == 0
    assert len(ran) == 5


def test_help_names_the_default_jobs_sizes(capsys):
    from moelab.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the epilog
    assert "T=128 tokens, H=512, I=256, E=8 experts, k=2, float32" in out and "compare --help" in out
    # the sizes it names are compare's defaults
    args = __import__("moelab.cli", fromlist=["build_parser"]).build_parser().parse_args(["compare"])
    assert (args.tokens, args.hidden, args.intermediate, args.experts, args.top_k, args.dtype) == \
        (128, 512, 256, 8, 2, "float32")


def test_compare_shows_no_iqr_for_too_few_runs(monkeypatch, capsys):
    import moelab.cli as cli

    real = cli.compare_backends

    def one_run_for_batched_mm(*args, **kwargs):  # as a slow batched_mm call gets: one timed run
        table = real(*args, **kwargs)
        table.loc[table.backend == "batched_mm", ["runs", "iqr_ms"]] = [1, 0.0]
        return table
    monkeypatch.setattr(cli, "compare_backends", one_run_for_batched_mm)
    assert cli.main(["compare", "--tokens", "4", "--hidden", "16", "--intermediate", "8", "--experts", "4",
                     "--top-k", "2", "--min-run-time", "0.01"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.strip().startswith("batched_mm "))
    assert "n/a" in row.split()  # its IQR column
    assert "batched_mm: 1 timed run(s), too few for an IQR" in out
    eager = next(line for line in out.splitlines() if line.strip().startswith("eager "))
    assert "n/a" not in eager.split()


def test_bench_legend_names_hf_only_when_transformers_ran(capsys, tmp_path):
    from moelab.cli import main

    assert main(["bench", "--tokens", "4", "--hidden", "16", "--intermediate", "8", "--experts", "4", "--top-k", "2",
                 "--dtype", "float32", "--backends", "eager", "--min-run-time", "0.01", "--no-memory", "--no-plots",
                 "--quiet", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "median time per call (ms); dense = the dense limit" in out and "x/hf" not in out
