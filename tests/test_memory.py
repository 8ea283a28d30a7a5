"""Memory: the analytic model's bytes against the traced tensors and the measured peaks."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import moelab
from moelab import memory
from moelab.backends.auto import choose
from moelab.backends.cpu import workspace

BACKENDS = list(memory.BACKENDS)
# the shape: T=256, E=8, k=2, H=256, I=512, float32
BIG = moelab.MoEConfig(hidden_size=256, intermediate_size=512, num_experts=8, top_k=2)


def measured_peak(config, num_tokens, backend, dtype=torch.float32, seed=0):
    moe = moelab.SparseMoE(config, backend, dtype=dtype, seed=seed)
    x = torch.randn(num_tokens, config.hidden_size, generator=torch.Generator().manual_seed(seed)).to(dtype)
    with torch.no_grad():
        moe(x)  # warm-up: lazy initialisations are not the call's memory
        result = memory.measure(lambda: moe(x))
    return result, moe, x


# ---------------------------------------------------------------------------------------------- formulas


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_formula_evaluates_to_its_bytes(backend, dtype):
    cfg = moelab.MoEConfig(hidden_size=48, intermediate_size=80, num_experts=6, top_k=3,
                           shared_expert_intermediate_size=32, top_k_weights_float32=True)
    estimate = memory.analytic(cfg, 20, backend, dtype)
    assert isinstance(estimate.peak_bytes, int)
    assert estimate.peak_bytes == max(s.peak_bytes for s in estimate.steps)
    symbols = dict(estimate.sizes)
    layout = {"capacity": {"C": 10},  # balanced C = ceil(T*k/E) = ceil(60 / 6)
              "block_aligned": {"M": 16, "R": 60 + 6 * 15}}.get(backend, {})
    assert symbols == {"T": 20, "k": 3, "E": 6, "H": 48, "I": 80, "b": dtype.itemsize, "Is": 32,
                       **({"w": 4} if dtype != torch.float32 else {}), **layout}
    for inter in estimate.intermediates:
        assert set(inter.formula) <= set("TkEHIbwsnCMR*+-/() 0123456789"), inter.formula
        assert eval(inter.formula, {}, {**symbols, "n": inter.n}) == inter.nbytes, inter


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_duplication_bytes_and_factor(dtype):
    T, cfg = 37, BIG
    estimate = memory.analytic(cfg, T, "batched_mm", dtype)
    itemsize = dtype.itemsize
    assert estimate.duplicated_bytes == T * 2 * 3 * 512 * 256 * itemsize
    assert estimate.weight_bytes == 8 * 3 * 512 * 256 * itemsize
    assert estimate.duplication_factor == pytest.approx(T * 2 / 8)
    gathered = [i for i in estimate.intermediates if i.step == "gather_weights"]
    assert sum(i.nbytes for i in gathered) == estimate.duplicated_bytes
    assert memory.analytic(cfg, T, "grouped_mm", dtype).duplicated_bytes == 0


def test_grouped_mm_has_no_weight_sized_intermediate():
    estimate = memory.analytic(BIG, 512, "grouped_mm")
    for inter in estimate.intermediates:  # activations only: no term is a product of I and H
        assert not ("I" in inter.formula and "H" in inter.formula), inter


def test_grouped_mm_peaks_worked_out_by_hand_are_byte_exact():
    """An `Experts` call (no router) in float32, S = T*k pairs: every named tensor lives until the backend returns,
    so the peak is their sum plus the output (the transients, argsort scratch and arange, are smaller)."""
    T, k, E, H, I = 64, 2, 8, 256, 512
    S = T * k
    index_bytes = 8 * S * 4 + 4 * E  # perm, sorted_expert_ids, token_idx, inv_perm (int64); offsets (int32)
    plain = index_bytes + 4 * (S * H + S * 2 * I + S * I + S * H + S + S * H + S * H + T * H)
    # sorted_states, gate_up, activated, outputs, pair_weights, weighted, unsorted, output
    fast = index_bytes + 4 * (S * H + S * 2 * I + S * I + S * H + S + T * H)  # weighted = outputs, unsorted over rows
    copies = 4 * (S * H + S * 2 * I + S * H)  # an inspection's copies of sorted_states, gate_up and outputs
    assert 4 * S * 2 * I < workspace.MIN_BYTES  # too small for the workspace
    assert memory.analytic(BIG, T, "grouped_mm", router=False, code_path="plain").peak_bytes == plain
    estimate = memory.analytic(BIG, T, "grouped_mm", router=False)
    assert (estimate.path, estimate.peak_bytes, estimate.copied_bytes) == ("cpu_lean", fast, 0)
    inspected = memory.analytic(BIG, T, "grouped_mm", router=False, inspected=True)
    assert (inspected.path, inspected.peak_bytes, inspected.copied_bytes) == ("cpu_lean + copies", fast + copies,
                                                                              copies)
    moe = moelab.SparseMoE(BIG, "grouped_mm", seed=0)
    x = torch.randn(T, H)
    with torch.no_grad():
        routing = moe.router(x)
        moe.experts(x, routing.top_k_index, routing.top_k_weights)  # warm-up
        measured = memory.measure(lambda: moe.experts(x, routing.top_k_index, routing.top_k_weights))
    assert measured.peak_bytes == fast and measured.retained_bytes == 4 * T * H


OPTIONS = {"silu": {}, "gelu": {"hidden_act": "gelu"}, "relu, float32 weights": {"hidden_act": "relu",
                                                                                  "top_k_weights_float32": True}}


@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_analytic_bytes_equal_the_bytes_the_trace_recorded(backend, dtype, grad, options):
    cfg = moelab.MoEConfig(hidden_size=32, intermediate_size=64, num_experts=4, top_k=2, **OPTIONS[options])
    moe = moelab.SparseMoE(cfg, backend, dtype=dtype, seed=0)
    with moelab.inspect(moe) as trace, torch.set_grad_enabled(grad):
        moe(torch.randn(10, 32).to(dtype))
    call = trace.calls[0]
    if backend == "grouped_mm":  # grad: the parameters require grad, so autograd records the call
        assert call.code_path == ("plain" if grad else "cpu_lean")
    estimate = call.memory_estimate()
    assert_recorded_as_modelled(trace, estimate)


def assert_recorded_as_modelled(trace, estimate):
    """Every modelled tensor the trace records is there, and the storage it lives in has the modelled bytes (a
    storage may hold several modelled tensors, eager's torch.where columns, or more than the recorded view, capacity's
    buffer with its spare row); the per-step table then agrees to the byte."""
    steps = trace.calls[0].steps
    assert [s.step for s in estimate.steps] == [s.name for s in steps]  # the model walks the same steps
    per_storage, storages = {}, {}
    for inter in estimate.intermediates:
        if inter.recorded_in is None:
            continue
        index = inter.step_index if inter.recorded_in == inter.step else \
            next(s.index for s in steps if s.name == inter.recorded_in and s.index > inter.step_index)
        key = inter.recorded_as or inter.name
        tensor = steps[index].tensors[key]
        storage = tensor.untyped_storage()
        per_storage[storage.data_ptr()] = per_storage.get(storage.data_ptr(), 0) + inter.nbytes
        storages[storage.data_ptr()] = (storage.nbytes(), inter.step, inter.name)
        assert tensor.nbytes <= inter.nbytes or len([i for i in estimate.intermediates
                                                     if (i.recorded_as or i.name) == key]) == 1, (inter.name, key)
        assert (key in steps[index].copied) == inter.copy, (inter.step, inter.name)
    for ptr, total in per_storage.items():
        assert storages[ptr][0] == total, storages[ptr]
    table = trace.memory
    assert table.recorded_bytes.tolist() == table.analytic_bytes.tolist()
    assert estimate.copied_bytes == sum(s.tensors[key].nbytes for s in steps for key in s.copied)


def test_gathered_weights_analytic_bytes_equal_the_traced_tensors():
    T = 24
    moe = moelab.SparseMoE(BIG, "batched_mm", seed=0)
    with moelab.inspect(moe) as trace, torch.no_grad():
        moe(torch.randn(T, 256))
    step = trace["gather_weights"]
    analytic = memory.analytic(BIG, T, "batched_mm")
    assert analytic.step_bytes("gather_weights") == step["gate_up_weights"].nbytes + step["down_weights"].nbytes
    assert analytic.step_bytes("gather_weights") == T * 2 * 3 * 512 * 256 * 4


def test_analytic_validates_its_arguments():
    with pytest.raises(ValueError, match=r"no memory model for experts backend 'mine'.*'eager'"):
        memory.analytic(BIG, 4, "mine")
    with pytest.raises(ValueError, match="num_tokens"):
        memory.analytic(BIG, -1, "eager")
    with pytest.raises(ValueError, match=r"tokens_per_expert must be 8 counts"):
        memory.analytic(BIG, 4, "eager", tokens_per_expert=[1] * 7 + [0])  # sums to 7, not T*k = 8
    with pytest.raises(ValueError, match="config must be a moelab.MoEConfig"):
        memory.analytic(object(), 4, "eager")
    with pytest.raises(ValueError, match=r"dtype must be a floating torch.dtype or one of .*got .float33."):
        memory.analytic(BIG, 4, "eager", "float33")
    assert memory.analytic(BIG, 4, "eager", "bfloat16").dtype == torch.bfloat16
    auto = memory.analytic(BIG, 4, "auto")  # modelled as the backend `auto` picks for T*k pairs
    assert auto.requested_backend == "auto"
    assert auto.backend == choose(8, torch.float32, "cpu", compiled=False, num_experts=BIG.num_experts)[0]
    assert memory.peak_bytes(BIG, 64, "grouped_mm") == memory.analytic(BIG, 64, "grouped_mm").peak_bytes
    assert type(memory.peak_bytes(BIG, 64, "grouped_mm")) is int
    assert memory.analytic(BIG, 0, "grouped_mm").peak_bytes == 2 * 8 * 8 + 8 * 4  # only the E-sized offsets


def test_estimate_tables_and_display():
    estimate = memory.analytic(BIG, 32, "eager", tokens_per_expert=[8, 0, 8, 8, 8, 8, 8, 16])
    steps = estimate.to_frame("step")
    assert steps.step.tolist() == ["route", "expert_mask"] + ["expert"] * 7 + ["reduce"]
    assert estimate.to_frame("tensor").nbytes.sum() == sum(i.nbytes for i in estimate.intermediates)
    assert "analytic peak" in repr(estimate) and "expert_id=7, n=16" in str(estimate)
    assert "<table" in estimate._repr_html_()
    assert memory.format_bytes(1536) == "1.5 KiB" and memory.format_bytes(12) == "12 B"


# ---------------------------------------------------------------------------------------------- measured


def test_measure_counts_only_the_extra_memory():
    before = torch.ones(8 * 2 ** 20)  # allocated before: not counted

    def work():
        tmp = torch.ones(16 * 2 ** 20)  # 64 MiB, freed inside
        keep = torch.zeros(2 ** 20)  # 4 MiB, returned
        del tmp
        return keep

    result = memory.measure(work)
    assert result.peak_bytes == 68 * 2 ** 20
    assert result.retained_bytes == 4 * 2 ** 20 and result.result.nbytes == 4 * 2 ** 20
    assert result.device == "cpu" and result.timeline[-1][1] == result.retained_bytes
    assert memory.measure(lambda: before.mul_(2)).peak_bytes < 64  # in place: at most a wrapped scalar
    with pytest.raises(ValueError, match="cpu"):
        memory.measure(lambda: None, device="meta")


def test_measure_does_not_count_a_free_of_an_earlier_calls_tensor():
    """A tensor made under an earlier profiled call and held only by a reference cycle is freed before the call,
    not by the cyclic collector inside it: there its free is a negative event (once in CI it lowered eager's
    measured peak by 64 KiB)."""

    class Holder:
        pass

    holder = Holder()
    holder.cycle = holder
    memory.measure(lambda: setattr(holder, "tensor", torch.ones(2 ** 16)))  # 256 KiB the profiler knows the size of
    alive = weakref.ref(holder.tensor)
    del holder  # now only the cycle keeps it
    collector_on = []

    def work():
        collector_on.append(gc.isenabled())
        gc.collect()  # what an automatic collection would do here
        return torch.ones(2 ** 10)

    result = memory.measure(work)
    assert alive() is None and collector_on == [False] and gc.isenabled()
    assert result.peak_bytes == result.retained_bytes == 4 * 2 ** 10


# batched_mm only at T=256: its 400 MiB of weight copies at T=128 would add time, not coverage
@pytest.mark.parametrize("backend, tokens", [("eager", 128), ("eager", 256), ("batched_mm", 256),
                                             ("grouped_mm", 128), ("grouped_mm", 256), ("capacity", 128),
                                             ("capacity", 256), ("block_aligned", 128), ("block_aligned", 256)])
def test_float32_analytic_peaks_equal_the_measured_ones_to_the_byte(backend, tokens):
    """The claim of `moelab.memory.formulas`: in float32, with the real routing, the model is torch.profiler's
    peak to the byte at T=128 and 256 with E=8, k=2, H=256, I=512."""
    measured, moe, x = measured_peak(BIG, tokens, backend)
    with torch.no_grad():
        counts = torch.bincount(moe.router(x).top_k_index.flatten(), minlength=8)
    routed = backend in ("eager", "capacity")  # their peaks follow the real groups (the busiest; C = the largest)
    analytic = memory.analytic(BIG, tokens, backend, tokens_per_expert=counts if routed else None)
    assert analytic.workspace_bytes == 0 and analytic.extra_peak_bytes == analytic.peak_bytes  # no workspace here
    assert measured.peak_bytes == analytic.peak_bytes, (measured, analytic)
    assert measured.retained_bytes == analytic.retained_bytes == tokens * 256 * 4


def test_grouped_mm_paths_are_modelled():
    """Each path to the byte: plain, the fast path with the workspace (a warmed-up call pays only what is outside
    it), without it, and inspected (no workspace, plus the recorder's copies)."""
    T, S, H, I = 512, 1024, 256, 512
    plain = memory.analytic(BIG, T, "grouped_mm", code_path="plain")
    fast = memory.analytic(BIG, T, "grouped_mm")
    inspected = memory.analytic(BIG, T, "grouped_mm", inspected=True)
    assert (plain.path, fast.path, inspected.path) == ("plain", "cpu_lean + workspace", "cpu_lean + copies")
    assert memory.analytic(BIG, T, "grouped_mm", device="cuda").path == "plain"
    with pytest.raises(ValueError, match="only on CPU"):
        memory.analytic(BIG, T, "grouped_mm", device="cuda", code_path="cpu_lean")
    assert fast.workspace_bytes == S * (H + 2 * I + I + H) * 4  # rows, gate_up, activated, unsorted buffers
    assert inspected.workspace_bytes == 0 and inspected.copied_bytes == S * (H + 2 * I + H) * 4
    assert fast.extra_peak_bytes < fast.peak_bytes < plain.peak_bytes
    measured, _, _ = measured_peak(BIG, T, "grouped_mm")  # warmed up: the workspace exists before the call
    assert measured.peak_bytes == fast.extra_peak_bytes
    with workspace.use_workspace(False):
        no_workspace = memory.analytic(BIG, T, "grouped_mm")
        measured, _, _ = measured_peak(BIG, T, "grouped_mm")
    assert no_workspace.path == "cpu_lean" and no_workspace.workspace_bytes == 0
    assert measured.peak_bytes == no_workspace.peak_bytes


@pytest.mark.parametrize("use_workspace", [False, True], ids=["heap", "workspace"])
def test_float32_router_weights_in_bfloat16_are_modelled_to_the_byte(use_workspace, monkeypatch):
    """bfloat16 with float32 router weights: the fast path weighs, unsorts and sums in float32 (`w` = 4)."""
    if use_workspace:
        monkeypatch.setattr(workspace, "MIN_BYTES", 0)
    workspace.release_workspace()
    cfg = moelab.MoEConfig(hidden_size=256, intermediate_size=512, num_experts=8, top_k=2, top_k_weights_float32=True)
    measured, _, _ = measured_peak(cfg, 128, "grouped_mm", torch.bfloat16)
    analytic = memory.analytic(cfg, 128, "grouped_mm", torch.bfloat16)
    workspace.release_workspace()
    assert analytic.path == "cpu_lean" + (" + workspace" if use_workspace else "") and analytic.sizes["w"] == 4
    if use_workspace:  # rows, gate_up, activated in bfloat16; weighted, unsorted in float32
        assert analytic.workspace_bytes == 256 * (256 * 2 + 1024 * 2 + 512 * 2 + 256 * 4 + 256 * 4)
    assert measured.peak_bytes == analytic.extra_peak_bytes


def test_batched_mm_memory_grows_with_tokens_grouped_mm_stays_with_activations():
    peaks = {}
    for backend in ("batched_mm", "grouped_mm"):
        for tokens in (128, 512):
            peaks[backend, tokens] = measured_peak(BIG, tokens, backend)[0].peak_bytes
    ratio = peaks["batched_mm", 512] / peaks["batched_mm", 128]
    assert ratio == pytest.approx(4.0, rel=0.05)
    assert peaks["batched_mm", 512] > 2 ** 30  # 1.5 GiB of duplicated weights at T=512
    weight_bytes = memory.analytic(BIG, 512, "grouped_mm").weight_bytes
    for tokens in (128, 512):
        assert peaks["batched_mm", tokens] == memory.analytic(BIG, tokens, "batched_mm").peak_bytes
        estimate = memory.analytic(BIG, tokens, "grouped_mm")  # activations only (workspace included)
        assert peaks["grouped_mm", tokens] == estimate.extra_peak_bytes  # warmed up: the workspace exists
        assert peaks["grouped_mm", tokens] < peaks["batched_mm", tokens] / 50
    assert peaks["grouped_mm", 128] < weight_bytes  # less than one copy of the experts' weights


def test_compare_table():
    cfg = moelab.MoEConfig(hidden_size=64, intermediate_size=96, num_experts=4, top_k=2)
    table = memory.compare(cfg, 32)
    assert table.backend.tolist() == BACKENDS
    assert (table.measured_peak_bytes == table.analytic_extra_peak_bytes).all(), table  # float32: to the byte


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_measure_on_cuda():
    result = memory.measure(lambda: torch.empty(2 ** 20, device="cuda"), device="cuda")
    assert result.peak_bytes >= 4 * 2 ** 20 and result.method == "torch.cuda.max_memory_allocated"
