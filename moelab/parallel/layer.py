"""`ExpertParallelMoE`: one MoE layer with its experts sharded over the ranks of a process group, and
`expert_parallel(model)`, which swaps every MoE layer of a model for one.

Rank r of an ep-rank group holds the L = E / ep experts `r*L ... (r+1)*L - 1`; the router (and the shared expert,
if any) is replicated. One forward on a rank's own T tokens (letters as in `moelab.parallel.steps`):

    route -> count pairs per expert -> exchange counts -> permute rank-major -> dispatch (all-to-all) ->
    rank-major to expert-major -> local experts (any backend) -> reverse permutation -> combine (all-to-all) ->
    unpermute, weigh, sum (+ shared expert)

Every rank must call forward (and backward) the same number of times, as with any collective.
"""

from __future__ import annotations

import copy
import dataclasses
import time

import torch
import torch.distributed as dist
from torch import nn

from ..core.steps import is_recording, record_step
from ..layer.experts import Experts
from ..layer.moe import SparseMoE
from ..layer.router import RouterOutput
from .all_to_all import all_to_all, exchange_counts
from .steps import (expert_major_perm, inverse_perm, local_expert_ids, rank_major_perm, send_counts,
                    tokens_per_expert, unpermute_weigh_sum)

# what every rank must agree on, checked with one all_gather when a layer is built
FINGERPRINT = ("num_experts", "top_k", "hidden_size", "intermediate_size", "shared_expert_intermediate_size",
               "group size", "router weights (sum)", "expert weights (sum)")


