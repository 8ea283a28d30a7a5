"""The headless main job: `python -m moelab` prints each backend's difference to eager and its time."""

import subprocess
import sys

import pandas as pd
import pytest

import moelab
from moelab.bench import compare_backends


def test_default_job_prints_every_backend():
    args = [sys.executable, "-m", "moelab", "--tokens", "8", "--hidden", "32", "--intermediate", "16"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "max_abs_diff_to_eager" in result.stdout and "median_ms" in result.stdout
    for backend in ("eager", "batched_mm", "grouped_mm"):
        row = next(line for line in lines if line.split() and line.split()[0] == backend)
        assert float(row.split()[1]) < 1e-5  # the difference to eager


def test_bad_arguments_are_named():
    result = subprocess.run([sys.executable, "-m", "moelab", "--top-k", "9"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "top_k must be in [1, num_experts = 8], got 9" in result.stderr


def test_compare_backends_table():
    cfg = moelab.MoEConfig(hidden_size=16, intermediate_size=8, num_experts=4, top_k=2)
    table = compare_backends(cfg, num_tokens=4, dtype="bfloat16", min_run_time=0.01)
    assert isinstance(table, pd.DataFrame) and list(table.backend) == ["eager", "batched_mm", "grouped_mm"]
    assert (table.max_abs_diff_to_eager <= 0.02 * table.max_abs_output).all()
    assert (table.median_ms > 0).all() and (table.runs >= 1).all()
    with pytest.raises(ValueError, match=r"dtype must be a floating torch.dtype or one of \[.float32., .bfloat16., .float16., .float64.\]"):
        compare_backends(cfg, dtype="int8")
    with pytest.raises(ValueError, match="num_tokens must be an int >= 1"):
        compare_backends(cfg, num_tokens=0)
