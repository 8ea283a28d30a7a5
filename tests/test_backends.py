"""Every backend against an independent float64 reference, over the edge cases of routing and shapes."""

import pytest
import torch

import moelab
from conftest import BACKENDS, make_moe
from reference import reference_experts, reference_moe

TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=4e-2, rtol=4e-2),
       torch.float16: dict(atol=5e-3, rtol=5e-3)}

# (T, H, I, E, k, routing)
CASES = {
    "T=1": (1, 16, 32, 4, 2, "router"),
    "k=1, empty experts": (1, 16, 32, 8, 1, "router"),
    "k=E": (9, 16, 32, 4, 4, "router"),
    "sizes not a multiple of 8": (13, 6, 5, 4, 2, "router"),
    "all tokens on the same experts": (10, 12, 20, 5, 2, "same"),
    "larger": (33, 24, 40, 8, 3, "router"),
}


def routing_for(moe, x, kind):
    if kind == "router":
        out = moe.router(x)
        return out.top_k_index, out.top_k_weights
    T, k, E = x.shape[0], moe.config.top_k, moe.config.num_experts
    top_k_index = torch.tensor([E - 1 - j for j in range(k)]).expand(T, k).contiguous()  # every token -> same k
    top_k_weights = torch.softmax(torch.randn(T, k), dim=-1).to(x.dtype)
    return top_k_index, top_k_weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_experts_match_float64_reference(backend, case, dtype):
    T, H, I, E, k, kind = CASES[case]
    moe = make_moe(H, I, E, k, dtype=dtype, backend=backend)
    x = torch.randn(T, H).to(dtype)
    top_k_index, top_k_weights = routing_for(moe, x, kind)
    out = moe.experts(x, top_k_index, top_k_weights)
    ref = reference_experts(x, top_k_index, top_k_weights, moe.experts.gate_up_proj, moe.experts.down_proj)
    assert out.dtype == dtype and out.shape == (T, H)
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_matches_reference_on_batched_and_non_contiguous_input(backend):
    moe = make_moe(16, 24, 6, 2, backend=backend)
    base = torch.randn(3, 16, 5)  # [B, H, S]
    x = base.transpose(1, 2)  # [B, S, H], not contiguous
    assert not x.is_contiguous()
    out = moe(x)
    assert out.shape == x.shape
    ref = reference_moe(x.reshape(-1, 16), moe.router.weight, moe.experts.gate_up_proj, moe.experts.down_proj, 2)
    torch.testing.assert_close(out.reshape(-1, 16).double(), ref, **TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tokens(backend):
    moe = make_moe(backend=backend)
    assert moe(torch.empty(0, 16)).shape == (0, 16)


@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize("act", ["silu", "gelu", "relu"])
def test_config_choices_reach_every_backend(norm_topk_prob, act):
    outs = {}
    x = torch.randn(7, 16)
    for backend in BACKENDS:
        moe = make_moe(16, 32, 4, 2, backend=backend, norm_topk_prob=norm_topk_prob, hidden_act=act)
        outs[backend] = moe(x)
    ref = reference_moe(x, moe.router.weight, moe.experts.gate_up_proj, moe.experts.down_proj, 2,
                        norm_topk_prob, act)
    for backend, out in outs.items():
        torch.testing.assert_close(out.double(), ref, **TOL[torch.float32], msg=backend)


def test_switch_at_runtime_keeps_the_answer():
    moe = make_moe()
    x = torch.randn(11, 16)
    expected = moe(x)
    for name in BACKENDS:
        moe.set_experts_implementation(name)
        assert moe.get_experts_implementation() == name
        torch.testing.assert_close(moe(x), expected, **TOL[torch.float32])


def test_grouped_mm_helpers():
    from moelab.backends.grouped_mm import expert_offsets, inverse_permutation, sort_by_expert
    top_k_index = torch.tensor([[3, 0], [0, 2], [3, 2], [0, 3]])
    perm, sorted_ids = sort_by_expert(top_k_index)
    assert torch.equal(sorted_ids, top_k_index.flatten().sort(stable=True).values)
    assert torch.equal(top_k_index.flatten()[perm], sorted_ids)
    offsets = expert_offsets(sorted_ids, num_experts=5)
    counts = torch.bincount(top_k_index.flatten(), minlength=5)
    assert offsets.dtype == torch.int32 and offsets.tolist() == torch.cumsum(counts, 0).tolist()
    inv = inverse_permutation(perm)
    assert torch.equal(perm[inv], torch.arange(8)) and torch.equal(inv[perm], torch.arange(8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grouped_mm_takes_native_kernel_when_aligned_and_fallback_agrees(dtype):
    moe = make_moe(32, 64, 8, 2, dtype=dtype)
    x = torch.randn(40, 32).to(dtype)
    moelab.backends.PATH_COUNTS.clear()
    native = moe(x)
    assert moelab.backends.PATH_COUNTS == {"native": 2}
    assert moelab.backends.matmul_path(x, moe.experts.gate_up_proj)[0] == "native"
    with moelab.backends.force_fallback():
        assert moelab.backends.matmul_path(x, moe.experts.gate_up_proj)[0] == "fallback"
        fallback = moe(x)
    assert moelab.backends.PATH_COUNTS == {"native": 2, "fallback": 2}
    torch.testing.assert_close(fallback, native, **({} if dtype == torch.float32 else TOL[dtype]))


@pytest.mark.parametrize("H, I, dtype, reason", [
    (6, 5, torch.float32, "16 bytes"),
    (16, 32, torch.float64, "does not take torch.float64"),
])
def test_grouped_mm_falls_back_where_the_kernel_cannot_run(H, I, dtype, reason):
    moe = make_moe(H, I, 4, 2, dtype=dtype)
    x = torch.randn(5, H, dtype=dtype)
    path, why = moelab.backends.matmul_path(x, moe.experts.gate_up_proj)
    assert path == "fallback" and reason in why
    moelab.backends.PATH_COUNTS.clear()
    out = moe(x)
    assert moelab.backends.PATH_COUNTS["fallback"] == 2
    ref = reference_moe(x, moe.router.weight, moe.experts.gate_up_proj, moe.experts.down_proj, 2)
    torch.testing.assert_close(out.double(), ref, **TOL[torch.float32])
