"""grouped_mm's CPU inference fast path (in-place reuse, workspace): the plain path's values bit for bit, no aliasing,
and an inspection that sees the fast path with copies of what it overwrites."""

import pytest
import torch

import moelab
from conftest import make_moe
from moelab.backends.cpu import lean, workspace
from moelab.backends.grouped_mm import grouped_mm_experts
from moelab.core.activations import ACTIVATIONS
from reference import ODD_SHAPES, reference_moe, routing_for

ACTS = sorted(ACTIVATIONS)  # every activation, the in-place ones (silu, relu) and the others


@pytest.fixture(params=[False, True], ids=["heap", "workspace"])
def force_workspace(request, monkeypatch):
    workspace.release_workspace()  # an earlier test may have left buffers behind
    if request.param:
        monkeypatch.setattr(workspace, "MIN_BYTES", 0)  # tiny shapes take the workspace too
    yield request.param
    workspace.release_workspace()


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("weights_float32", [False, True], ids=["weights_in_dtype", "weights_float32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(ODD_SHAPES))
def test_fast_path_equals_the_plain_path_bit_for_bit(force_workspace, case, dtype, weights_float32, act):
    T, H, I, E, k, kind = ODD_SHAPES[case]
    moe = make_moe(H, I, E, k, dtype=dtype, hidden_act=act, top_k_weights_float32=weights_float32)
    x = torch.randn(T, H).to(dtype)
    top_k_index, top_k_weights = routing_for(moe, x, kind)
    args = (moe.experts, x, top_k_index, top_k_weights)
    assert not lean.applies(*args[:2], top_k_weights)  # the parameters require grad: the plain path
    plain = grouped_mm_experts(*args).detach()
    with torch.no_grad():
        assert lean.applies(*args[:2], top_k_weights)
        fast = grouped_mm_experts(*args)
        expected = sum(lean.workspace_buffers(T * k, H, I, dtype.itemsize, 4 if weights_float32 else dtype.itemsize,
                                              act in ("silu", "swish", "relu")))
        assert workspace.workspace_bytes() == (expected if force_workspace and T * k else 0)
    assert fast.dtype == plain.dtype and torch.equal(fast, plain)


def test_results_never_alias_the_workspace(force_workspace):
    moe = make_moe(16, 32, 4, 2)
    with torch.no_grad():
        x1, x2 = torch.randn(9, 16), torch.randn(9, 16)
        first = moe(x1)
        kept = first.clone()
        moe(x2)  # reuses the same workspace buffers
    assert torch.equal(first, kept)


@pytest.mark.parametrize("act, dtype, weights_float32, copied", [
    ("silu", torch.float32, False, {"gather": {"sorted_states"}, "up_proj": {"gate_up"}, "down_proj": {"outputs"}}),
    ("gelu", torch.float32, False, {"gather": {"sorted_states"}, "down_proj": {"outputs"}}),
    # float32 router weights: the weighing makes a new float32 tensor and the unsort a new one: nothing overwritten
    ("relu", torch.bfloat16, True, {"up_proj": {"gate_up"}}),
])
def test_an_inspection_sees_the_fast_path_with_copies_of_what_it_overwrites(act, dtype, weights_float32, copied,
                                                                            monkeypatch):
    monkeypatch.setattr(workspace, "MIN_BYTES", 0)  # uninspected, these shapes would take the workspace
    workspace.release_workspace()
    moe = make_moe(16, 32, 4, 2, dtype=dtype, hidden_act=act, top_k_weights_float32=weights_float32)
    x = torch.randn(7, 16).to(dtype)
    with moelab.inspect(moe) as plain_trace:
        plain_out = moe(x)  # grad enabled, parameters require grad: the plain path
    with moelab.inspect(moe) as fast_trace, torch.no_grad():
        fast_out = moe(x)
    with torch.no_grad():
        uninspected = moe(x)
    # the uninspected call took the workspace, the inspected one did not
    assert workspace.workspace_bytes() == sum(lean.workspace_buffers(
        7 * 2, 16, 32, dtype.itemsize, 4 if weights_float32 else dtype.itemsize, act != "gelu"))
    workspace.release_workspace()
    plain_call, fast_call = plain_trace.calls[0], fast_trace.calls[0]
    assert (plain_call.code_path, fast_call.code_path) == ("plain", "cpu_lean")
    assert torch.equal(fast_out, uninspected) and torch.equal(fast_out, plain_out.detach())
    assert [s.name for s in fast_call.steps] == [s.name for s in plain_call.steps]
    for plain_step, fast_step in zip(plain_call.steps, fast_call.steps):
        if fast_step.name != "route":  # SparseMoE's step; the backend's say which path ran
            assert fast_step["code_path"] == "cpu_lean" and plain_step["code_path"] == "plain"
        assert set(fast_step.tensors) == set(plain_step.tensors) and not plain_step.copied
        assert fast_step.copied == copied.get(fast_step.name, set()), fast_step.name
        for key, tensor in fast_step.tensors.items():  # every step shows the values it had, copied or not
            assert torch.equal(tensor, plain_step.tensors[key].detach()), (fast_step.name, key)
    steps = {s.name: s for s in fast_call.steps}
    storages = [t.untyped_storage().data_ptr() for s in fast_call.steps for t in s.tensors.values()]
    for name, keys in copied.items():
        for key in keys:  # a copy owns its memory, shared with no other recorded tensor
            assert storages.count(steps[name][key].untyped_storage().data_ptr()) == 1, (name, key)
    if "outputs" in copied.get("down_proj", ()):  # the weighing wrote over outputs; the copy kept its values
        assert not torch.equal(steps["down_proj"]["outputs"], steps["weigh"]["weighted"])
    assert "^" in repr(fast_call) and "(copy)" in fast_trace._repr_html_()


def test_a_callback_on_a_copy_changes_nothing():
    moe = make_moe(16, 32, 4, 2)
    x = torch.randn(5, 16)
    with torch.no_grad():
        expected = moe(x)
        with moelab.inspect(moe, on={"up_proj": lambda step: step["gate_up"].zero_()}):
            out = moe(x)
    assert torch.equal(out, expected)


def test_workspace_release_and_switch(monkeypatch):
    workspace.release_workspace()
    monkeypatch.setattr(workspace, "MIN_BYTES", 0)
    moe = make_moe(16, 32, 4, 2)
    x = torch.randn(5, 16)
    pairs = 5 * 2
    with torch.no_grad():
        moe(x)
        # rows [S, H], gate_up [S, 2I], activated [S, I] (silu is applied in place), unsorted [S, H], float32
        assert workspace.workspace_bytes() == pairs * (16 + 2 * 32 + 32 + 16) * 4
        moelab.backends.release_workspace()
        assert workspace.workspace_bytes() == 0
        with moelab.backends.use_workspace(False):
            moe(x)
        assert workspace.workspace_bytes() == 0


def test_gradients_still_flow_under_grad_mode():
    moe = make_moe(16, 32, 4, 2)
    x = torch.randn(6, 16, requires_grad=True)
    grad_out = torch.randn(6, 16)
    (moe(x) * grad_out).sum().backward()  # the plain path: in-place reuse would have broken autograd
    reference_x = x.detach().double().requires_grad_()
    ref = reference_moe(reference_x, moe.router.weight.detach(), moe.experts.gate_up_proj.detach(),
                        moe.experts.down_proj.detach(), 2)
    (ref * grad_out.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), reference_x.grad, atol=3e-5, rtol=1e-4)
