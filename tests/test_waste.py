"""The layouts' waste table (issue 15) against what the backends really do: rows and FLOPs counted from the traced
tensors and `torch.utils.flop_counter` on the real call, memory measured by torch.profiler to the byte, and the
made-up routings it is fed."""

import math

import pandas as pd
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import moelab
from moelab import MoEConfig, SparseMoE, memory
from moelab.backends import BLOCK_SIZE, force_fallback, grouped_matmul
from moelab.layer import drop_pairs, skewed_routing
from moelab.memory import format_waste, waste_table

LAYOUTS = ("eager", "batched_mm", "grouped_mm", "capacity", "block_aligned")
E, K, H, I = 8, 2, 32, 48


def config(capacity_factor=None):
    return MoEConfig(hidden_size=H, intermediate_size=I, num_experts=E, top_k=K, capacity_factor=capacity_factor)


def routing(num_tokens=40, skew=0.5, capacity_factor=None):
    top_k_index, top_k_weights = skewed_routing(num_tokens, E, K, skew, seed=1)
    dropped = None
    if capacity_factor is not None:
        dropped = drop_pairs(top_k_index, top_k_weights, capacity_factor, "position", E)
    return top_k_index, top_k_weights, dropped


def matmul_rows(call) -> int:
    """The rows the backend's expert matmuls took, read off the traced tensors."""
    if call.backend == "eager":
        return sum(step.tensors["token_idx"].shape[0] for step in call.find("expert"))
    if call.backend == "batched_mm":
        return call["up_proj"].tensors["gate_up"].shape[0]
    if call.backend == "grouped_mm":
        return call["gather"].tensors["sorted_states"].shape[0]
    if call.backend == "capacity":
        return call["dispatch"].tensors["expert_inputs"].shape[:2].numel()
    return int(call["align"].tensors["padded_offsets"][-1])  # block_aligned: the groups' padded ends


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
@pytest.mark.parametrize("skew", [0.0, 1.0])
def test_rows_and_flops_are_what_each_backend_computes(skew, capacity_factor, monkeypatch):
    loop_flops = []
    original = grouped_matmul.looped_linear_into

    def counted(*args):
        with FlopCounterMode(display=False) as inner:
            out = original(*args)
        loop_flops.append(inner.get_total_flops())
        return out
    monkeypatch.setattr(grouped_matmul, "looped_linear_into", counted)
    top_k_index, top_k_weights, dropped = routing(skew=skew, capacity_factor=capacity_factor)
    table = waste_table(config(capacity_factor), top_k_index, dropped, training=True).set_index("backend")
    kept = int((~dropped).sum()) if dropped is not None else top_k_index.numel()
    x = torch.randn(top_k_index.shape[0], H, generator=torch.Generator().manual_seed(0))
    for backend in LAYOUTS:
        experts = SparseMoE(config(capacity_factor), backend, seed=0).experts.train()
        with moelab.inspect(experts) as trace:
            experts(x, top_k_index, top_k_weights, dropped)
        row = table.loc[backend]
        assert row["rows_computed"] == matmul_rows(trace.calls[0]), backend
        assert row["useful_pairs"] == kept and row["dropped_pairs"] == top_k_index.numel() - kept
        assert row["padding_rows"] == row["rows_computed"] - kept - row["dropped_rows_computed"]
        # FLOPs: torch's own counter over the real call; a grouped matmul runs as its torch.mm loop inside a custom
        # op, which the outer counter sees as one opaque op, so the loop gets a counter of its own
        with force_fallback(), FlopCounterMode(display=False) as counter:
            experts(x, top_k_index, top_k_weights, dropped)
        assert row["gflop_done"] * 1e9 == pytest.approx(counter.get_total_flops() + sum(loop_flops), rel=1e-12), \
            backend
        loop_flops.clear()
        assert row["gflop_useful"] * 1e9 == pytest.approx(6 * H * I * kept, rel=1e-12)


