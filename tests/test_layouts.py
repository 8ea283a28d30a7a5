"""The capacity and block_aligned layouts (issue 15): their buffers, positions and padding against Python references.

Their outputs and gradients against float64 are in test_backends.py, test_gradients.py (via conftest.BACKENDS) and
test_routing_mechanics.py (under drops, every registered backend).
"""

import functools
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import moelab
from conftest import make_moe
from moelab import ExpertsInterface, SparseMoE
from moelab.backends.block_aligned import BLOCK_SIZE, align_to_blocks, block_aligned_experts, padded_rows_bound
from moelab.backends.capacity import expert_capacity, slot_in_expert
from reference import reference_experts


def config(**fields):
    return moelab.MoEConfig(hidden_size=16, intermediate_size=24, num_experts=4, top_k=2,
                            initializer_range=0.25, **fields)


def python_slots(top_k_index, dropped):
    """Place of every kept pair among its expert's kept pairs, in token order (pair s = t * k + j), by a loop."""
    seen, slot = {}, torch.zeros_like(top_k_index)
    T, k = top_k_index.shape
    for t in range(T):
        for j in range(k):
            if dropped is not None and dropped[t, j]:
                continue
            e = int(top_k_index[t, j])
            slot[t, j] = seen.get(e, 0)
            seen[e] = seen.get(e, 0) + 1
    return slot, seen


routings = dict(T=st.integers(0, 30), E=st.integers(1, 9), k=st.integers(1, 4), seed=st.integers(0, 2**16),
                drop_rate=st.sampled_from([0.0, 0.3, 1.0]))


def random_routing(T, E, k, seed, drop_rate):
    k = min(k, E)
    g = torch.Generator().manual_seed(seed)
    skew = torch.linspace(0, 3, E)  # a skewed choice: low experts more often
    top_k_index = torch.topk(torch.rand(T, E, generator=g) + skew, k, dim=-1).indices  # [T, k], distinct per token
    dropped = torch.rand(T, k, generator=g) < drop_rate if drop_rate else None
    return top_k_index, dropped, k


@settings(max_examples=80, deadline=None)
@given(**routings)
def test_capacity_slots_equal_a_python_loop(T, E, k, seed, drop_rate):
    top_k_index, dropped, k = random_routing(T, E, k, seed, drop_rate)
    slot, tokens_per_expert = slot_in_expert(top_k_index, dropped, E)
    expected, seen = python_slots(top_k_index, dropped)
    kept = torch.ones_like(top_k_index, dtype=torch.bool) if dropped is None else ~dropped
    assert torch.equal(slot[kept], expected[kept])
    assert tokens_per_expert.tolist() == [seen.get(e, 0) for e in range(E)]


@settings(max_examples=80, deadline=None)
@given(**routings, block_size=st.sampled_from([1, 2, 4, 16]))
def test_every_block_belongs_to_one_expert(T, E, k, seed, drop_rate, block_size):
    top_k_index, dropped, k = random_routing(T, E, k, seed, drop_rate)
    rows, padded_offsets, tokens_per_expert, padded_tokens = align_to_blocks(top_k_index, dropped, E, block_size)
    S, bound = T * k, padded_rows_bound(T * k, E, block_size)
    assert bound == S + E * (block_size - 1)
    assert (padded_tokens % block_size == 0).all() and (padded_tokens >= tokens_per_expert).all()
    assert (padded_tokens - tokens_per_expert < block_size).all()  # each group wastes at most M - 1 rows
    assert padded_offsets.tolist() == torch.cumsum(padded_tokens, 0).tolist()
    assert int(padded_offsets[-1]) <= bound
    starts = padded_offsets.long() - padded_tokens  # [E]
    kept = torch.ones(T, k, dtype=torch.bool) if dropped is None else ~dropped
    expected_slot, _ = python_slots(top_k_index, dropped)
    for t in range(T):
        for j in range(k):
            if not kept[t, j]:
                assert rows[t * k + j] == bound  # the spare row past the buffer
                continue
            e = int(top_k_index[t, j])
            assert rows[t * k + j] == starts[e] + expected_slot[t, j]  # inside its own expert's padded group
            assert starts[e] // block_size == starts[e] / block_size  # groups start on a block boundary
    kept_rows = rows[kept.reshape(-1)]
    assert kept_rows.unique().numel() == kept_rows.numel()  # no two pairs share a row


def steps_of(moe, x):
    with moelab.inspect(moe) as trace:
        out, routing = moe(x, return_router_output=True)
    return trace.calls[0], out, routing


def test_capacity_buffer_is_e_by_c_with_c_from_the_capacity_factor():
    moe = SparseMoE(config(capacity_factor=0.75), "capacity", seed=0).train()
    x = torch.randn(20, 16, generator=torch.Generator().manual_seed(1))
    call, _, routing = steps_of(moe, x)
    capacity = math.ceil(0.75 * 20 * 2 / 4)
    assert call["positions"].info["capacity"] == capacity == expert_capacity(0.75, 20, 2, 4)
    expert_inputs, padding = call["dispatch"].tensors["expert_inputs"], call["dispatch"].tensors["padding"]
    assert expert_inputs.shape == (4, capacity, 16) and padding.shape == (4, capacity)
    kept = ~routing.dropped
    assert routing.dropped.any() and int((~padding).sum()) == int(kept.sum())
    assert (expert_inputs[padding] == 0).all()
    slot = call["positions"].tensors["slot"]
    for t, j in kept.nonzero().tolist():  # every kept pair's token sits in its expert's row `slot`
        assert torch.equal(expert_inputs[routing.top_k_index[t, j], slot[t, j]], x[t])


