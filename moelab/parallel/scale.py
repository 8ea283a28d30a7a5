"""Expert parallelism at scale, on paper: an analytic model of one MoE layer's traffic and compute under EP.

For one layer, T tokens per rank, top-k, hidden size H, expert intermediate size I, E experts over ep ranks, b
bytes per element on the wire:

    pairs a rank sends           T * k  (every kept (token, expert) pair is one row of H elements)
    pairs that leave their rank  T * k * (ep - 1) / ep   with uniform routing (an expert is on my rank w.p. 1/ep)
    bytes per token              2 * k * (ep - 1) / ep * H * b   dispatch (H out) + combine (H back)
    expert FLOPs per pair        2 * 3 * H * I   the gate, up and down projections, 2 FLOPs a multiply-add
    imbalance                    max over ranks / mean of the pairs a rank receives (1 = balanced, ep = all on one)

The busiest rank sets the pace of both the all-to-alls and the experts (everyone waits for it), so this model
prices that rank: it receives `imbalance * T * k` pairs, of which the fraction (ep - 1) / ep from other ranks, and
sends as many back. Communication time = its dispatch + combine bytes / the link bandwidth (each direction of a
full-duplex link at the given GB/s, the larger of sent and received per exchange); compute time = its FLOPs / the
FLOP rate. No overlap is assumed (`total_ms`); perfect overlap would give the larger of the two (`overlapped_ms`).

What it leaves out, on purpose: the counts exchange (E integers), latency, the router and attention, and
hierarchical links (DeepSeek-V3 limits each token to 4 nodes so that most of its traffic rides NVLink, not
InfiniBand). Note that with balanced routing the ratio comm / compute does not depend on T:
(ep - 1) / ep * 2 * b * FLOP rate / (6 * I * bandwidth) -- a narrow expert (small I) is the one that needs fast links.

`exchange_bytes(send_matrix, ...)` prices an actual routing the same way, and equals the bytes `ExpertParallelMoE`
records (`moelab.parallel.watch`); `send_matrix_from_routing` gives that matrix from each rank's top_k_index.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..core.config import check_float, check_int


@dataclass(frozen=True)
class EPPreset:
    """A published MoE layer and an EP degree to price it at. bytes_per_element: on the wire (2 = bf16);
    shared_intermediate_size: the total width of the shared expert(s) every token also runs on its own rank."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_experts: int
    top_k: int
    ep: int
    bytes_per_element: int = 2
    shared_intermediate_size: int = 0
    source: str = ""


PRESETS = {
    # DeepSeek-V3 (arXiv 2412.19437, and config.json of deepseek-ai/DeepSeek-V3): hidden_size 7168,
    # moe_intermediate_size 2048, n_routed_experts 256, n_shared_experts 1 (of width 2048), num_experts_per_tok 8;
    # trained with 64-way expert parallelism over 8 nodes (EP64). The report dispatches in FP8 and combines in
    # BF16; priced here in bf16 both ways (set bytes_per_element=1 for an FP8 dispatch's lower bound).
    "DeepSeek-V3": EPPreset("DeepSeek-V3", hidden_size=7168, intermediate_size=2048, num_experts=256, top_k=8,
                            ep=64, bytes_per_element=2, shared_intermediate_size=2048,
                            source="DeepSeek-V3 technical report (arXiv 2412.19437); config.json"),
    # Mixtral 8x7B (arXiv 2401.04088, and config.json of mistralai/Mixtral-8x7B-v0.1): hidden_size 4096,
    # intermediate_size 14336, num_local_experts 8, num_experts_per_tok 2. No EP degree is published: ep = 8
    # (one expert per rank) is this preset's choice, not Mistral's.
    "Mixtral-8x7B": EPPreset("Mixtral-8x7B", hidden_size=4096, intermediate_size=14336, num_experts=8, top_k=2,
                             ep=8, bytes_per_element=2,
                             source="Mixtral of Experts (arXiv 2401.04088); config.json; ep = 8 chosen here"),
}

# Illustrative hardware, not measurements: ~50 GB/s is one 400 Gb/s InfiniBand NIC per GPU, ~450 GB/s one direction
# of an H100's NVLink; 400 TFLOP/s is a bf16 rate a well-fed H100 GEMM can sustain (its dense peak is ~990).
DEFAULT_BANDWIDTHS_GBS = (50.0, 450.0)
DEFAULT_TFLOPS = 400.0
DEFAULT_TOKENS_PER_RANK = 4096


def off_rank_fraction(ep: int) -> float:
    """The share of a rank's pairs that leave it with uniform routing: (ep - 1) / ep."""
    check_int("ep", ep, 1)
    return (ep - 1) / ep


