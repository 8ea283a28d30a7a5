"""Expert parallelism (moelab.parallel): the steps on hand-made counts without processes, then 2 and 4 gloo ranks
on 127.0.0.1 against the single-process SparseMoE, every backend, outputs and all gradients.

One spawn per world size runs every case (`moelab.parallel.checks`; a spawn costs seconds); the launcher's own
timeout makes a hang fail instead of blocking CI.
"""

import time

import pytest
import torch
from torch import nn

from moelab import MoEConfig, SparseMoE
from moelab.parallel import (ExpertParallelMoE, RankError, expert_major_perm, expert_parallel,
                             init_process_group_from_env, inverse_perm, local_expert_ids, rank_major_perm, run_ranks,
                             send_counts, tokens_per_expert, unpermute_weigh_sum)
from moelab.parallel import checks
from moelab.parallel.launch import FAILURE_GRACE_S

SPAWN_TIMEOUT_S = 240  # far above a run here (about 20 s for 2 ranks, 35 s for 4 on 2 cores): only a hang hits it


# ------------------------------------------------------------------------------------------ steps, no processes

def test_counts_per_expert_and_per_destination_rank():
    top_k_index = torch.tensor([[3, 0], [1, 3], [0, 1], [3, 1]])  # T=4, k=2, E=4: expert 2 gets nothing
    counts = tokens_per_expert(top_k_index, 4)
    assert counts.tolist() == [2, 3, 0, 3]
    assert send_counts(counts, 2).tolist() == [5, 3]  # rank 0 holds experts 0-1, rank 1 experts 2-3
    assert send_counts(counts, 4).tolist() == [2, 3, 0, 3]
    dropped = torch.tensor([[False, True], [False, False], [False, False], [True, False]])
    assert tokens_per_expert(top_k_index, 4, dropped).tolist() == [1, 3, 0, 2]  # a dropped pair is not sent


def test_rank_major_perm_sorts_pairs_by_destination_and_leaves_out_drops():
    top_k_index = torch.tensor([[3, 0], [1, 3], [0, 1]])  # flat pairs 0..5 go to experts [3, 0, 1, 3, 0, 1]
    assert rank_major_perm(top_k_index).tolist() == [1, 4, 2, 5, 0, 3]  # experts 0, 0, 1, 1, 3, 3; stable
    dropped = torch.tensor([[False, True], [False, False], [True, False]])  # pairs 1 and 4
    assert rank_major_perm(top_k_index, dropped).tolist() == [2, 5, 0, 3]


def test_expert_major_perm_on_the_counts_2_3_1_4():
    received_counts = torch.tensor([[2, 3], [1, 4]])  # [ep=2 source ranks, L=2 local experts]
    # received rows: 0-1 rank 0 expert 0, 2-4 rank 0 expert 1, 5 rank 1 expert 0, 6-9 rank 1 expert 1
    perm = expert_major_perm(received_counts)
    assert perm.tolist() == [0, 1, 5, 2, 3, 4, 6, 7, 8, 9]
    assert local_expert_ids(received_counts).tolist() == [0, 0, 0] + [1] * 7
    inverse = inverse_perm(perm)
    assert inverse.tolist() == [0, 1, 3, 4, 5, 2, 6, 7, 8, 9]
    rows = torch.arange(10.0)
    assert torch.equal(rows[perm][inverse], rows)


@pytest.mark.parametrize("received_counts, expected", [
    ([[0, 3], [2, 0]], [3, 4, 0, 1, 2]),  # each local expert gets rows from one rank only
    ([[0, 0], [0, 0]], []),  # a rank that receives nothing
    ([[1], [2], [0], [3]], [0, 1, 2, 3, 4, 5]),  # L = 1: rank-major is already expert-major
    ([[1, 0, 2], [1, 0, 1]], [0, 3, 1, 2, 4]),  # a local expert nobody routes to
])
def test_expert_major_perm_with_zero_counts(received_counts, expected):
    counts = torch.tensor(received_counts)
    perm = expert_major_perm(counts)
    assert perm.tolist() == expected
    ids = local_expert_ids(counts)
    assert ids.tolist() == sorted(ids.tolist()) and torch.bincount(ids, minlength=counts.shape[1]).tolist() == \
        counts.sum(0).tolist()
    assert torch.equal(perm[inverse_perm(perm)], torch.arange(len(expected)))


def test_unpermute_weigh_sum_against_a_loop_and_at_no_tokens():
    generator = torch.Generator().manual_seed(0)
    top_k_index = torch.tensor([[2, 0], [1, 2], [0, 3]])
    top_k_weights = torch.rand(3, 2, generator=generator, dtype=torch.float64)
    dropped = torch.tensor([[False, False], [True, False], [False, False]])
    perm = rank_major_perm(top_k_index, dropped)  # [5]
    pair_outputs = torch.randn(perm.numel(), 4, generator=generator, dtype=torch.float64)  # as they come back
    expected = torch.zeros(3, 4, dtype=torch.float64)
    for row, pair in enumerate(perm.tolist()):
        expected[pair // 2] += top_k_weights[pair // 2, pair % 2] * pair_outputs[row]
    assert torch.allclose(unpermute_weigh_sum(pair_outputs, perm, top_k_weights), expected, rtol=0, atol=1e-15)
    empty = unpermute_weigh_sum(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0, 2))
    assert empty.shape == (0, 4)