def test_dropless_capacity_is_the_largest_group():
    moe = make_moe(16, 24, 4, 2, backend="capacity")
    x = torch.randn(13, 16)
    call, _, routing = steps_of(moe, x)
    counts = torch.bincount(routing.top_k_index.reshape(-1), minlength=4)
    assert call["positions"].info["capacity"] == int(counts.max())
    assert call["dispatch"].tensors["expert_inputs"].shape == (4, int(counts.max()), 16)
    # at least one expert is exactly full, and the padding is what the others lack
    assert int(call["dispatch"].tensors["padding"].sum()) == 4 * int(counts.max()) - 26


def test_capacity_stays_at_most_t_and_refuses_groups_that_do_not_fit():
    moe = SparseMoE(config(capacity_factor=100.0), "capacity", seed=0).train()
    x = torch.randn(6, 16)
    call, out, _ = steps_of(moe, x)
    assert call["positions"].info["capacity"] == 6  # min(ceil(100 * 6 * 2 / 4), T)
    small = SparseMoE(config(capacity_factor=0.5), "capacity", seed=0).train()
    index = torch.zeros(8, 2, dtype=torch.long)
    index[:, 1] = 1  # every token on experts 0 and 1: 8 pairs each, C = ceil(0.5 * 8 * 2 / 4) = 2
    weights = torch.full((8, 2), 0.5)
    no_drops = torch.zeros(8, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"an expert has 8 kept pairs but the capacity is C = 2"):
        small.experts(torch.randn(8, 16), index, weights, no_drops)


def test_block_aligned_buffer_has_the_static_bound_and_the_sentinel_rows():
    moe = make_moe(16, 24, 4, 2, backend="block_aligned")
    x = torch.randn(13, 16)
    call, _, routing = steps_of(moe, x)
    S, E, M = 26, 4, BLOCK_SIZE
    align = call["align"].tensors
    assert call["align"].info["block_size"] == M
    assert call["gather"].tensors["padded_states"].shape == (S + E * (M - 1), 16)
    ids = align["sorted_pair_ids"]
    assert ids.shape == (S + E * (M - 1),)
    used = int(align["padded_offsets"][-1])
    assert int((ids[:used] == S).sum()) == int(align["padding_per_expert"].sum())  # sentinel S on every padding row
    assert sorted(ids[ids < S].tolist()) == list(range(S))  # every pair has exactly one row
    experts_of_pairs = routing.top_k_index.reshape(-1)
    for row in range(used):
        if ids[row] < S:
            assert align["block_expert_ids"][row // M] == experts_of_pairs[ids[row]]


def test_block_size_is_a_parameter_and_is_checked():
    name = "test_block_aligned_4"
    ExpertsInterface.register(name, functools.partial(block_aligned_experts, block_size=4), accepts_dropped=True)
    try:
        moe = make_moe(16, 24, 4, 2, backend=name)
        x = torch.randn(9, 16)
        call, out, routing = steps_of(moe, x)
        assert call["align"].info["block_size"] == 4
        assert (call["align"].tensors["padded_tokens_per_expert"] % 4 == 0).all()
        expected = reference_experts(x, routing.top_k_index, routing.top_k_weights, moe.experts.gate_up_proj,
                                     moe.experts.down_proj)
        torch.testing.assert_close(out.detach().double(), expected, atol=1e-5, rtol=1e-5)
    finally:
        ExpertsInterface.unregister(name)
    experts = make_moe(backend="block_aligned").experts
    with pytest.raises(ValueError, match=r"block_size must be an int >= 1 \(rows per block, M\), got 0"):
        block_aligned_experts(experts, torch.randn(2, 16), torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2),
                              block_size=0)


@pytest.mark.parametrize("backend", ["capacity", "block_aligned"])
@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_bfloat16_gradients_follow_the_float64_reference(backend, capacity_factor):
    moe = SparseMoE(config(capacity_factor=capacity_factor), backend, seed=0).train().to(torch.bfloat16)
    x = torch.randn(24, 16, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16).requires_grad_()
    out, routing = moe(x, return_router_output=True)
    gate_up64 = moe.experts.gate_up_proj.detach().double().requires_grad_()
    down64 = moe.experts.down_proj.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    weights64 = routing.top_k_weights.detach().double().requires_grad_()
    expected = reference_experts(x64, routing.top_k_index, weights64, gate_up64, down64)
    grad_out = torch.randn(24, 16, generator=torch.Generator().manual_seed(3))
    # the routed part only: the router's own gradient path is the same code for every backend
    weights = routing.top_k_weights.detach().requires_grad_()
    experts_out = moe.experts(x, routing.top_k_index, weights, routing.dropped)
    experts_out.backward(grad_out.to(torch.bfloat16))
    expected.backward(grad_out.double())
    torch.testing.assert_close(out.double(), expected.detach(), atol=3e-2, rtol=3e-2)
    kept = ~routing.dropped  # a dropped pair's weight is masked to 0 inside Experts: its gradient is 0 there
    assert (weights.grad[routing.dropped] == 0).all()
    for got, want in ((x.grad, x64.grad), (moe.experts.gate_up_proj.grad, gate_up64.grad),
                      (moe.experts.down_proj.grad, down64.grad), (weights.grad[kept], weights64.grad[kept])):
        scale = float(want.abs().max())
        torch.testing.assert_close(got.double() / scale, want / scale, atol=3e-2, rtol=0)
