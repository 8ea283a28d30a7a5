"""grouped_mm's lean CPU inference path (in-place reuse, workspace): same values as the plain path, no aliasing."""

import pytest
import torch

import moelab
from conftest import make_moe
from moelab.backends.cpu import workspace
from moelab.backends.grouped_mm import grouped_mm_experts, lean_path
from moelab.core.steps import add_recorder, remove_recorder

TOL = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}


@pytest.fixture(params=[False, True], ids=["heap", "workspace"])
def force_workspace(request, monkeypatch):
    workspace.release_workspace()  # an earlier test may have left buffers behind
    if request.param:
        monkeypatch.setattr(workspace, "MIN_BYTES", 0)  # tiny shapes take the workspace too
    yield request.param
    workspace.release_workspace()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("act", ["silu", "gelu", "relu"])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_lean_path_matches_the_plain_path(force_workspace, dtype, act, top_k):
    moe = make_moe(32, 48, 6, top_k, dtype=dtype, hidden_act=act)
    x = torch.randn(13, 32).to(dtype)
    routing = moe.router(x)
    args = (moe.experts, x, routing.top_k_index.detach(), routing.top_k_weights.detach())
    plain = grouped_mm_experts(*args)  # parameters require grad: the plain path
    assert not lean_path(moe.experts, x, args[3]) or not torch.is_grad_enabled()
    with torch.no_grad():
        assert lean_path(moe.experts, x, args[3])
        lean = grouped_mm_experts(*args)
        assert (workspace.workspace_bytes() > 0) == force_workspace
    torch.testing.assert_close(lean, plain.detach(), **TOL[dtype])


def test_results_never_alias_the_workspace(force_workspace):
    moe = make_moe(16, 32, 4, 2)
    with torch.no_grad():
        x1, x2 = torch.randn(9, 16), torch.randn(9, 16)
        first = moe(x1)
        kept = first.clone()
        moe(x2)  # reuses the same workspace buffers
    assert torch.equal(first, kept)


def test_an_inspection_sees_the_plain_path_and_distinct_tensors():
    moe = make_moe(16, 32, 4, 2)
    steps = {}

    def recorder(name, explanation, tensors, derived):
        steps[name] = tensors
    add_recorder(recorder)
    try:
        with torch.no_grad():
            assert not lean_path(moe.experts, torch.randn(3, 16), torch.ones(3, 2))
            moe(torch.randn(7, 16))
    finally:
        remove_recorder(recorder)
    assert steps["weigh"]["weighted"] is not steps["down_proj"]["outputs"]
    assert steps["unsort"]["unsorted"].data_ptr() != steps["gather"]["sorted_states"].data_ptr()


def test_workspace_release_and_switch(monkeypatch):
    workspace.release_workspace()
    monkeypatch.setattr(workspace, "MIN_BYTES", 0)
    moe = make_moe(16, 32, 4, 2)
    x = torch.randn(5, 16)
    with torch.no_grad():
        moe(x)
        assert workspace.workspace_bytes() > 0
        moelab.backends.release_workspace()
        assert workspace.workspace_bytes() == 0
        with moelab.backends.use_workspace(False):
            moe(x)
        assert workspace.workspace_bytes() == 0


def test_gradients_still_flow_under_grad_mode():
    moe = make_moe(16, 32, 4, 2)
    x = torch.randn(6, 16, requires_grad=True)
    moe(x).sum().backward()  # the plain path: in-place reuse would have broken autograd
    assert x.grad is not None and torch.isfinite(x.grad).all()