def test_the_layer_needs_a_process_group_and_a_sparse_moe():
    moe = SparseMoE(MoEConfig(hidden_size=8, intermediate_size=4, num_experts=4, top_k=2), seed=0)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ExpertParallelMoE(moe)
    with pytest.raises(ValueError, match="moe must be a moelab.SparseMoE"):
        ExpertParallelMoE(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="contains no SparseMoE"):
        expert_parallel(nn.Sequential(nn.Linear(8, 8)))
    with pytest.raises(ValueError, match="itself a SparseMoE"):
        expert_parallel(moe)


def test_launcher_refuses_what_cannot_be_spawned_and_bad_arguments(monkeypatch):
    with pytest.raises(ValueError, match="notebook cell, a lambda"):
        run_ranks(lambda rank: rank, 2)
    with pytest.raises(ValueError, match="world_size must be an int >= 1"):
        run_ranks(checks.run_checks, 0)
    with pytest.raises(ValueError, match="timeout must be a positive"):
        run_ranks(checks.run_checks, 2, timeout=0)
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        init_process_group_from_env()


# --------------------------------------------------------------------------------------- 2 and 4 gloo processes

_RESULTS: dict[int, list] = {}


def _results(world_size: int) -> list[dict]:
    """Every case on `world_size` ranks, one spawn per world size for the whole module."""
    if world_size not in _RESULTS:
        _RESULTS[world_size] = run_ranks(checks.run_checks, world_size, timeout=SPAWN_TIMEOUT_S)
    return _RESULTS[world_size]


CASES = [(ws, name) for ws in (2, 4) for name in checks.default_cases(ws)]


@pytest.mark.parametrize("world_size, name", CASES, ids=[f"ep{ws}-{name}" for ws, name in CASES])
def test_expert_parallel_matches_the_single_process_layer(world_size, name):
    ranks = [result[name] for result in _results(world_size)]
    if name.startswith("error/"):  # a bad setup: the same clear ValueError on every rank, and no hang
        expected = "not divisible by the group size" if name.endswith("not_divisible") else "different MoE layers"
        assert all(r["error"] is not None and expected in r["error"] for r in ranks), ranks
        return
    tolerance = 1e-6 if name.startswith("float32") else 1e-12
    for rank, result in enumerate(ranks):
        bad = {key: value for key, value in result["diffs"].items() if not value <= tolerance}
        assert not bad, f"rank {rank}: {bad}"
    if name.startswith("model/"):
        assert all(r["ep_layers"] == r["layers"] == 2 and r["backends"] == ["grouped_mm"] for r in ranks)
        return
    if name.startswith("inspect_reset/"):  # one hooked call holding the EP steps around the backend's own
        for r in ranks:
            assert r["calls"] == 1 and {"route", "ep_permute", "ep_dispatch", "sort", "ep_combine",
                                        "ep_unpermute"} <= set(r["steps"]), r["steps"]
            assert r["steps"].index("ep_dispatch") < r["steps"].index("sort") < r["steps"].index("ep_combine")
        return
    # the routing really was what the case is named after, so no case passes on an easy routing
    assert sum(r["sent"] for r in ranks) == sum(r["received"] for r in ranks)
    assert "grad router.weight (all-reduced)" in ranks[0]["diffs"]
    kind = name.split("/")[0]
    if kind in ("uneven", "float32"):
        assert len({r["tokens"] for r in ranks}) == world_size and len({r["received"] for r in ranks}) > 1
    elif kind == "skewed":
        assert all(r["received"] == 0 for r in ranks[1:])  # every pair went to rank 0's experts
        assert ranks[0]["received"] == sum(r["sent"] for r in ranks) > 0
    elif kind == "empty_rank":
        assert ranks[1]["tokens"] == 0 and ranks[1]["received"] > 0
    elif kind == "capacity_drops":
        assert all(r["dropped"] > 0 for r in ranks)
    elif kind == "shared_topk_gt_local":
        assert ranks[0]["top_k"] > ranks[0]["local_experts"]
        assert any(key.startswith("grad shared_expert") for key in ranks[0]["diffs"])


def test_a_failing_rank_is_named_and_its_waiting_peer_is_killed():
    start = time.monotonic()
    with pytest.raises(RankError, match=r"rank 1 raised ValueError: rank 1 fails on purpose") as info:
        run_ranks(checks.fail_on_rank, 2, 1, timeout=SPAWN_TIMEOUT_S)
    message = str(info.value)
    assert message.index("rank 1 raised") < message.index("rank 0 ")  # the cause first, then its waiting peer
    # killed after the grace, not after the 60 s process-group timeout
    assert time.monotonic() - start < 45 + FAILURE_GRACE_S


def test_a_hang_past_the_timeout_is_killed_not_waited_for():
    start = time.monotonic()
    with pytest.raises(RankError, match=r"rank 0 was still running and was killed"):
        run_ranks(checks.hang, 2, timeout=2.0)
    assert time.monotonic() - start < 2.0 + 10.0
