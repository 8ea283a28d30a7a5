"""`auto` for calls that need gradients: its own "backward" rules (measured forward + backward), picked by
`needs_autograd` (not `module.training`), the fallback to the default backward rules, their calibration, the CLI
flag, and the gradients of the chosen backend."""

import importlib
import json

import pandas as pd
import pytest
import torch

import moelab
from conftest import make_moe
from moelab.backends import auto, calibration
from moelab.backends.calibration import AUTO_CANDIDATES, DEFAULT_CROSSOVERS, CrossoverTable, use_crossovers
from moelab.bench import crossovers_from_sweep, sweep
from moelab.core.steps import add_recorder, remove_recorder

calibrate_module = importlib.import_module("moelab.bench.calibrate")  # the module; the package exports the function
# one backend per mode, so the step says which rule applied
BY_MODE = CrossoverTable({"cpu/*/eager": [[None, "eager"]], "cpu/*/backward": [[None, "batched_mm"]],
                          "cpu/*/compiled": [[None, "grouped_mm"]]})


def auto_step(call):
    """The `auto` step that `call()` records."""
    steps = []

    def recorder(name, explanation, tensors, derived, copied):
        steps.append((name, dict(tensors)))
    add_recorder(recorder)
    try:
        call()
    finally:
        remove_recorder(recorder)
    return dict(steps)["auto"]


