"""The backward of every backend: gradients of hidden_states, top_k_weights, gate_up_proj, down_proj (and the router
and shared expert in a layer) against float64 references; `gradcheck` at a fixed routing; each weight gradient
accumulated once (no per-expert or per-pair weight-sized gradients)."""

import pytest
import torch
from torch.func import functional_call

import moelab
from conftest import BACKENDS, make_moe
from reference import reference_experts

ALL = BACKENDS + ("auto",)


def fixed_routing(num_tokens, num_experts, top_k, seed=0):
    """top_k_index [T, k] (distinct experts per token, the last expert never chosen) and softmax weights [T, k]."""
    g = torch.Generator().manual_seed(seed)
    top_k_index = torch.stack([torch.randperm(num_experts - 1, generator=g)[:top_k] for _ in range(num_tokens)])
    top_k_weights = torch.softmax(torch.randn(num_tokens, top_k, generator=g), dim=-1)
    return top_k_index, top_k_weights


def experts_grads(moe, x, top_k_index, top_k_weights, grad_out):
    """Gradients of an `Experts` call with respect to its four differentiable inputs."""
    x = x.clone().requires_grad_()
    w = top_k_weights.clone().requires_grad_()
    moe.zero_grad(set_to_none=True)
    (moe.experts(x, top_k_index, w) * grad_out).sum().backward()
    return {"hidden_states": x.grad, "top_k_weights": w.grad, "gate_up_proj": moe.experts.gate_up_proj.grad,
            "down_proj": moe.experts.down_proj.grad}


def reference_grads(moe, x, top_k_index, top_k_weights, grad_out):
    leaves = {"hidden_states": x.double().requires_grad_(), "top_k_weights": top_k_weights.double().requires_grad_(),
              "gate_up_proj": moe.experts.gate_up_proj.detach().double().requires_grad_(),
              "down_proj": moe.experts.down_proj.detach().double().requires_grad_()}
    out = reference_experts(leaves["hidden_states"], top_k_index, leaves["top_k_weights"], leaves["gate_up_proj"],
                            leaves["down_proj"])
    (out * grad_out.double()).sum().backward()
    return {name: t.grad for name, t in leaves.items()}


def assert_close_relative(got, want, tolerance, name):
    """|got - want| / |want| (Frobenius) below tolerance: bfloat16 rounding scales with the values."""
    error = (got.double() - want).norm() / want.norm().clamp_min(1e-12)
    assert error < tolerance, f"{name}: relative error {error:.2e} >= {tolerance:.0e}"


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("backend", ALL)
def test_experts_gradients_match_the_float64_reference(backend, dtype, tolerance):
    moe = make_moe(32, 16, 6, 2, backend=backend, dtype=dtype)  # aligned sizes: grouped_mm's native kernel
    top_k_index, top_k_weights = fixed_routing(13, 6, 2)  # expert 5 gets no pair
    x, grad_out = torch.randn(13, 32), torch.randn(13, 32)
    got = experts_grads(moe, x.to(dtype), top_k_index, top_k_weights.to(dtype), grad_out.to(dtype))
    want = reference_grads(moe, x.to(dtype), top_k_index, top_k_weights.to(dtype), grad_out.to(dtype))
    for name in want:
        assert got[name].dtype == dtype and got[name].shape == want[name].shape
        assert_close_relative(got[name], want[name], tolerance, f"{backend} {dtype} {name}")
    assert got["gate_up_proj"][5].abs().max() == 0 and got["down_proj"][5].abs().max() == 0  # no pair, no gradient


def test_the_native_grouped_kernel_is_checked_in_float32():
    moe = make_moe(32, 16, 6, 2, backend="grouped_mm")
    x = torch.randn(13, 32, requires_grad=True)
    assert moelab.backends.matmul_path(x, moe.experts.gate_up_proj)[0] == "native"  # what the test above ran
    assert moelab.backends.matmul_path(x.double(), moe.experts.gate_up_proj.double())[0] == "fallback"


