"""Training memory (issue 13): what each backend's autograd graph keeps for backward, the model against what
autograd really kept (`measure_saved`, the reference), a training step's peak against `measure`, the trace's
saved bytes and the guard's backward estimate against the measured step."""

from __future__ import annotations

import pytest
import torch

import moelab
import moelab.backends.capacity as capacity_module
from moelab import memory

BACKENDS = list(memory.MODELLED_BACKENDS)
DTYPES = [torch.float32, torch.bfloat16]
# (T, E, k, H, I): few experts, and many experts with k = 8 (eager's loop, capacity's padding)
SHAPES = [(64, 8, 2, 32, 48), (64, 64, 8, 32, 48)]


def _routing(T, E, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])


def _config(E, k, H, I):
    return moelab.MoEConfig(num_experts=E, top_k=k, hidden_size=H, intermediate_size=I)


def _counts(index, E):
    return torch.bincount(index.reshape(-1), minlength=E)


# ---------------------------------------------------------------------------------------------- measure_saved


def test_measure_saved_counts_each_new_storage_once_and_no_input():
    a = torch.randn(1000, requires_grad=True)
    weight = torch.nn.Linear(1000, 4)

    def fn():
        e = a.exp()  # exp keeps its result e: [1000], new
        # e[:10] is a view of e (not counted again); the linear keeps its input (the repeat, new) and its weight (the
        # module's); the product keeps both factors, the [1, 4] output and the scalar sum
        return weight(e[:10].reshape(1, 10).repeat(1, 100)) * e.sum()

    measured = memory.measure_saved(fn, a, weight)
    assert sorted(n for *_, n in measured.tensors) == [4, 16, 4000, 4000]
    assert measured.saved_bytes == 8020 and measured.result.shape == (1, 4)
    assert memory.measure_saved(lambda: a * 2, a).saved_bytes == 0  # a Python scalar factor: nothing kept
    assert memory.measure_saved(lambda: a.sin(), a).saved_bytes == 0  # sin keeps its input: `a` exists
    with torch.no_grad():
        assert memory.measure_saved(lambda: a.exp(), a).saved_bytes == 0  # no graph, nothing kept


