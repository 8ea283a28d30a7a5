"""SparseMoE's optional parts for transformers families: a Qwen2-MoE shared expert, Mixtral's float32 weights."""

import pytest
import torch
import torch.nn.functional as F

import moelab
from conftest import BACKENDS, make_moe


def test_the_shared_expert_is_off_by_default_and_changes_nothing():
    moe = make_moe()
    assert moe.shared_expert is None and moe.shared_expert_gate is None
    assert sorted(moe.state_dict()) == ["experts.down_proj", "experts.gate_up_proj", "router.weight"]
    with_shared = make_moe(shared_expert_intermediate_size=24)
    for name, param in moe.named_parameters():  # the routed weights do not depend on the shared expert
        assert torch.equal(param, with_shared.get_parameter(name))


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_shared_expert_is_added_sigmoid_gated_as_in_qwen2_moe(backend):
    moe = make_moe(backend=backend, shared_expert_intermediate_size=24)
    shared = moe.shared_expert
    assert shared.gate_proj.weight.shape == (24, 16) and shared.down_proj.weight.shape == (16, 24)
    assert moe.shared_expert_gate.weight.shape == (1, 16)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        routed = make_moe(backend=backend)(x)  # the same seed: the same routed weights
        flat = x.reshape(-1, 16)
        expected = F.linear(F.silu(F.linear(flat, shared.gate_proj.weight)) * F.linear(flat, shared.up_proj.weight),
                            shared.down_proj.weight)
        expected = routed + (torch.sigmoid(flat @ moe.shared_expert_gate.weight.T) * expected).view_as(x)
        with moelab.inspect(moe) as trace:
            got = moe(x)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    step = trace["shared_expert"]
    assert step.tensors["shared_output"].shape == (10, 16) and step.tensors["shared_gate"].shape == (10, 1)


def test_the_shared_expert_follows_dtype_and_init():
    moe = make_moe(shared_expert_intermediate_size=8, dtype=torch.bfloat16)
    assert {p.dtype for p in moe.parameters()} == {torch.bfloat16}
    assert moe(torch.randn(3, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16
    cfg = moelab.MoEConfig(hidden_size=64, intermediate_size=32, num_experts=4, top_k=2,
                           shared_expert_intermediate_size=128, initializer_range=0.05)
    assert abs(moelab.SparseMoE(cfg, seed=0).shared_expert.up_proj.weight.std().item() - 0.05) < 0.003


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_k_weights_float32_keeps_the_weights_and_returns_the_input_dtype(backend):
    x = torch.randn(12, 16).bfloat16()
    moe = make_moe(backend=backend, dtype=torch.bfloat16, top_k_weights_float32=True)
    out, routing = moe(x, return_router_output=True)
    assert routing.top_k_weights.dtype == torch.float32 and out.dtype == torch.bfloat16
    # the weighting happens in float32: what the experts give, weighted in float32 and only then rounded
    pairs = [moe.experts(x, routing.top_k_index[:, j:j + 1], torch.ones_like(routing.top_k_weights[:, :1]))
             for j in range(2)]
    expected = sum(p.float() * routing.top_k_weights[:, j:j + 1] for j, p in enumerate(pairs))
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    plain = make_moe(backend=backend, dtype=torch.bfloat16)
    assert plain.router(x).top_k_weights.dtype == torch.bfloat16  # the default is unchanged
    with pytest.raises(ValueError, match="top_k_weights_float32 must be a bool"):
        moelab.MoEConfig(8, 16, 4, 2, top_k_weights_float32=1)
