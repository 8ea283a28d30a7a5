"""The memory guard of direct calls (issue 16 item 4): each backend's registered estimate against the exact memory
model, a call over the budget refused before it allocates with a MemoryGuardError that says what fits, the budget
as the least of the available memory, the cgroup's and ulimit -v's headroom, and the off switch."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import moelab
import moelab.backends.capacity as capacity_module
from moelab import memory
from moelab.bench.guard import worst_case_counts
from moelab.core import machine, memory_guard
from moelab.core.memory_guard import MemoryGuardError

from conftest import make_moe

GUARDED = memory.MODELLED_BACKENDS  # every built-in backend registers an estimate


def _routing(T, E, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.empty(0, k).long()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T,E,k,H,I", [(1, 8, 2, 32, 16), (64, 8, 2, 64, 32), (256, 64, 8, 128, 64)])
@pytest.mark.parametrize("backend", GUARDED)
def test_each_estimate_is_close_to_the_memory_model(backend, T, E, k, H, I, dtype, monkeypatch):
    # the guard's estimate sits in the backend's file; moelab.memory.analytic is the independent, exact model of
    # the same code (liveness step by step): the estimate must not undercount it, nor overcount by much
    monkeypatch.setattr(capacity_module, "MIN_CHECKED_BYTES", 0)  # capacity: count C from the data, always
    cfg = moelab.MoEConfig(num_experts=E, top_k=k, hidden_size=H, intermediate_size=I)
    experts = moelab.SparseMoE(cfg, dtype=dtype).experts
    x, index = torch.randn(T, H, dtype=dtype), _routing(T, E, k)
    counts = torch.bincount(index.reshape(-1), minlength=E).tolist()
    kw = {"eager": dict(tokens_per_expert=worst_case_counts(T, k, E)), "capacity": dict(tokens_per_expert=counts),
          "grouped_mm": dict(code_path="plain")}.get(backend, {})
    exact = memory.analytic(cfg, T, backend, dtype, router=False, **kw).peak_bytes
    estimate = moelab.ExpertsInterface.memory_estimate(backend)(experts, x, index, None, False)
    assert 0.95 * exact <= estimate <= 1.4 * exact, (estimate, exact)
    # a call that needs gradients keeps intermediates for backward and makes weight gradients: more, never less
    # (how much more against the measured step: tests/test_memory_backward.py)
    backward = moelab.ExpertsInterface.memory_estimate(backend)(experts, x, index, None, True)
    assert backward > estimate and backward > experts.gate_up_proj.nbytes + experts.down_proj.nbytes


def test_a_layer_call_over_the_machine_is_refused_before_it_allocates():
    # the case: batched_mm at T = 200,000 tried 52 GB; here S = 1.6M pairs of 3*64*64 float32 weights, ~80 GB
    # estimated, more than any CI machine has: refused before a byte of it is allocated, naming what would fit
    moe = make_moe(64, 64, 8, 8, backend="batched_mm")
    x = torch.randn(200_000, 64)
    with torch.no_grad(), pytest.raises(MemoryGuardError) as info:
        moe(x)
    err = info.value
    assert isinstance(err, MemoryError) and err.backend == "batched_mm"
    assert err.needed_bytes > err.budget_bytes and err.num_tokens == 200_000
    S, b = 200_000 * 8, 4
    assert err.needed_bytes >= S * 3 * 64 * 64 * b  # at least the gathered weights
    assert "grouped_mm" in err.fits and err.fits["grouped_mm"] <= err.budget_bytes
    assert 1 <= err.max_tokens < 200_000
    message = str(err)
    for part in ("'batched_mm'", "T = 200000", "use ", "grouped_mm", f"T <= {err.max_tokens}",
                 "MOELAB_MEMORY_GUARD=0"):
        assert part in message


@pytest.fixture
def small_budget(monkeypatch):
    """A 64 MiB process: the guard reads its budget through this name."""
    monkeypatch.setattr(memory_guard, "available_memory", lambda device="cpu": 64 * 2 ** 20)
    monkeypatch.delenv(memory_guard.GUARD_ENV, raising=False)


def _big_call(backend="batched_mm", T=512):
    # batched_mm: S = 1024 pairs of 3*64*128 float32 weights, ~100 MiB of copies: over 64 MiB, fine for the machine
    moe = make_moe(128, 64, 8, 2, backend=backend)
    return moe, torch.randn(T, 128)


def test_the_off_switches_let_the_call_run(small_budget, monkeypatch):
    moe, x = _big_call()
    with torch.no_grad():
        with pytest.raises(MemoryGuardError, match="batched_mm"):
            moe(x)
        with moelab.memory_guard(False):
            out = moe(x)
            torch.testing.assert_close(out, moe.to(torch.float64)(x.double()).float(), atol=1e-5, rtol=1e-5)
            moe.float()
        with pytest.raises(MemoryGuardError):  # the context manager restored the guard
            moe(x)
        monkeypatch.setenv(memory_guard.GUARD_ENV, "0")
        moe(x)
        monkeypatch.setenv(memory_guard.GUARD_ENV, "1")
        moelab.set_memory_guard(False)
        try:
            moe(x)
        finally:
            moelab.set_memory_guard(None)
        with pytest.raises(MemoryGuardError):
            moe(x)
    with pytest.raises(ValueError, match="enabled must be"):
        moelab.set_memory_guard("off")


def test_auto_is_guarded_for_its_choice(small_budget):
    moe, x = _big_call("auto")
    table = moelab.backends.CrossoverTable({"*/*/*": [[None, "batched_mm"]]})
    with moelab.backends.use_crossovers(table), torch.no_grad(), pytest.raises(MemoryGuardError, match="batched_mm"):
        moe(x)


def test_a_call_that_needs_gradients_is_sized_for_backward(monkeypatch):
    # grouped_mm forward only fits in 64 MiB; with gradients (saved activations + weight grads) it does not
    moe, x = _big_call("grouped_mm", T=2048)
    estimate = moelab.ExpertsInterface.memory_estimate("grouped_mm")
    index = _routing(2048, 8, 2)
    forward, backward = (estimate(moe.experts, x, index, None, flag) for flag in (False, True))
    budget = (forward + backward) // 2
    monkeypatch.setattr(memory_guard, "MIN_CHECKED_BYTES", 0)
    monkeypatch.setattr(memory_guard, "available_memory", lambda device="cpu": budget)
    with torch.no_grad():
        moe(x)
    with pytest.raises(MemoryGuardError, match="forward \\+ backward") as info:
        moe(x)
    assert info.value.backward and info.value.needed_bytes == backward


def test_small_calls_never_read_the_budget(monkeypatch):
    # a decode step must not pay for /proc reads: below MIN_CHECKED_BYTES the budget is never asked for
    def boom(device="cpu"):
        raise AssertionError("the budget was read for a small call")
    monkeypatch.setattr(memory_guard, "available_memory", boom)
    moe = make_moe(32, 16, 8, 2, backend="batched_mm")
    moe(torch.randn(4, 32))


def test_a_user_backend_registers_its_own_estimate(small_budget):
    def mine(experts, hidden_states, top_k_index, top_k_weights):
        return moelab.ExpertsInterface.get("grouped_mm")(experts, hidden_states, top_k_index, top_k_weights)

    def mine_memory(experts, hidden_states, top_k_index, dropped, backward):
        return 10 ** 12  # a terabyte: never fits
    moelab.ExpertsInterface.register("mine_guarded", mine, memory_estimate=mine_memory)
    try:
        moe, x = _big_call("mine_guarded", T=4)
        with pytest.raises(MemoryGuardError, match="'mine_guarded'"):
            moe(x)
        moelab.ExpertsInterface.register("mine_guarded", mine, overwrite=True)  # no estimate: not guarded
        assert moelab.ExpertsInterface.memory_estimate("mine_guarded") is None
        moe(x)
    finally:
        moelab.ExpertsInterface.unregister("mine_guarded")
    with pytest.raises(TypeError, match="memory_estimate must be None or callable"):
        moelab.ExpertsInterface.register("bad", mine, memory_estimate=3)


def test_compare_skips_what_would_not_fit(small_budget):
    cfg = moelab.MoEConfig(num_experts=8, top_k=2, hidden_size=128, intermediate_size=64)
    table = moelab.bench.compare_backends(cfg, num_tokens=512, backends=["eager", "batched_mm", "grouped_mm"],
                                          min_run_time=0.01, min_runs=1)
    rows = table.set_index("backend")
    assert rows.loc["batched_mm", "skipped"].startswith("experts backend 'batched_mm' would need")
    assert rows.loc["batched_mm", "runs"] == 0 and rows["median_ms"].isna()["batched_mm"]
    assert rows.loc["grouped_mm", "skipped"] == "" and rows.loc["grouped_mm", "runs"] >= 1


def test_cgroup_headroom_reads_v2_and_v1(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("0::/job\n")
    group = tmp_path / "fs" / "job"
    group.mkdir(parents=True)
    (group / "memory.max").write_text("1073741824\n")
    (group / "memory.current").write_text("268435456\n")
    assert machine.cgroup_headroom(str(proc), str(tmp_path / "fs")) == 1073741824 - 268435456
    (group / "memory.max").write_text("max\n")  # v2 without a limit, and no v1 files
    assert machine.cgroup_headroom(str(proc), str(tmp_path / "fs")) is None
    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(str(2 ** 31))
    (v1 / "memory.usage_in_bytes").write_text(str(2 ** 30))
    assert machine.cgroup_headroom(str(tmp_path / "none"), str(tmp_path / "v1")) == 2 ** 30
    (v1 / "memory.limit_in_bytes").write_text(str(2 ** 63 - 4096))  # v1's "no limit"
    assert machine.cgroup_headroom(str(tmp_path / "none"), str(tmp_path / "v1")) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc/self/status are Linux's")
def test_ulimit_v_is_part_of_the_budget():
    # under `ulimit -v` a big tensor fails however much memory is free: the budget is the address space left,
    # so a call that would fit MemAvailable but not the limit gets the guard's error, not torch's
    script = textwrap.dedent("""
        import resource, torch, moelab
        from moelab.core import machine
        from conftest import make_moe
        vm = int(next(l for l in open('/proc/self/status') if l.startswith('VmSize:')).split()[1]) * 1024
        limit = vm + 1024 ** 3
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
        headroom = machine.address_space_headroom()
        assert 0 < headroom <= 1024 ** 3 and machine.available_memory() <= 1024 ** 3 + 2 ** 26, headroom
        moe = make_moe(128, 128, 8, 2, backend="batched_mm")
        try:
            with torch.no_grad():
                moe(torch.randn(4096, 128))  # ~1.6 GiB of weight copies
        except moelab.MemoryGuardError as err:
            print("guarded", err.budget_bytes <= 1024 ** 3 + 2 ** 26)
    """)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(__file__) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop(memory_guard.GUARD_ENV, None)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "guarded True"