def bytes_per_token(hidden_size: int, top_k: int, ep: int, bytes_per_element: int = 2) -> float:
    """Dispatch + combine bytes one token sends with uniform routing: 2 * k * (ep - 1) / ep * H * b."""
    check_int("hidden_size", hidden_size, 1)
    check_int("top_k", top_k, 1)
    check_int("bytes_per_element", bytes_per_element, 1)
    return 2 * top_k * off_rank_fraction(ep) * hidden_size * bytes_per_element


def flops_per_pair(hidden_size: int, intermediate_size: int) -> int:
    """One (token, expert) pair through a gated MLP: 2 * 3 * H * I (gate, up, down; a multiply-add is 2 FLOPs)."""
    check_int("hidden_size", hidden_size, 1)
    check_int("intermediate_size", intermediate_size, 1)
    return 2 * 3 * hidden_size * intermediate_size


def imbalance_from_counts(tokens_per_expert, ep: int) -> float:
    """tokens_per_expert [E] (pairs per expert, all ranks' tokens) -> max / mean of the pairs each rank's contiguous
    block of E / ep experts receives (1.0 when nothing is routed)."""
    counts = np.asarray(tokens_per_expert.tolist() if isinstance(tokens_per_expert, torch.Tensor)
                        else tokens_per_expert, dtype=np.float64)
    check_int("ep", ep, 1)
    if counts.ndim != 1 or counts.size % ep:
        raise ValueError(f"tokens_per_expert must be one count per expert, a multiple of ep = {ep} of them, "
                         f"got shape {counts.shape}")
    per_rank = counts.reshape(ep, -1).sum(axis=1)  # [ep]
    return float(per_rank.max() / per_rank.mean()) if per_rank.sum() else 1.0