def routing(T=6, E=4, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    top_k_index = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    return top_k_index, torch.softmax(torch.randn(T, k, generator=g), dim=-1)


# ------------------------------------------------------------------------------------------- which mode applies


@pytest.mark.parametrize("grad, x_grad, w_grad, params_grad, mode", [
    (True, False, False, True, "backward"),  # a training step: the weights require grad
    (False, True, True, True, "eager"),  # no_grad: nothing is recorded, whatever requires grad
    (True, False, False, False, "eager"),  # grad enabled but nothing requires grad: inference
    (True, True, False, False, "backward"),  # only the input requires grad (e.g. a frozen layer mid-network)
    (True, False, True, False, "backward"),  # only the routing weights (a router being trained)
])
def test_the_backward_rules_apply_where_the_call_needs_gradients(grad, x_grad, w_grad, params_grad, mode):
    moe = make_moe(16, 32, 4, 2, backend="auto")
    moe.requires_grad_(params_grad)
    top_k_index, top_k_weights = routing()
    x = torch.randn(6, 16).requires_grad_(x_grad)
    w = top_k_weights.clone().requires_grad_(w_grad)
    with use_crossovers(BY_MODE), torch.set_grad_enabled(grad):
        step = auto_step(lambda: moe.experts(x, top_k_index, w))
        assert moelab.backends.autograd.needs_autograd(moe.experts, x, w) == (mode == "backward")
    assert step["mode"] == mode and f"cpu/*/{mode}" in step["reason"]
    assert step["chosen"] == {"eager": "eager", "backward": "batched_mm"}[mode]


@pytest.mark.parametrize("training", [True, False])
def test_the_mode_follows_autograd_not_the_training_flag(training):
    moe = make_moe(16, 32, 4, 2, backend="auto").train(training)
    x = torch.randn(6, 16)
    with use_crossovers(BY_MODE):
        assert auto_step(lambda: moe(x))["mode"] == "backward"  # the layer's weights require grad
        with torch.no_grad():
            assert auto_step(lambda: moe(x))["mode"] == "eager"


def test_the_choice_cache_keeps_the_modes_apart():
    moe = make_moe(16, 32, 4, 2, backend="auto")
    x = torch.randn(6, 16)
    with use_crossovers(BY_MODE):
        for _ in range(2):  # the same S each time; only whether gradients are needed changes
            with torch.no_grad():
                assert auto_step(lambda: moe(x))["chosen"] == "eager"
            assert auto_step(lambda: moe(x))["chosen"] == "batched_mm"


def test_compiled_calls_keep_the_compiled_rules():
    assert BY_MODE.choose(8, torch.float32, "cpu", compiled=True, backward=True)[0] == "grouped_mm"
    with use_crossovers(BY_MODE):
        assert auto.choose(8, torch.float32, "cpu", compiled=True, backward=True)[0] == "grouped_mm"
        assert auto.choose(8, torch.float32, "cpu", compiled=False, backward=True)[0] == "batched_mm"
        assert auto.choose(8, torch.float32, "cpu", compiled=False)[0] == "eager"


def test_backward_keys_are_valid_and_take_every_candidate():
    for backend in AUTO_CANDIDATES:  # each has a backward (tests/test_backward.py): none is barred
        CrossoverTable({"cpu/*/backward": [[None, backend]]})
    with pytest.raises(ValueError, match="mode in"):
        CrossoverTable({"cpu/*/training": [[None, "eager"]]})


# ----------------------------------------------------------------------------------- falling back to the defaults


def test_the_defaults_have_backward_rules_for_the_cpu_and_other_devices():
    for dtype in ("float32", "bfloat16"):
        for E in (8, 64):
            key, _ = DEFAULT_CROSSOVERS.lookup("cpu", dtype, "backward", E)
            assert key == f"cpu/{dtype}/backward/E={E}"
    assert DEFAULT_CROSSOVERS.lookup("cuda", "float32", "backward")[0] == "*/*/backward"


def test_a_table_without_backward_rules_falls_back_to_the_default_backward_rules():
    table = CrossoverTable({"cpu/*/eager": [[None, "capacity"]]})  # a forward-only table, made by hand
    for pairs, E in ((2, 64), (16, 8), (4096, 8)):
        backend, reason = table.choose(pairs, torch.float32, "cpu", num_experts=E, backward=True)
        default, default_reason = DEFAULT_CROSSOVERS.choose(pairs, torch.float32, "cpu", num_experts=E,
                                                            backward=True)
        assert backend == default and reason.startswith(default_reason)
        assert "(default crossovers)" in reason and "the user table has no backward rule for cpu/float32" in reason
    assert table.choose(16, torch.float32, "cpu", num_experts=8)[0] == "capacity"  # forward: its own rule
    moe = make_moe(16, 32, 8, 2, backend="auto")
    with use_crossovers(table):
        step = auto_step(lambda: moe(torch.randn(8, 16)))
    assert step["mode"] == "backward" and "cpu/float32/backward/E=8 (default crossovers)" in step["reason"]


def test_backward_rules_for_one_dtype_leave_the_others_to_the_defaults():
    table = CrossoverTable({"cpu/float32/backward": [[None, "capacity"]], "cpu/*/eager": [[None, "eager"]]})
    assert table.choose(16, torch.float32, "cpu", num_experts=8, backward=True)[0] == "capacity"
    backend, reason = table.choose(16, torch.bfloat16, "cpu", num_experts=8, backward=True)
    assert backend == DEFAULT_CROSSOVERS.choose(16, torch.bfloat16, "cpu", num_experts=8, backward=True)[0]
    assert "no backward rule for cpu/bfloat16" in reason


def test_a_wildcard_mode_rule_covers_backward_calls():
    table = CrossoverTable({"cpu/*/*": [[None, "capacity"]]})  # "every mode": the table's own say
    backend, reason = table.choose(16, torch.float32, "cpu", num_experts=8, backward=True)
    assert backend == "capacity" and "cpu/*/*" in reason and "default" not in reason
    specific = CrossoverTable({"cpu/*/*": [[None, "capacity"]], "*/*/backward": [[None, "eager"]]})
    assert specific.choose(16, torch.float32, "cpu", num_experts=8, backward=True)[0] == "eager"  # mode first


def test_a_stored_calibration_without_backward_rules_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv("MOELAB_CACHE_DIR", str(tmp_path))
    old = {"rules": {"cpu/float32/eager": [[None, "capacity"]]}, "unit": "pairs", "source": "calibrated"}
    calibration.calibration_path().write_text(json.dumps(old))
    try:
        assert calibration.reload_crossovers().source == "calibrated"
        assert auto.choose(16, torch.float32, "cpu", compiled=False, num_experts=8)[0] == "capacity"
        backend, reason = auto.choose(16, torch.float32, "cpu", compiled=False, num_experts=8, backward=True)
        assert backend == DEFAULT_CROSSOVERS.choose(16, torch.float32, "cpu", num_experts=8, backward=True)[0]
        assert "the calibrated table has no backward rule" in reason
    finally:
        monkeypatch.delenv("MOELAB_CACHE_DIR")
        calibration.set_crossovers(None)


# --------------------------------------------------------------------------------------------------- calibration


def synthetic_sweep(with_pass=True):
    """Sweep rows (no timing): forward, grouped_mm always wins; forward + backward, eager wins up to S = 8 and
    grouped_mm after; compiled forward + backward rows (which no mode reads) favour batched_mm."""
    rows = []
    for pass_, compiled in (("forward", False), ("forward+backward", False), ("forward+backward", True)):
        for dtype in ("float32",):
            for T in (1, 4, 16, 64):
                for backend in AUTO_CANDIDATES:
                    S = 2 * T
                    if pass_ == "forward":
                        ms = 1.0 if backend == "grouped_mm" else 2.0
                    elif compiled:
                        ms = 1.0 if backend == "batched_mm" else 2.0
                    else:
                        ms = 1.0 if backend == ("eager" if S <= 8 else "grouped_mm") else 3.0
                    rows.append({"library": "moelab", "backend": backend, "status": "ok", "compiled": compiled,
                                 "pass": pass_, "device": "cpu", "dtype": dtype, "num_tokens": T, "num_experts": 4,
                                 "top_k": 2, "pairs": S, "hidden_size": 8, "intermediate_size": 8, "median_ms": ms})
    table = pd.DataFrame(rows)
    if not with_pass:
        table = table[table["pass"] == "forward"].drop(columns="pass")
    return table


def test_forward_and_backward_rows_fit_their_own_keys():
    table = crossovers_from_sweep(synthetic_sweep(), unit="pairs")
    assert table.rules["cpu/float32/eager"] == [[None, "grouped_mm"]]
    assert table.rules["cpu/float32/backward"] == [[16, "eager"], [None, "grouped_mm"]]  # sqrt(8 * 32)
    assert "cpu/float32/compiled" not in table.rules  # compiled forward + backward rows: no mode reads them
    assert table.meta["passes"] == ["forward", "forward+backward"]
    assert table.choose(8, torch.float32, "cpu", backward=True)[0] == "eager"
    assert table.choose(8, torch.float32, "cpu")[0] == "grouped_mm"
    # measured for float32 only: bfloat16 backward calls read the default backward rules
    assert "no backward rule for cpu/bfloat16" in table.choose(8, torch.bfloat16, "cpu", num_experts=4,
                                                               backward=True)[1]


def test_a_forward_only_sweep_fits_no_backward_rules():
    for sweep_rows in (synthetic_sweep()[lambda t: t["pass"] == "forward"], synthetic_sweep(with_pass=False)):
        table = crossovers_from_sweep(sweep_rows, unit="pairs_per_expert")
        assert not any(key.split("/")[2] == "backward" for key in table.rules)  # nor the defaults' copied in
        assert "the calibrated table has no backward rule" in table.choose(8, torch.float32, "cpu", num_experts=4,
                                                                            backward=True)[1]


def test_calibrate_sweeps_forward_and_backward_as_asked(monkeypatch, tmp_path):
    calls = []

    def fake_sweep(backends, *grid, backward=False, **kw):
        calls.append((grid[6], backward))  # (compiled, backward)
        rows = synthetic_sweep()
        return rows[rows["pass"] == ("forward+backward" if backward else "forward")
                    ].assign(compiled=False)
    monkeypatch.setattr(calibrate_module, "sweep", fake_sweep)
    table = calibrate_module.calibrate(compiled=(False, True), backward=(False, True), save=False, unit="pairs")
    assert calls == [((False, True), False), ((False,), True)]  # the backward sweep runs uncompiled only
    assert {"cpu/float32/eager", "cpu/float32/backward"} <= set(table.rules)
    calls.clear()
    calibrate_module.calibrate(save=False)
    assert calls == [((False,), False)]  # the default: forward only, as before
    for bad in ("yes", (), (1,)):
        with pytest.raises(ValueError, match="backward must be a bool or a non-empty tuple of bools"):
            calibrate_module.calibrate(backward=bad, save=False)


def test_the_sweep_records_the_backward_choice_of_auto():
    with use_crossovers(BY_MODE):
        rows = [sweep(["auto"], tokens=(2,), num_experts=(4,), top_k=(2,), hidden_size=(8,), intermediate_size=(8,),
                      dtypes=("float32",), backward=backward, min_run_time=0.001, min_runs=1,
                      measure_memory=False, dense_limit=False, progress=False).iloc[0] for backward in (False, True)]
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert [(r["pass"], r["chosen"]) for r in rows] == [("forward", "eager"), ("forward+backward", "batched_mm")]


# ----------------------------------------------------------------------------------------------------------- CLI

GRID = ["--tokens", "4", "--experts", "4", "--top-k", "2", "--hidden", "8", "--intermediate", "8",
        "--dtype", "float32", "--quiet", "--no-save"]


@pytest.mark.parametrize("flag, expected", [([], (False,)), (["--backward", "no"], (False,)),
                                            (["--backward", "yes"], (True,)),
                                            (["--backward", "both"], (False, True))])
def test_calibrate_cli_backward_flag(flag, expected, monkeypatch, capsys):
    from moelab import cli
    import moelab.bench.cli as bench_cli

    got = []
    monkeypatch.setattr(bench_cli, "calibrate",
                        lambda *a, **kw: got.append(kw["backward"]) or BY_MODE)
    assert cli.main(["calibrate", *GRID, *flag]) == 0
    assert got == [expected] and "cpu/*/backward" in capsys.readouterr().out


def test_calibrate_cli_refuses_an_unknown_backward_choice(capsys):
    from moelab import cli

    with pytest.raises(SystemExit):
        cli.main(["calibrate", *GRID, "--backward", "maybe"])
    assert "--backward: invalid choice: 'maybe'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------- gradients


def layer_grads(moe, x, grad_out):
    x = x.clone().requires_grad_()
    moe.zero_grad(set_to_none=True)
    (moe(x) * grad_out).sum().backward()
    return {"x": x.grad, **{name: p.grad for name, p in moe.named_parameters()}}


@pytest.mark.parametrize("backend", AUTO_CANDIDATES + ("default",))
def test_auto_under_autograd_gives_the_gradients_of_its_choice(backend):
    moe = make_moe(16, 32, 6, 2, backend="auto")
    eager = make_moe(16, 32, 6, 2, backend="eager")
    eager.load_state_dict(moe.state_dict())
    x, grad_out = torch.randn(10, 16), torch.randn(10, 16)
    table = DEFAULT_CROSSOVERS if backend == "default" else CrossoverTable({"cpu/*/backward": [[None, backend]]})
    with use_crossovers(table):
        step = auto_step(lambda: layer_grads(moe, x, grad_out))
        got = layer_grads(moe, x, grad_out)
    assert step["mode"] == "backward" and (backend == "default" or step["chosen"] == backend)
    want = layer_grads(eager, x, grad_out)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=2e-5, rtol=1e-4, msg=name)