def test_capacity_and_block_aligned_padding_follow_their_definitions():
    """capacity: E rows of the largest group (dropless) or of C = ceil(f*T*k/E); block_aligned: groups rounded
    up to multiples of M, inside the static bound S + E*(M-1)."""
    top_k_index, _, _ = routing(num_tokens=100, skew=0.7)
    counts = torch.bincount(top_k_index.flatten(), minlength=E).tolist()
    row = waste_table(config(), top_k_index).set_index("backend")
    assert row.loc["capacity", "rows_computed"] == E * max(counts)
    padded = sum(-(-n // BLOCK_SIZE) * BLOCK_SIZE for n in counts)
    assert row.loc["block_aligned", "rows_computed"] == padded
    assert row.loc["block_aligned", "rows_allocated"] == 200 + E * (BLOCK_SIZE - 1)
    assert padded - 200 <= E * (BLOCK_SIZE - 1)
    top_k_index, weights, dropped = routing(num_tokens=100, skew=0.7, capacity_factor=1.25)
    row = waste_table(config(1.25), top_k_index, dropped, training=True).set_index("backend")
    assert row.loc["capacity", "rows_computed"] == E * math.ceil(1.25 * 100 * K / E)
    assert row.loc["batched_mm", "dropped_rows_computed"] == int(dropped.sum()) > 0


def test_a_perfectly_balanced_routing_wastes_nothing_but_block_padding():
    num_tokens = 4 * E  # token t takes experts (t*k + j) mod E: every expert gets T*k/E = 8 pairs
    top_k_index = (torch.arange(num_tokens)[:, None] * K + torch.arange(K)) % E
    table = waste_table(config(), top_k_index).set_index("backend")
    assert (table["rows_computed"].drop("block_aligned") == num_tokens * K).all()
    assert table.loc["block_aligned", "padding_rows"] == E * (BLOCK_SIZE - 8)
    one_hot = skewed_routing(num_tokens, E, K, 1.0)[0]  # expert 0 in every token: C = T
    assert waste_table(config(), one_hot).set_index("backend").loc["capacity", "rows_computed"] == E * num_tokens


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_measured_extra_memory_equals_the_analytic_model_to_the_byte(capacity_factor):
    """float32, every layout, dropless and with drops: the table's analytic and profiled peaks agree."""
    top_k_index, top_k_weights, dropped = routing(num_tokens=64, skew=0.6, capacity_factor=capacity_factor)
    table = waste_table(config(capacity_factor), top_k_index, dropped, training=True, measure=True,
                        top_k_weights=top_k_weights)
    assert (table["note"] == "").all()
    assert table["extra_memory_measured"].tolist() == table["extra_memory_analytic"].astype(float).tolist()


def test_the_traffic_model_reads_the_weights_each_layout_reads():
    top_k_index = torch.tensor([[0, 1], [1, 0], [0, 2]])  # experts 3..7 get nothing
    table = waste_table(config(), top_k_index).set_index("backend")
    expert = 3 * H * I * 4
    assert table.loc["grouped_mm", "weight_bytes_moved"] == table.loc["eager", "weight_bytes_moved"] == 3 * expert
    assert table.loc["capacity", "weight_bytes_moved"] == E * expert  # one bmm over every expert
    assert table.loc["batched_mm", "weight_bytes_moved"] == 3 * 6 * expert  # copy per pair: read, write, read
    assert (table["bytes_moved"] == table["weight_bytes_moved"] + table["activation_bytes_moved"]).all()


def test_auto_is_reported_as_the_backend_it_picks_and_marked_unmeasured_on_cpu():
    top_k_index, _, _ = routing()
    table = waste_table(config(), top_k_index, backends=["auto"])
    chosen = moelab.backends.auto.choose(top_k_index.numel(), torch.float32, "cpu", compiled=False,
                                         num_experts=E)[0]
    assert table["backend"].tolist() == [f"auto -> {chosen}"]
    if not torch.cuda.is_available():
        assert table["cuda_graphs"].tolist() == ["not measured here"]
    shown = format_waste(waste_table(config(), top_k_index))
    assert list(shown["backend"]) == list(LAYOUTS) and shown["extra memory (measured)"].eq("n/a").all()


def test_static_shapes_column():
    top_k_index, _, dropped = routing(capacity_factor=1.0)
    dropless = waste_table(config(1.0), top_k_index).set_index("backend")["static_shapes"]
    assert dropless.to_dict() == {"eager": False, "batched_mm": True, "grouped_mm": True, "capacity": False,
                                  "block_aligned": True}
    dropping = waste_table(config(1.0), top_k_index, dropped, training=True).set_index("backend")["static_shapes"]
    assert dropping["capacity"] and not dropping["grouped_mm"]


def test_waste_table_refuses_bad_input_with_the_argument_named():
    top_k_index, _, dropped = routing(capacity_factor=1.0)
    with pytest.raises(ValueError, match="top_k_index must be an integer tensor"):
        waste_table(config(), top_k_index[:, :1])
    with pytest.raises(ValueError, match=r"expert ids in \[0, 8\)"):
        waste_table(config(), top_k_index + E)
    with pytest.raises(ValueError, match="dropped must be None or a bool tensor"):
        waste_table(config(), top_k_index, dropped.int())
    with pytest.raises(ValueError, match="backends: no waste model for 'dense'"):
        waste_table(config(), top_k_index, backends=["dense"])
    with pytest.raises(ValueError, match="block_size must be an int >= 1"):
        waste_table(config(), top_k_index, block_size=0)
    with pytest.raises(ValueError, match="an expert keeps .* pairs but capacity_factor"):
        waste_table(config(0.25), top_k_index, torch.zeros_like(dropped), training=True)


def test_skewed_routing_goes_from_balanced_to_one_hot_expert():
    for skew in (0.0, 0.3, 1.0):
        top_k_index, top_k_weights = skewed_routing(4000, E, K, skew, seed=0)
        assert torch.equal(top_k_index, skewed_routing(4000, E, K, skew, seed=0)[0])  # seeded
        assert (top_k_index[:, 0] != top_k_index[:, 1]).all()  # a token's experts are distinct
        assert torch.allclose(top_k_weights.sum(1), torch.ones(4000)) and (top_k_weights[:, :-1] >=
                                                                           top_k_weights[:, 1:]).all()
        share = (top_k_index[:, 0] == 0).float().mean().item()
        assert share == pytest.approx(skew + (1 - skew) / E, abs=0.03)  # forced, or uniform among E
    with pytest.raises(ValueError, match=r"skew must be a number in \[0, 1\]"):
        skewed_routing(8, E, K, 1.5)
    with pytest.raises(ValueError, match="top_k .* must be at most num_experts"):
        skewed_routing(8, 2, 3)
    assert isinstance(waste_table(config(), skewed_routing(0, E, K)[0]), pd.DataFrame)  # no tokens: no waste
