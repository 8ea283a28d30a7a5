"""Every backend against an independent float64 reference, over the edge cases of routing and shapes."""

import contextlib

import pytest
import torch

import moelab
from conftest import BACKENDS, make_moe
from moelab.backends.grouped_matmul import group_ranges, grouped_linear
from moelab.backends.pairs import expert_offsets, inverse_permutation, sort_by_expert
from reference import ODD_SHAPES, reference_experts, reference_moe, routing_for

# Tolerances against the float64 reference, from each dtype's precision. Outputs are O(1) (|y| < 5 here) and every
# output element goes through ~5 rounded intermediates (gate_up, activated, outputs, weighted, the k-sum) and dot
# products of at most 40 terms:
# - float32 (24 bits, 2^-24 = 6e-8 per rounding): 40 * 6e-8 = 2.4e-6 at worst; 1e-5 leaves a 4x margin;
# - bfloat16 (8 bits, 2^-9 = 0.2% per rounding): 5 roundings give ~1% relative, rtol 2e-2 doubles it; near zero
#   the k-sum cancels O(1) terms, so the error is absolute there: atol 2e-2 (2% of an O(1) term);
# - float16 (11 bits, 2^-12 = 0.024% per rounding): the same count, 5e-3 absolute and relative.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=5e-3, rtol=5e-3)}
BUILT_IN = ("eager", "batched_mm", "grouped_mm", "capacity", "block_aligned", "auto")  # every backend moelab registers
MODES = {"grad": contextlib.nullcontext, "no_grad": torch.no_grad}  # no_grad: CPU inference takes the fast path


def test_the_built_in_backends_are_registered():
    assert set(BUILT_IN) <= set(moelab.ExpertsInterface.names())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("weights_float32", [False, True], ids=["weights_in_dtype", "weights_float32"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("case", list(ODD_SHAPES))
@pytest.mark.parametrize("backend", BUILT_IN)
def test_experts_match_float64_reference(backend, case, mode, weights_float32, dtype):
    T, H, I, E, k, kind = ODD_SHAPES[case]
    moe = make_moe(H, I, E, k, dtype=dtype, backend=backend, top_k_weights_float32=weights_float32)
    x = torch.randn(T, H).to(dtype)
    top_k_index, top_k_weights = routing_for(moe, x, kind)
    assert top_k_weights.dtype == (torch.float32 if weights_float32 else dtype)
    assert moe.experts.gate_up_proj.requires_grad  # grad mode: autograd records the call (the plain path)
    with MODES[mode]():
        out = moe.experts(x, top_k_index, top_k_weights)
    assert out.requires_grad == (mode == "grad")
    ref = reference_experts(x, top_k_index, top_k_weights, moe.experts.gate_up_proj, moe.experts.down_proj)
    assert out.dtype == dtype and out.shape == (T, H)
    torch.testing.assert_close(out.detach().double(), ref, **TOL[dtype])


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("backend", BUILT_IN)
def test_experts_match_float64_reference_in_float16(backend, mode):
    for case, (T, H, I, E, k, kind) in ODD_SHAPES.items():
        moe = make_moe(H, I, E, k, dtype=torch.float16, backend=backend)
        x = torch.randn(T, H).to(torch.float16)
        top_k_index, top_k_weights = routing_for(moe, x, kind)
        with MODES[mode]():
            out = moe.experts(x, top_k_index, top_k_weights)
        ref = reference_experts(x, top_k_index, top_k_weights, moe.experts.gate_up_proj, moe.experts.down_proj)
        torch.testing.assert_close(out.detach().double(), ref, **TOL[torch.float16], msg=case)


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


def test_one_group_loop_and_out_only_through_it():
    offsets = torch.tensor([2, 2, 5, 7], dtype=torch.int32)  # group 1 is empty
    assert group_ranges(offsets) == [(0, 0, 2), (2, 2, 5), (3, 5, 7)]
    x, weight = torch.randn(7, 16), torch.randn(4, 8, 16)
    expected = torch.cat([x[0:2] @ weight[0].T, x[2:5] @ weight[2].T, x[5:7] @ weight[3].T])
    out = torch.empty(7, 8)
    assert grouped_linear(x, weight, offsets, out=out) is out  # out: the loop, writing into it
    torch.testing.assert_close(out, expected)
    assert grouped_linear(x, weight, offsets, "fallback", out=torch.empty(7, 8)).shape == (7, 8)
    for path in ("native", "fallback"):
        torch.testing.assert_close(grouped_linear(x, weight, offsets, path), expected)
    with pytest.raises(ValueError, match="out=.*torch.mm loop"):
        grouped_linear(x, weight, offsets, "native", out=torch.empty(7, 8))
    with pytest.raises(ValueError, match="path must be"):
        grouped_linear(x, weight, offsets, "loop")
