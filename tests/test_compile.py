"""torch.compile(fullgraph=True): capture works for batched_mm and grouped_mm, and fails for eager as documented."""

import pytest
import torch

from conftest import make_moe
from reference import reference_experts, reference_moe, reference_router

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["batched_mm", "grouped_mm"])
def test_fullgraph_capture(backend, dtype):
    moe = make_moe(32, 64, 8, 2, backend=backend, dtype=dtype)
    x = torch.randn(10, 32).to(dtype)
    compiled = torch.compile(moe, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), moe(x), **TOL[dtype])


@pytest.mark.parametrize("H, I", [(6, 5), (16, 32)], ids=["unaligned", "aligned"])
def test_compiled_backward_of_the_fallback_op_matches_float64_gradients(H, I):
    # float32 compiled grouped_mm takes the custom-op fallback (the native kernel compiles only for bfloat16): its
    # registered backward (grad of the input by the same op, of the weights by the weight-grad op) is traced too
    moe = make_moe(H, I, 4, 2, backend="grouped_mm")
    x, grad_out = torch.randn(7, H, requires_grad=True), torch.randn(7, H)
    compiled = torch.compile(moe, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, moe(x), **TOL[torch.float32])
    (out * grad_out).sum().backward()
    leaves = {"input": x.detach().double().requires_grad_(),
              "router": moe.router.weight.detach().double().requires_grad_(),
              "gate_up_proj": moe.experts.gate_up_proj.detach().double().requires_grad_(),
              "down_proj": moe.experts.down_proj.detach().double().requires_grad_()}
    ref = reference_moe(leaves["input"], leaves["router"], leaves["gate_up_proj"], leaves["down_proj"], 2)
    (ref * grad_out.double()).sum().backward()
    got = {"input": x.grad, "router": moe.router.weight.grad, "gate_up_proj": moe.experts.gate_up_proj.grad,
           "down_proj": moe.experts.down_proj.grad}
    for name, leaf in leaves.items():  # float32 against float64: the gradients' own rounding, ~1e-6 here
        torch.testing.assert_close(got[name].double(), leaf.grad, atol=3e-5, rtol=1e-4, msg=name)


def test_eager_cannot_fullgraph():
    moe = make_moe(backend="eager")
    compiled = torch.compile(moe, fullgraph=True, backend="aot_eager")
    # the loop over `expert_hit.tolist()` depends on the data: dynamo either refuses it or cannot guard on it
    data_dependent = (torch._dynamo.exc.Unsupported, torch.fx.experimental.symbolic_shapes.GuardOnDataDependentSymNode)
    with pytest.raises(data_dependent, match="(?i)data.dependent"):
        compiled(torch.randn(5, 16))


def test_inductor_really_compiles_grouped_mm():
    moe = make_moe(32, 64, 8, 2, backend="grouped_mm", dtype=torch.bfloat16)
    x = torch.randn(16, 32).to(torch.bfloat16)
    compiled = torch.compile(moe, fullgraph=True)  # inductor: generates and builds C++ for this machine
    torch.testing.assert_close(compiled(x), moe(x), **TOL[torch.bfloat16])


@pytest.mark.parametrize("top_k", [1, 3, 8])
def test_compiled_grouped_mm_sums_every_slot(top_k):
    # under torch.compile grouped_mm sums the k slots with a chain of adds (sum_slots): check it against float64
    moe = make_moe(32, 64, 8, top_k, backend="grouped_mm")
    x = torch.randn(12, 32)
    compiled = torch.compile(moe.experts, fullgraph=True, backend="aot_eager")
    _, _, index, weights = reference_router(x, moe.router.weight, top_k)
    expected = reference_experts(x, index, weights, moe.experts.gate_up_proj, moe.experts.down_proj)
    out = compiled(x, index, weights.float())
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["batched_mm", "grouped_mm"])
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_out_of_range_top_k_index_fails_under_compile(backend, compiler):
    # issue 16 item 3: compiled grouped_mm once returned garbage (bf16: 1e38, then NaN) or dropped the pair (float32)
    # for an index >= E, and -1 gave yet another answer; the check now runs inside the compiled graph
    moe = make_moe(16, 8, 4, 2, backend=backend, dtype=torch.bfloat16).eval()
    compiled = torch.compile(moe.experts, fullgraph=True, backend=compiler)
    x = torch.randn(6, 16, dtype=torch.bfloat16)
    weights = torch.full((6, 2), 0.5, dtype=torch.bfloat16)
    good = torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0], [0, 2], [1, 3]])
    torch.testing.assert_close(compiled(x, good, weights), moe.experts(x, good, weights), **TOL[torch.bfloat16])
    for bad_value in (4, -1):
        bad = good.clone()
        bad[2, 1] = bad_value
        with pytest.raises(RuntimeError, match=r"top_k_index values must be in \[0, num_experts = 4\)"):
            compiled(x, bad, weights)
    with pytest.raises(ValueError, match="got values in"):  # uncompiled: the ValueError with the values
        moe.experts(x, bad, weights)