@pytest.mark.parametrize("backend", ALL)
def test_gradcheck_in_float64_at_a_fixed_routing(backend):
    moe = make_moe(4, 3, 4, 2, backend=backend, dtype=torch.float64)
    top_k_index, top_k_weights = fixed_routing(5, 4, 2, seed=1)
    params = (moe.experts.gate_up_proj.detach().clone().requires_grad_(),
              moe.experts.down_proj.detach().clone().requires_grad_())
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w = top_k_weights.double().requires_grad_()

    def call(x, w, gate_up_proj, down_proj):
        return functional_call(moe.experts, {"gate_up_proj": gate_up_proj, "down_proj": down_proj},
                               (x, top_k_index, w))
    assert torch.autograd.gradcheck(call, (x, w, *params), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("shared", [0, 24])
@pytest.mark.parametrize("backend", ALL)
def test_layer_gradients_with_and_without_a_shared_expert(backend, shared):
    """The whole layer (router, experts, shared expert) against the same layer in float64 running eager."""
    moe = make_moe(16, 32, 6, 2, backend=backend, shared_expert_intermediate_size=shared)
    reference = make_moe(16, 32, 6, 2, backend="eager", shared_expert_intermediate_size=shared).double()
    reference.load_state_dict({k: v.double() for k, v in moe.state_dict().items()})
    x, grad_out = torch.randn(12, 16), torch.randn(12, 16)
    (moe(x.requires_grad_()) * grad_out).sum().backward()
    x64 = x.detach().double().requires_grad_()
    (reference(x64) * grad_out.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=3e-5, rtol=1e-4)
    names = dict(reference.named_parameters())
    for name, p in moe.named_parameters():
        torch.testing.assert_close(p.grad.double(), names[name].grad, atol=3e-5, rtol=1e-4, msg=name)
    assert {"router.weight", "experts.gate_up_proj"} <= set(names) and (shared == 0) == (
        not any("shared" in n for n in names))


class WeightSizedTensors(torch.utils._python_dispatch.TorchDispatchMode):
    """The ops that make a new tensor (not a view) with at least as many elements as one whole parameter."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.made = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        aliases = {a.untyped_storage().data_ptr() for a in inputs}  # a view or an in-place op shares storage
        if (isinstance(out, torch.Tensor) and out.numel() >= self.numel
                and out.untyped_storage().data_ptr() not in aliases):
            self.made.append((str(func), out.numel()))
        return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_weight_gradient_is_built_once(backend):
    """Backward makes a few parameters' worth of elements (gate_up_proj's gradient is 2 down_proj's, down_proj's
    1, and a zero-filled buffer may come before each), not one per expert (eager's slices) or per pair (batched_mm's gathered copies):
    the O(E^2) and O(S) bytes the issue measured. Sizes chosen so that no activation is as large as a parameter
    (S = 64 rows, E = 16 experts)."""
    moe = make_moe(32, 64, 16, 4, backend=backend)
    numel = moe.experts.down_proj.numel()  # [E, H, I]; gate_up_proj [E, 2I, H] has twice as many
    x = torch.randn(16, 32, requires_grad=True)
    out = moe(x)
    with WeightSizedTensors(numel) as mode:
        out.sum().backward()
    made = sum(n for _, n in mode.made) / numel
    assert made <= 6, f"{backend}: {made:g} down_proj's worth of new tensors in backward: {mode.made}"


@pytest.mark.parametrize("backend", ALL)
def test_no_tokens_give_zero_gradients_not_an_error(backend):
    """T = 0 (or every pair dropped): backward still runs and every gradient is zero."""
    moe = make_moe(16, 32, 4, 2, backend=backend)
    x = torch.randn(0, 16, requires_grad=True)
    w = torch.randn(0, 2, requires_grad=True)
    moe.experts(x, torch.zeros(0, 2, dtype=torch.long), w).sum().backward()
    assert x.grad.shape == (0, 16) and w.grad.shape == (0, 2)
    for p in (moe.experts.gate_up_proj, moe.experts.down_proj):
        assert p.grad is not None and p.grad.abs().max() == 0
