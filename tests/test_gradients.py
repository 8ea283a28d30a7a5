"""Gradients of input, gate_up_proj, down_proj and router weight: every backend against float64 autograd."""

import pytest
import torch

import moelab
from conftest import BACKENDS, make_moe
from reference import reference_moe


def grads_of(moe, x, grad_out):
    x = x.clone().requires_grad_()
    moe.zero_grad()
    (moe(x) * grad_out).sum().backward()
    return {"input": x.grad, "router.weight": moe.router.weight.grad,
            "gate_up_proj": moe.experts.gate_up_proj.grad, "down_proj": moe.experts.down_proj.grad}


def reference_grads(moe, x, grad_out):
    leaves = {"input": x.double().requires_grad_(),
              "router.weight": moe.router.weight.detach().double().requires_grad_(),
              "gate_up_proj": moe.experts.gate_up_proj.detach().double().requires_grad_(),
              "down_proj": moe.experts.down_proj.detach().double().requires_grad_()}
    out = reference_moe(leaves["input"], leaves["router.weight"], leaves["gate_up_proj"], leaves["down_proj"],
                        moe.config.top_k)
    (out * grad_out.double()).sum().backward()
    return {name: t.grad for name, t in leaves.items()}


@pytest.mark.parametrize("backend, fallback", [(b, False) for b in BACKENDS] + [("grouped_mm", True)])
def test_gradients_match_float64_reference(backend, fallback):
    moe = make_moe(16, 32, 6, 2, backend=backend)
    x, grad_out = torch.randn(12, 16), torch.randn(12, 16)
    with moelab.backends.force_fallback(fallback):
        got = grads_of(moe, x, grad_out)
    want = reference_grads(moe, x, grad_out)
    for name in want:
        torch.testing.assert_close(got[name].double(), want[name], atol=3e-5, rtol=1e-4, msg=name)


def test_gradients_agree_across_backends_on_unaligned_sizes():
    grads = {}
    x, grad_out = torch.randn(9, 6), torch.randn(9, 6)
    for backend in BACKENDS:
        grads[backend] = grads_of(make_moe(6, 5, 4, 2, backend=backend), x, grad_out)
    for backend in BACKENDS[1:]:
        for name, g in grads["eager"].items():
            torch.testing.assert_close(grads[backend][name], g, atol=1e-5, rtol=1e-4, msg=f"{backend} {name}")