def send_matrix_from_routing(top_k_indices, num_experts: int, dropped=None) -> np.ndarray:
    """[top_k_index of rank 0, of rank 1, ...] ([T_r, k] each) -> the send matrix [ep, ep]: pairs of rank i's tokens
    whose expert lives on rank j (contiguous blocks of E / ep experts). dropped: None or one [T_r, k] bool per
    rank; a dropped pair is not sent."""
    ep = len(top_k_indices)
    check_int("num_experts", num_experts, 1)
    if not ep or num_experts % ep:
        raise ValueError(f"num_experts = {num_experts} must be divisible by the number of ranks, {ep}")
    matrix = np.zeros((ep, ep), dtype=np.int64)
    for i, index in enumerate(top_k_indices):
        experts = torch.as_tensor(index).reshape(-1)
        if dropped is not None:
            experts = experts[~torch.as_tensor(dropped[i]).reshape(-1)]
        matrix[i] = torch.bincount(experts // (num_experts // ep), minlength=ep).numpy()
    return matrix


def exchange_bytes(send_matrix, hidden_size: int, bytes_per_element: int) -> pd.DataFrame:
    """Per rank, the bytes of an actual routing: dispatch sent = its off-diagonal row x H x b, dispatch received =
    its off-diagonal column x H x b; the combine sends back what the dispatch received, and vice versa."""
    matrix = np.asarray(send_matrix, dtype=np.int64)
    off = matrix - np.diag(np.diag(matrix))  # the diagonal never leaves its rank
    row = hidden_size * bytes_per_element
    return pd.DataFrame({"rank": np.arange(len(matrix)), "dispatch_bytes_sent": off.sum(axis=1) * row,
                         "dispatch_bytes_received": off.sum(axis=0) * row,
                         "combine_bytes_sent": off.sum(axis=0) * row, "combine_bytes_received": off.sum(axis=1) * row})


def layer_cost(hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, ep: int, *,
               tokens_per_rank: int = DEFAULT_TOKENS_PER_RANK, bytes_per_element: int = 2,
               shared_intermediate_size: int = 0, imbalance: float | None = None, tokens_per_expert=None,
               bandwidth_gbs: float = DEFAULT_BANDWIDTHS_GBS[0], tflops: float = DEFAULT_TFLOPS) -> dict:
    """The model of the module docstring for one layer; returns a dict of plain numbers.

    imbalance: max / mean pairs per rank (1 = balanced); or give `tokens_per_expert` [E] and it is computed
    (`imbalance_from_counts`); neither: 1. bandwidth_gbs: GB/s (1e9 bytes) per direction of a rank's link;
    tflops: the FLOP rate of a rank in TFLOP/s (1e12).
    Keys: the inputs, pairs_per_rank, busiest_rank_pairs, bytes_per_token, comm_bytes (the busiest rank's, per
    exchange direction summed over dispatch and combine), flops (its experts + its shared expert), comm_ms,
    compute_ms, total_ms (no overlap), overlapped_ms (perfect overlap), comm_over_compute, dominates.
    """
    for name, value, low in (("hidden_size", hidden_size, 1), ("intermediate_size", intermediate_size, 1),
                             ("num_experts", num_experts, 1), ("ep", ep, 1), ("tokens_per_rank", tokens_per_rank, 0),
                             ("bytes_per_element", bytes_per_element, 1),
                             ("shared_intermediate_size", shared_intermediate_size, 0)):
        check_int(name, value, low)
    check_int("top_k", top_k, 1, num_experts, "num_experts")
    if num_experts % ep:
        raise ValueError(f"num_experts = {num_experts} is not divisible by ep = {ep}: every rank holds E / ep experts")
    check_float("bandwidth_gbs", bandwidth_gbs)
    check_float("tflops", tflops)
    if imbalance is not None and tokens_per_expert is not None:
        raise ValueError("give imbalance or tokens_per_expert, not both")
    if tokens_per_expert is not None:
        imbalance = imbalance_from_counts(tokens_per_expert, ep)
    imbalance = 1.0 if imbalance is None else imbalance
    check_float("imbalance", imbalance, 1.0, inclusive=True)
    if imbalance > ep + 1e-9:
        raise ValueError(f"imbalance must be in [1, ep = {ep}] (max / mean of {ep} ranks' pairs is at most {ep}), "
                         f"got {imbalance!r}")
    pairs = tokens_per_rank * top_k  # the mean rank receives as many pairs as its tokens make
    busiest = imbalance * pairs
    row = hidden_size * bytes_per_element
    # per exchange, the busiest rank's link carries the larger of what it sends (pairs) and receives (busiest)
    comm_bytes = 2 * max(busiest, pairs) * off_rank_fraction(ep) * row
    flops = busiest * flops_per_pair(hidden_size, intermediate_size) \
        + tokens_per_rank * 6 * hidden_size * shared_intermediate_size  # the shared expert: every token, at home
    comm_ms = comm_bytes / (bandwidth_gbs * 1e9) * 1e3
    compute_ms = flops / (tflops * 1e12) * 1e3
    ratio = comm_ms / compute_ms if compute_ms else float("inf") if comm_ms else float("nan")
    return {"hidden_size": hidden_size, "intermediate_size": intermediate_size, "num_experts": num_experts,
            "top_k": top_k, "ep": ep, "tokens_per_rank": tokens_per_rank, "bytes_per_element": bytes_per_element,
            "imbalance": float(imbalance), "bandwidth_gbs": float(bandwidth_gbs), "tflops": float(tflops),
            "pairs_per_rank": pairs, "busiest_rank_pairs": busiest,
            "bytes_per_token": bytes_per_token(hidden_size, top_k, ep, bytes_per_element),
            "comm_bytes": comm_bytes, "flops": flops, "comm_ms": comm_ms, "compute_ms": compute_ms,
            "total_ms": comm_ms + compute_ms, "overlapped_ms": max(comm_ms, compute_ms),
            "comm_over_compute": ratio, "dominates": "communication" if comm_ms > compute_ms else "compute"}


def preset_cost(preset: str | EPPreset, **overrides) -> dict:
    """`layer_cost` of a named preset (`PRESETS`); keyword overrides (ep, bandwidth_gbs, tflops, imbalance,
    tokens_per_rank, bytes_per_element, ...) replace its values."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {list(PRESETS)} or an EPPreset, got {preset!r}")
        preset = PRESETS[preset]
    if not isinstance(preset, EPPreset):
        raise ValueError(f"preset must be one of {list(PRESETS)} or an EPPreset, got {type(preset).__name__}")
    values = {"hidden_size": preset.hidden_size, "intermediate_size": preset.intermediate_size,
              "num_experts": preset.num_experts, "top_k": preset.top_k, "ep": preset.ep,
              "bytes_per_element": preset.bytes_per_element,
              "shared_intermediate_size": preset.shared_intermediate_size}
    values.update(overrides)
    sizes = {k: values.pop(k) for k in ("hidden_size", "intermediate_size", "num_experts", "top_k", "ep")}
    return {"preset": preset.name, **layer_cost(**sizes, **values)}


def scale_table(presets=None, *, bandwidths_gbs=DEFAULT_BANDWIDTHS_GBS, tflops: float = DEFAULT_TFLOPS,
                tokens_per_rank: int = DEFAULT_TOKENS_PER_RANK, imbalance: float = 1.0) -> pd.DataFrame:
    """One row per (preset, bandwidth): the preset's sizes and EP degree, bytes per token, the busiest rank's
    communication and compute times (ms) and which dominates. presets: names or EPPresets (default: all)."""
    presets = list(PRESETS) if presets is None else list(presets)
    rows = [preset_cost(p, bandwidth_gbs=float(b), tflops=tflops, tokens_per_rank=tokens_per_rank,
                        imbalance=imbalance) for p in presets for b in bandwidths_gbs]
    columns = ["preset", "hidden_size", "intermediate_size", "num_experts", "top_k", "ep", "tokens_per_rank",
               "imbalance", "bandwidth_gbs", "tflops", "bytes_per_token", "comm_ms", "compute_ms",
               "comm_over_compute", "dominates"]
    return pd.DataFrame(rows)[columns]