# ---------------------------------------------------------------------------------------------- saved tensors


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-E{}-k{}-H{}-I{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_for_backward_is_what_autograd_keeps_to_the_byte(backend, dtype, shape):
    """An `Experts` call with each input needing a gradient or not, and a `SparseMoE` call (router included):
    the model's bytes are the distinct storages autograd saved, to the byte; tensor by tensor where the backend
    makes one storage per entry (eager makes one per expert: its entries are sums over the experts)."""
    T, E, k, H, I = shape
    cfg = _config(E, k, H, I)
    moe = moelab.SparseMoE(cfg, backend, dtype=dtype)
    index = _routing(T, E, k)
    for hidden_grad, weights_grad in [(True, True), (False, True), (True, False)]:
        x = torch.randn(T, H, dtype=dtype, requires_grad=hidden_grad)
        weights = torch.rand(T, k, dtype=dtype, requires_grad=weights_grad)
        measured = memory.measure_saved(lambda: moe.experts(x, index, weights), moe, x, index, weights)
        model = memory.saved_for_backward(cfg, T, backend, dtype, tokens_per_expert=_counts(index, E),
                                          router=False, hidden_grad=hidden_grad, weights_grad=weights_grad)
        assert measured.saved_bytes == model.saved_bytes, (hidden_grad, weights_grad, measured.tensors)
        assert model.saved_bytes == sum(s.nbytes for s in model.tensors if not s.existing)  # the breakdown sums
        if backend != "eager":
            assert sorted(n for *_, n in measured.tensors) == sorted(s.nbytes for s in model.tensors
                                                                       if not s.existing)
    x = torch.randn(T, H, dtype=dtype)
    measured = memory.measure_saved(lambda: moe(x), moe, x)
    with torch.no_grad():
        counts = _counts(moe.router(x).top_k_index, E)
    model = memory.saved_for_backward(cfg, T, backend, dtype, tokens_per_expert=counts)
    assert measured.saved_bytes == model.saved_bytes


def test_saved_for_backward_tables_and_limits():
    cfg = _config(8, 2, 32, 48)
    model = memory.saved_for_backward(cfg, 64, "grouped_mm")
    frame = model.to_frame()
    assert frame.nbytes[~frame.existing].sum() == model.saved_bytes
    assert frame.nbytes[frame.existing].sum() == model.existing_bytes == 8 * 3 * 48 * 32 * 4  # the expert weights
    assert "autograd keeps" in str(model) and "sorted_states" in str(model)
    with pytest.raises(ValueError, match="no backward model"):
        memory.saved_for_backward(cfg, 64, "dense")
    with pytest.raises(ValueError, match="shared expert"):
        memory.saved_for_backward(moelab.MoEConfig(num_experts=8, top_k=2, hidden_size=32, intermediate_size=48,
                                                   shared_expert_intermediate_size=16), 64, "eager")


# ---------------------------------------------------------------------------------------------- a training step


def _step_peak(moe, x):
    moe(x).sum().backward()  # warm-up: lazy initialisations are not the step's memory
    moe.zero_grad(set_to_none=True)  # the step makes the weights' gradients, as a first step does
    peak = memory.measure(lambda: moe(x).sum().backward()).peak_bytes
    moe.zero_grad(set_to_none=True)
    return peak


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-E{}-k{}-H{}-I{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_training_peak_is_close_to_the_measured_step(backend, dtype, shape):
    """`training_peak` is a stage model (the forward's peak plus what autograd keeps; the backward at its down
    and up projections, the weights' gradients, eager's and capacity's second copy of them), not a byte walk:
    within 10% of torch.profiler's peak of `layer(x).sum().backward()`."""
    T, E, k, H, I = shape
    cfg = _config(E, k, H, I)
    moe = moelab.SparseMoE(cfg, backend, dtype=dtype)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(0)).to(dtype)
    measured = _step_peak(moe, x)
    with torch.no_grad():
        counts = _counts(moe.router(x).top_k_index, E)
    model = memory.training_peak(cfg, T, backend, dtype, tokens_per_expert=counts)
    assert 0.9 <= measured / model.peak <= 1.1, (measured, model)
    # batched_mm's step peaks in its forward (the gathered weights); the others' in backward
    assert model.phase == ("forward" if backend == "batched_mm" else "backward")


def test_compare_training_table():
    table = memory.compare_training(_config(4, 2, 16, 24), 16, backends=["grouped_mm", "batched_mm"])
    assert table.backend.tolist() == ["grouped_mm", "batched_mm"]
    assert (table.analytic_saved_bytes == table.measured_saved_bytes).all(), table
    assert table.step_measured_over_analytic.between(0.9, 1.1).all(), table


# ---------------------------------------------------------------------------------------------- the trace


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_trace_shows_what_a_call_with_gradients_keeps(backend):
    cfg = _config(8, 2, 32, 48)
    moe = moelab.SparseMoE(cfg, backend)
    x = torch.randn(64, 32)
    with moelab.inspect(moe) as trace:
        moe(x)
    kept = trace.calls[0].saved_for_backward()
    assert kept.saved_bytes == memory.measure_saved(lambda: moe(x), moe, x).saved_bytes  # an uninspected call
    assert trace.memory.attrs["saved_for_backward_bytes"] == {0: kept.saved_bytes}
    index, weights = _routing(64, 8, 2), torch.rand(64, 2)  # an Experts call: only the input needs a gradient
    x.requires_grad_(True)
    with moelab.inspect(moe.experts) as direct:
        moe.experts(x, index, weights)
    measured = memory.measure_saved(lambda: moe.experts(x, index, weights), moe, x, index, weights)
    assert direct.calls[0].saved_for_backward().saved_bytes == measured.saved_bytes
    with torch.no_grad(), moelab.inspect(moe) as inference:  # no graph: nothing kept, nothing shown
        moe(x)
    assert inference.calls[0].saved_for_backward() is None
    assert inference.memory.attrs["saved_for_backward_bytes"] == {}


# ---------------------------------------------------------------------------------------------- the guard


# the input with and without a gradient at one shape; many experts, and more tokens and wider layers, with it
@pytest.mark.parametrize("shape, hidden_grad", [(SHAPES[0], False), (SHAPES[0], True), (SHAPES[1], True),
                                                ((256, 8, 2, 64, 128), True)],
                         ids=["T64-E8-x", "T64-E8-x-grad", "T64-E64-k8-x-grad", "T256-H64-I128-x-grad"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_guards_backward_estimate_covers_the_measured_step(backend, shape, hidden_grad, monkeypatch):
    """The estimate `Experts` checks for a call that needs gradients (its backend's `<name>_saved` list and the
    stage model, rounded up) never undercounts the measured forward + backward, and overcounts by at most 2.5x
    (its forward part bounds eager's busiest expert by T rows and counts each backend's big intermediates)."""
    monkeypatch.setattr(capacity_module, "MIN_CHECKED_BYTES", 0)  # capacity: count C from the data, always
    T, E, k, H, I = shape
    experts = moelab.SparseMoE(_config(E, k, H, I), backend).experts
    x = torch.randn(T, H, requires_grad=hidden_grad)
    index, weights = _routing(T, E, k), torch.rand(T, k, requires_grad=True)
    experts(x, index, weights).sum().backward()  # warm-up
    experts.zero_grad(set_to_none=True)
    measured = memory.measure(lambda: experts(x, index, weights).sum().backward()).peak_bytes
    estimate = moelab.ExpertsInterface.memory_estimate(backend)(experts, x, index, None, True)
    assert 1.0 <= estimate / measured <= 2.5, (estimate, measured)