def group_rank_and_size(group) -> tuple[int, int]:
    """(rank, ep) of this process in `group` (None: the default group); a clear error before init."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("expert parallelism needs a process group: call torch.distributed.init_process_group "
                           "first (moelab.parallel.run_ranks does it for you; under torchrun, "
                           "moelab.parallel.init_process_group_from_env())")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of `group`; build the layer on the group's ranks only")
    return rank, dist.get_world_size(group)


class ExpertParallelMoE(SparseMoE):
    """A `SparseMoE` whose experts are split over the ranks of `group`; `forward` on a rank's tokens returns what
    the full layer `moe` returns on them (with `return_router_output`, the same `RouterOutput`).

    Built from a full `SparseMoE` with the same weights on every rank (e.g. the same seed; checked). Keeps a copy of
    the router and the shared expert, and its own experts as `.experts.gate_up_proj [L, 2I, H]` and
    `.experts.down_proj [L, H, I]`, L = E / ep. The local `Experts` module is built dropless with top_k 1: it runs
    each received row once, with weight 1, so it never needs top_k <= L and every registered backend runs it. With
    capacity, each rank drops on its own tokens before the dispatch (Megatron, DeepSpeed), as `moe` does on them;
    dropped pairs are not sent. `set_experts_implementation` switches the local experts' backend.
    """

    def __init__(self, moe: SparseMoE, group=None):
        if not isinstance(moe, SparseMoE) or isinstance(moe, ExpertParallelMoE):
            raise ValueError(f"moe must be a moelab.SparseMoE that is not already expert-parallel, "
                             f"got {type(moe).__name__}")
        rank, ep = group_rank_and_size(group)
        config = moe.config
        E = config.num_experts
        if E % ep:  # checked on every rank before any collective, so no rank waits for the others
            raise ValueError(f"num_experts = {E} is not divisible by the group size ep = {ep}: each rank must hold "
                             f"the same number of experts (E % ep == 0)")
        nn.Module.__init__(self)  # not SparseMoE.__init__: it would allocate all E experts again
        self.config = config
        self.group = group
        self.ep_rank, self.ep_size = rank, ep
        self.num_local_experts = L = E // ep
        self.router = _copy_module(moe.router)
        # NOTE: the local module routes each received row to one local expert with weight 1: top_k 1, dropless
        # (the drops happened on the sending rank)
        local_config = dataclasses.replace(config, num_experts=L, top_k=1, capacity_factor=None,
                                           eval_capacity_factor=None, shared_expert_intermediate_size=0)
        weight = moe.experts.gate_up_proj
        self.experts = Experts(local_config, moe.get_experts_implementation(), dtype=weight.dtype,
                               device=weight.device)
        with torch.no_grad():
            self.experts.gate_up_proj.copy_(moe.experts.gate_up_proj[rank * L:(rank + 1) * L])
            self.experts.down_proj.copy_(moe.experts.down_proj[rank * L:(rank + 1) * L])
        self.experts.gate_up_proj.requires_grad_(moe.experts.gate_up_proj.requires_grad)
        self.experts.down_proj.requires_grad_(moe.experts.down_proj.requires_grad)
        self.shared_expert = _copy_module(moe.shared_expert)
        self.shared_expert_gate = _copy_module(moe.shared_expert_gate)
        self.train(moe.training)
        # time the phases into `last_phases` without an inspection (moelab.parallel.bench); off by default
        self.time_phases = False
        self.last_phases: dict[str, dict] = {}
        self._check_agreement(moe)

    @torch.no_grad()
    def _check_agreement(self, moe: SparseMoE) -> None:
        """One all_gather of the config and weight sums: a rank that differs is a ValueError on every rank."""
        c = self.config
        mine = torch.tensor([c.num_experts, c.top_k, c.hidden_size, c.intermediate_size,
                             c.shared_expert_intermediate_size, self.ep_size,
                             float(moe.router.weight.double().sum()),
                             float(moe.experts.gate_up_proj.double().sum() + moe.experts.down_proj.double().sum())],
                            dtype=torch.float64, device=moe.router.weight.device)
        everyone = [torch.empty_like(mine) for _ in range(self.ep_size)]
        dist.all_gather(everyone, mine, group=self.group)
        everyone = torch.stack(everyone).cpu()  # [ep, fields]
        differ = ~torch.isclose(everyone, everyone[0:1], rtol=1e-9, atol=0.0).all(dim=0)  # [fields]
        if differ.any():
            fields = [f"{FINGERPRINT[i]}: {everyone[:, i].tolist()}" for i in differ.nonzero().flatten().tolist()]
            raise ValueError("the ranks were given different MoE layers (same config and the same weights on every "
                             "rank are needed, e.g. the same seed); per rank, " + "; ".join(fields))

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """The init of the full layer under `seed`, of which this rank keeps its experts' slice."""
        generator = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        E, L, r = self.config.num_experts, self.num_local_experts, self.ep_rank
        full = {"gate_up_proj": (E, *self.experts.gate_up_proj.shape[1:]),
                "down_proj": (E, *self.experts.down_proj.shape[1:])}

        def draw(shape):  # the draws of SparseMoE.reset_parameters, in its order
            return torch.empty(shape, dtype=torch.float32).normal_(0.0, self.config.initializer_range,
                                                                    generator=generator)
        self.router.weight.copy_(draw(self.router.weight.shape))
        for name, shape in full.items():
            getattr(self.experts, name).copy_(draw(shape)[r * L:(r + 1) * L])
        if self.shared_expert is not None:
            for param in [*self.shared_expert.parameters(), self.shared_expert_gate.weight]:
                param.copy_(draw(param.shape))

    def routed_experts(self, flat: torch.Tensor, routing: RouterOutput) -> torch.Tensor:
        """flat [T, H] (this rank's tokens) -> their routed output [T, H], through the experts of every rank.
        The rest of `SparseMoE.forward` (checks, router, shared expert) runs unchanged on each rank."""
        dropped = routing.dropped if self.router.has_capacity() else None  # [T, k] or None
        routed = self.dispatch_experts_combine(flat, routing.top_k_index, routing.top_k_weights, dropped)
        return routed.to(flat.dtype)

    def dispatch_experts_combine(self, flat, top_k_index, top_k_weights, dropped=None) -> torch.Tensor:
        """flat [T, H], top_k_index [T, k], top_k_weights [T, k], dropped None or [T, k] -> routed output [T, H].

        While `moelab.inspect` listens, each of the five phases (permute, dispatch, experts, combine, unpermute)
        is timed with `time.perf_counter` and its step carries what `moelab.parallel.watch` reads: `seconds`,
        `start` (perf_counter at the phase's start: one clock for every process of a machine), the rows sent to
        and received from each rank, and the bytes that leave and reach this rank. The exchange of the counts is
        part of the dispatch phase (it is communication too). With `time_phases = True` the same figures land in
        `last_phases` (phase -> dict) without an inspection, which would change what it times: a backend skips its
        workspace while recording. Neither: no clock is read.
        """
        E, ep, k, r = self.config.num_experts, self.ep_size, top_k_index.shape[1], self.ep_rank
        clock = PhaseClock(self.time_phases or is_recording(), flat.device)
        phases = {}  # phase -> its figures, kept only while the clock runs
        counts = tokens_per_expert(top_k_index, E, dropped)  # [E], kept pairs of this rank's tokens
        perm = rank_major_perm(top_k_index, dropped)  # [S_kept]
        send_rows = flat.index_select(0, perm // k)  # [S_kept, H]: pair s is token s // k
        input_splits = send_counts(counts, ep).tolist()  # [ep]: rows to each rank (a host sync: see below)
        seconds, start = clock.stop()
        row_bytes = flat.shape[1] * flat.element_size()  # H * element size: one pair row on the wire
        clock.keep(phases, "permute", seconds=seconds, start=start)
        record_step("ep_permute", "Each kept pair's token row, sorted by expert: rank-major, since every rank holds "
                    "a contiguous block of experts; dropped pairs are not sent.", perm=perm, counts=counts,
                    send_rows=send_rows, seconds=seconds, start=start,
                    derived={"send_counts": lambda: torch.tensor(input_splits)})
        clock.start()
        received_counts = exchange_counts(counts, self.group)  # [ep, L]
        # NOTE: the splits are Python ints (a host sync): all_to_all_single sizes its buffers from them
        output_splits = received_counts.sum(dim=1).tolist()  # [ep]: rows from each rank
        received = all_to_all(send_rows, output_splits, input_splits, self.group)  # [N, H], rank-major
        seconds, start = clock.stop()
        # measured on the tensors themselves: the rows that really left (and reached) this rank, self excluded
        traffic = dict(rows_sent=list(input_splits), rows_received=list(output_splits),
                       bytes_sent=send_rows.nbytes - input_splits[r] * row_bytes,
                       bytes_received=received.nbytes - output_splits[r] * row_bytes, seconds=seconds, start=start)
        clock.keep(phases, "dispatch", **traffic)
        record_step("ep_dispatch", "All-to-all: each rank sends every pair row to the rank holding its expert "
                    "(uneven splits).", received=received, received_counts=received_counts, **traffic)
        clock.start()
        order = expert_major_perm(received_counts)  # [N]
        expert_rows = received.index_select(0, order)  # [N, H], expert-major
        local_ids = local_expert_ids(received_counts).unsqueeze(1)  # [N, 1]
        ones = expert_rows.new_ones(local_ids.shape)  # [N, 1]: the router weight is applied back home
        expert_outputs = self.experts(expert_rows, local_ids, ones)  # [N, H]
        if not expert_outputs.numel() and torch.is_grad_enabled():
            # NOTE: a rank that received nothing must still take part in both backward exchanges, so its (empty)
            # output stays in the graph of its inputs and weights, whatever the backend returned
            inputs = (expert_rows, self.experts.gate_up_proj, self.experts.down_proj)
            expert_outputs = expert_outputs + sum(t.sum() for t in inputs if t.requires_grad) * 0
        back = expert_outputs.index_select(0, inverse_perm(order))  # [N, H], rank-major again
        seconds, start = clock.stop()
        clock.keep(phases, "experts", seconds=seconds, start=start)
        record_step("ep_experts", lambda: f"The {len(order)} rows received, reordered expert-major, through this "
                    f"rank's {self.num_local_experts} experts, and their outputs back in rank-major order for the "
                    f"return trip.", back=back, seconds=seconds, start=start)
        clock.start()
        returned = all_to_all(back, input_splits, output_splits, self.group)  # [S_kept, H], in perm order
        seconds, start = clock.stop()
        traffic = dict(rows_sent=list(output_splits), rows_received=list(input_splits),
                       bytes_sent=back.nbytes - output_splits[r] * row_bytes,
                       bytes_received=returned.nbytes - input_splits[r] * row_bytes, seconds=seconds, start=start)
        clock.keep(phases, "combine", **traffic)
        record_step("ep_combine", "All-to-all back: every expert output returns to the rank of its token.",
                    returned=returned, **traffic)
        clock.start()
        output = unpermute_weigh_sum(returned, perm, top_k_weights)  # [T, H]
        seconds, start = clock.stop()
        clock.keep(phases, "unpermute", seconds=seconds, start=start)
        if clock.on:
            self.last_phases = phases
        record_step("ep_unpermute", "Each output back in its pair's place, weighed by the router weight and summed "
                    "over the token's k experts.", output=output, seconds=seconds, start=start)
        return output

    def extra_repr(self) -> str:
        L, r = self.num_local_experts, self.ep_rank
        return f"ep_rank={r}, ep_size={self.ep_size}, experts {r * L}..{(r + 1) * L - 1} of {self.config.num_experts}"


class PhaseClock:
    """Times the phases of one forward with `time.perf_counter`, only when `on` (an inspection listens): off, it
    reads no clock and `stop()` returns (None, None). On CUDA it synchronises before each reading, so a phase's
    time is its kernels' and not the launch's. `stop()` ends a phase, `start()` begins the next one after the
    step was recorded, so the recording itself is in no phase."""

    def __init__(self, on: bool, device: torch.device):
        self.on = on
        self.sync = on and device.type == "cuda"
        self.device = device
        self.began = None
        self.start()

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self) -> None:
        if self.on:
            self.began = self._now()

    def stop(self) -> tuple[float | None, float | None]:
        """(seconds since `start`, perf_counter at `start`), or (None, None) when off."""
        if not self.on:
            return None, None
        return self._now() - self.began, self.began

    def keep(self, phases: dict, name: str, **figures) -> None:
        if self.on:
            phases[name] = figures


def _copy_module(module: nn.Module | None) -> nn.Module | None:
    """A copy with its own parameters (the full layer stays untouched), or None."""
    return None if module is None else copy.deepcopy(module)


def expert_parallel(model: nn.Module, group=None) -> nn.Module:
    """Swap every `SparseMoE` inside `model` for an `ExpertParallelMoE` over `group`, in place; returns `model`.

    Every rank must hold the same model (same weights). All layers are built before any is swapped, so an error
    (E not divisible by ep, ranks that disagree) leaves the model as it was.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, SparseMoE):
        raise ValueError("model is itself a SparseMoE, which cannot be swapped in place; use "
                         "ExpertParallelMoE(moe, group) and keep the result")
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, SparseMoE) and not isinstance(module, ExpertParallelMoE)]
    found = [(name, module) for name, module in found  # a SparseMoE nested in another one is its parent's business
             if not any(name.startswith(other + ".") for other, _ in found)]
    if not found:
        raise ValueError(f"{type(model).__name__} contains no SparseMoE layer to make expert-parallel")
    replacements = [(name, ExpertParallelMoE(module, group)) for name, module in found]  # same order on every rank
    for name, layer in replacements:
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attribute, layer)
    return model
