"""The `auto` backend: registered like the others, picks by a crossover table, shows its choice in a trace."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import moelab
from conftest import make_moe
from moelab.backends import auto, calibration
from moelab.backends.calibration import DEFAULT_CROSSOVERS, CrossoverTable, use_crossovers
from moelab.backends.cpu import compiled as cpu_compiled
from moelab.backends.cpu import workspace
from moelab.core.steps import add_recorder, remove_recorder

FIRST_STEP = {"eager": "expert_mask", "batched_mm": "repeat", "grouped_mm": "sort", "capacity": "positions"}


def traced_steps(moe, x):
    """The layer's output and steps for an inference call: under no_grad, so the "eager" rules apply (a call that
    needs gradients reads the "backward" ones: test_auto_backward.py)."""
    steps = []

    def recorder(name, explanation, tensors, derived, copied):
        steps.append((name, dict(tensors)))
    add_recorder(recorder)
    try:
        with torch.no_grad():
            out = moe(x)
    finally:
        remove_recorder(recorder)
    return out, steps


def test_auto_is_registered_and_computes_the_same_layer():
    assert "auto" in moelab.ExpertsInterface.names()
    moe = make_moe(16, 32, 6, 2, backend="auto")
    x = torch.randn(11, 16)
    expected = moe(x)
    moe.set_experts_implementation("eager")
    torch.testing.assert_close(moe(x), expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("tokens, chosen", [(1, "eager"), (2, "eager"), (3, "batched_mm"), (8, "batched_mm"),
                                            (9, "grouped_mm"), (40, "grouped_mm")])
def test_auto_picks_by_the_given_table_and_the_trace_shows_it(tokens, chosen):
    table = CrossoverTable({"cpu/*/eager": [[4, "eager"], [16, "batched_mm"], [None, "grouped_mm"]]})
    moe = make_moe(16, 32, 6, 2, backend="auto")  # k = 2: S = 2 * tokens
    with use_crossovers(table):
        out, steps = traced_steps(moe, torch.randn(tokens, 16))
    names = [name for name, _ in steps]
    auto_step = steps[names.index("auto")][1]
    assert auto_step["chosen"] == chosen and auto_step["pairs"] == 2 * tokens
    assert "cpu/*/eager" in auto_step["reason"]
    assert names[names.index("auto") + 1] == FIRST_STEP[chosen]  # then the chosen backend's own steps
    assert out.shape == (tokens, 16)


def test_dtype_specific_rules_win_over_wildcards():
    table = CrossoverTable({"cpu/bfloat16/eager": [[None, "batched_mm"]], "cpu/*/eager": [[None, "eager"]],
                            "*/*/compiled": [[None, "grouped_mm"]]})
    assert table.choose(64, torch.bfloat16, "cpu")[0] == "batched_mm"
    assert table.choose(64, torch.float32, "cpu")[0] == "eager"
    assert table.choose(64, torch.float32, "cpu", compiled=True)[0] == "grouped_mm"
    with pytest.raises(KeyError, match="no crossover rule"):
        CrossoverTable({"cuda/*/eager": [[None, "eager"]]}).choose(1, torch.float32, "cpu")


@pytest.mark.parametrize("rules, message", [
    ({"cpu/*/eager": [[4, "eager"]]}, "last segment"),
    ({"cpu/*/eager": [[8, "eager"], [4, "batched_mm"], [None, "grouped_mm"]]}, "increasing"),
    ({"cpu/*/eager": [[None, "mine"]]}, "chooses among"),
    ({"cpu/*/compiled": [[None, "eager"]]}, "eager cannot be captured"),
    ({"cpu/*/compiled": [[2, "batched_mm"], [None, "capacity"]]}, "capacity cannot be captured"),
    ({"cpu/*/eager": [[None, "block_aligned"]]}, "chooses among"),
    ({"cpu/eager": [[None, "eager"]]}, "device/dtype/mode"),
])
def test_bad_tables_are_refused(rules, message):
    with pytest.raises(ValueError, match=message):
        CrossoverTable(rules)


def test_compiled_auto_never_takes_eager_and_captures_fullgraph():
    torch._dynamo.reset()
    assert all(b != "eager" for _, b in DEFAULT_CROSSOVERS.rules["cpu/*/compiled"])
    moe = make_moe(32, 64, 8, 2, backend="auto")
    x = torch.randn(10, 32)
    compiled = torch.compile(moe, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), moe(x), atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


def test_defaults_without_calibration_and_a_stored_calibration(tmp_path, monkeypatch):
    monkeypatch.setenv("MOELAB_CACHE_DIR", str(tmp_path))
    try:
        assert calibration.reload_crossovers().source == "default"
        assert auto.choose(4096, torch.float32, "cpu", compiled=False, num_experts=8)[0] == "grouped_mm"
        assert auto.choose(2, torch.float32, "cpu", compiled=False, num_experts=64)[0] == "eager"
        assert auto.choose(2, torch.float32, "cpu", compiled=True, num_experts=64)[0] == "batched_mm"
        from moelab import bench
        table = bench.calibrate(tokens=(1, 8), num_experts=(4,), top_k=(2,), hidden_size=16, intermediate_size=32,
                                dtypes=("float32",), min_run_time=0.01, progress=False)
        path = calibration.calibration_path()
        assert path.exists() and path.parent == tmp_path and calibration.machine_key() in path.name
        assert calibration.crossovers().source == "calibrated" and "cpu/float32/eager" in table.rules
        assert CrossoverTable.load(path).rules == table.rules
        moe = make_moe(16, 32, 4, 2, backend="auto")
        _, steps = traced_steps(moe, torch.randn(3, 16))
        assert "calibrated" in dict(steps)["auto"]["reason"]
    finally:
        monkeypatch.delenv("MOELAB_CACHE_DIR")
        calibration.set_crossovers(None)


def test_set_crossovers_overrides_and_resets():
    table = CrossoverTable({"*/*/*": [[None, "batched_mm"]]})
    calibration.set_crossovers(table)
    try:
        assert auto.choose(10, torch.float32, "cpu", compiled=False)[0] == "batched_mm"
    finally:
        calibration.set_crossovers(None)
    assert calibration.crossovers() is not table
    with pytest.raises(ValueError, match="CrossoverTable"):
        calibration.set_crossovers({"cpu/*/eager": []})


def test_pairs_per_expert_unit_scales_with_num_experts():
    table = CrossoverTable({"cpu/*/eager": [[0.5, "eager"], [2, "batched_mm"], [None, "grouped_mm"]]},
                           unit="pairs_per_expert")
    assert table.choose(16, torch.float32, "cpu", num_experts=64)[0] == "eager"  # S/E = 0.25
    assert table.choose(16, torch.float32, "cpu", num_experts=8)[0] == "batched_mm"  # S/E = 2
    assert table.choose(16, torch.float32, "cpu", num_experts=4)[0] == "grouped_mm"  # S/E = 4
    with pytest.raises(ValueError, match="pass num_experts"):
        table.choose(16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="unit must be one of"):
        CrossoverTable({"cpu/*/eager": [[None, "eager"]]}, unit="tokens")
    moe = make_moe(16, 32, 8, 2, backend="auto")
    with use_crossovers(table):
        _, steps = traced_steps(moe, torch.randn(8, 16))  # S = 16 over 8 experts
    step = dict(steps)["auto"]
    assert step["chosen"] == "batched_mm" and step["pairs"] == 16 and "S/E=16/8" in step["reason"]


def test_rules_per_number_of_experts_take_the_nearest():
    table = CrossoverTable({"cpu/*/eager": [[None, "grouped_mm"]],
                            "cpu/*/eager/E=8": [[None, "eager"]],
                            "cpu/*/eager/E=64": [[None, "batched_mm"]]}, unit="pairs_per_expert")
    assert table.choose(4, torch.float32, "cpu", num_experts=8)[0] == "eager"
    assert table.choose(4, torch.float32, "cpu", num_experts=16)[0] == "eager"  # 16/8 = 2 < 64/16 = 4
    assert table.choose(4, torch.float32, "cpu", num_experts=32)[0] == "batched_mm"
    assert "E=64" in table.choose(4, torch.float32, "cpu", num_experts=256)[1]
    with pytest.raises(ValueError, match="E=<n>"):
        CrossoverTable({"cpu/*/eager/E=0": [[None, "eager"]]})


def test_compiled_inference_runs_grouped_mm_as_one_opaque_op(monkeypatch):
    monkeypatch.setattr(workspace, "MIN_BYTES", 0)  # the op is for buffers of MiBs; make the tiny test qualify
    monkeypatch.setattr(cpu_compiled, "COMPILED_LEAN_MIN_BYTES", 0)
    torch._dynamo.reset()
    table = CrossoverTable({"*/*/*": [[None, "grouped_mm"]]})
    moe = make_moe(32, 64, 8, 2, backend="auto")
    x = torch.randn(12, 32)
    with use_crossovers(table), torch.no_grad():
        compiled = torch.compile(moe, fullgraph=True, backend="aot_eager")
        assert torch.equal(compiled(x), moe(x))  # the op runs the uncompiled fast path: the same bits
        gm = torch._dynamo.explain(moe)(x)
    assert gm.graph_count == 1 and gm.graph_break_count == 0
    assert "moelab.grouped_mm_lean" in str(gm.graphs[0].code)
    torch._dynamo.reset()
    workspace.release_workspace()


def test_compiled_small_calls_keep_the_compiled_graph():
    torch._dynamo.reset()
    table = CrossoverTable({"*/*/*": [[None, "grouped_mm"]]})
    moe = make_moe(32, 64, 8, 2, backend="auto")
    with use_crossovers(table), torch.no_grad():
        gm = torch._dynamo.explain(moe)(torch.randn(12, 32))  # a few KiB: below COMPILED_LEAN_MIN_BYTES
    assert gm.graph_break_count == 0 and "grouped_mm_lean" not in str(gm.graphs[0].code)
    torch._dynamo.reset()


@pytest.mark.parametrize("content", [
    "{not json",  # not JSON
    "[1, 2]",  # JSON, not an object
    '{"rules": {"cpu/*/eager": 3}}',  # ill-typed segments
    '{"rules": {"cpu/*/eager": [[null, "mine"]]}}',  # a backend auto does not know
    '{"rules": {"cpu/*/eager": [[null, "eager"]]}, "meta": []}',  # ill-typed meta
    b"\xff\xfe\x00",  # not UTF-8
    None,  # a directory where the file should be: unreadable
])
def test_a_corrupt_calibration_warns_and_auto_falls_back_to_the_defaults(tmp_path, monkeypatch, content):
    monkeypatch.setenv("MOELAB_CACHE_DIR", str(tmp_path))
    path = calibration.calibration_path()
    if content is None:
        path.mkdir()
        (path / "x").write_text("{}")
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    try:
        with pytest.warns(UserWarning, match="ignoring the stored auto calibration"):
            table = calibration.reload_crossovers()
        assert table is DEFAULT_CROSSOVERS and calibration.crossovers() is DEFAULT_CROSSOVERS
        for pairs, num_experts in ((2, 64), (4096, 8), (16, 8)):
            assert auto.choose(pairs, torch.float32, "cpu", compiled=False, num_experts=num_experts) == \
                DEFAULT_CROSSOVERS.choose(pairs, torch.float32, "cpu", False, num_experts)
        moe = make_moe(16, 32, 4, 2, backend="auto")
        _, steps = traced_steps(moe, torch.randn(3, 16))
        assert "default crossovers" in dict(steps)["auto"]["reason"]
    finally:
        monkeypatch.delenv("MOELAB_CACHE_DIR")
        calibration.set_crossovers(None)


def test_a_corrupt_calibration_never_breaks_import(tmp_path):
    env = dict(os.environ, MOELAB_CACHE_DIR=str(tmp_path), PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    key = subprocess.run([sys.executable, "-c", "from moelab.backends import machine_key; print(machine_key())"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    (tmp_path / f"crossovers-{key}.json").write_text('{"rules": [')
    result = subprocess.run([sys.executable, "-c", "import moelab; print(moelab.backends.crossovers().source)"],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "default" and "ignoring the stored auto calibration" in result.stderr


def test_the_choice_cache_follows_the_table():
    moe = make_moe(16, 32, 8, 2, backend="auto")
    x = torch.randn(8, 16)
    for backend in ("batched_mm", "eager", "batched_mm"):  # the same S each time: only the table changes
        with use_crossovers(CrossoverTable({"*/*/*": [[None, backend]]})):
            _, steps = traced_steps(moe, x)
        assert dict(steps)["auto"]["chosen"] == backend


def test_capacity_is_a_candidate_where_nothing_drops():
    assert moelab.backends.AUTO_CANDIDATES == ("eager", "batched_mm", "grouped_mm", "capacity")
    table = CrossoverTable({"cpu/*/eager": [[None, "capacity"]], "*/*/compiled": [[None, "grouped_mm"]]})
    moe = make_moe(16, 32, 6, 2, backend="auto")
    x = torch.randn(9, 16)
    with use_crossovers(table):
        out, steps = traced_steps(moe, x)
    names = [name for name, _ in steps]
    assert steps[names.index("auto")][1]["chosen"] == "capacity" and names[names.index("auto") + 1] == "positions"
    moe.set_experts_implementation("eager")
    torch.testing.assert_close(out, moe(x), atol=2e-5, rtol=1e-4)


def test_with_drops_auto_never_takes_capacity():
    # the layer drops in training (capacity factor 1.0): the experts get a dropped mask, so capacity's rule yields
    table = CrossoverTable({"cpu/*/eager": [[None, "capacity"]], "*/*/compiled": [[None, "grouped_mm"]]})
    moe = make_moe(16, 32, 4, 2, backend="auto", capacity_factor=1.0).train()
    x = torch.randn(12, 16)
    with use_crossovers(table):
        out, steps = traced_steps(moe, x)
        assert table.choose(24, torch.float32, "cpu", num_experts=4, drops=True)[0] == "grouped_mm"
        assert auto.choose(24, torch.float32, "cpu", compiled=False, num_experts=4, drops=False)[0] == "capacity"
    step = dict(steps)["auto"]
    assert step["chosen"] == "grouped_mm" and "capacity only where nothing drops" in step["reason"]
    moe.set_experts_implementation("eager")
    torch.testing.assert_close(out, moe(x), atol=2e-5, rtol=1e-4)  # the same drops, the same answer
    # the memory models follow the same rule: auto with drops is modelled as grouped_mm, dropless as capacity
    with use_crossovers(table):
        dropping = moelab.memory.analytic(moe.config, 12, "auto", training=True)
        dropless = moelab.memory.analytic(moe.config, 12, "auto", training=False)
    assert (dropping.backend, dropless.backend) == ("grouped_mm", "capacity")
    assert dropping.requested_backend == dropless.requested_backend == "auto"


def test_a_wildcard_mode_rule_never_compiles_capacity():
    table = CrossoverTable({"cpu/*/*": [[None, "capacity"]]})
    backend, reason = table.choose(16, torch.float32, "cpu", compiled=True, num_experts=8)
    assert backend == "grouped_mm" and "cannot be compiled whole" in reason
    assert table.choose(16, torch.float32, "cpu", compiled=False, num_experts=8)[0] == "capacity"


def test_a_calibration_stored_before_capacity_was_a_candidate_keeps_loading(tmp_path, monkeypatch):
    monkeypatch.setenv("MOELAB_CACHE_DIR", str(tmp_path))
    old = {"rules": {"cpu/float32/eager": [[0.5, "eager"], [None, "grouped_mm"]],
                     "cpu/*/compiled": [[2.8, "batched_mm"], [None, "grouped_mm"]]},
           "unit": "pairs_per_expert", "source": "calibrated", "meta": {"grid": {"num_experts": [8]}}}
    calibration.calibration_path().write_text(json.dumps(old))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "ignoring the stored calibration"
            table = calibration.reload_crossovers()
        assert table.source == "calibrated" and table.rules == old["rules"]
        assert auto.choose(2, torch.float32, "cpu", compiled=False, num_experts=8)[0] == "eager"
        assert auto.choose(64, torch.float32, "cpu", compiled=False, num_experts=8)[0] == "grouped_mm"
    finally:
        monkeypatch.delenv("MOELAB_CACHE_DIR")
        calibration.set_crossovers(None)
