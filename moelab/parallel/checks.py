"""The exactness checks of expert parallelism, run on every rank of a group (tests, notebooks, torchrun).

`run_checks(rank, cases)` runs each named case in order on every rank (so the collectives line up) and returns,
per case, the largest differences from the single-process `SparseMoE` and what the routing did (rows received,
pairs dropped). The reference is computed on every rank from every rank's inputs, drawn from one seed: the full
layer on the global batch (all ranks' tokens concatenated), or on each rank's tokens in turn where capacity makes
the drops depend on the call. Each rank's loss is `sum(output * probe)` over its own tokens, so the sharded expert
gradient of rank r must equal slice r of the reference's, the router's (all-reduced) the reference's.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.distributed as dist

from ..core.config import MoEConfig
from ..inspection import inspect
from ..models import MoEForCausalLM, MoEModelConfig
from ..layer.moe import SparseMoE
from .layer import ExpertParallelMoE, expert_parallel

BACKENDS = ("eager", "batched_mm", "grouped_mm", "capacity", "block_aligned")  # every built-in layout


def _max_diff(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")  # a missing gradient is a failure, not a pass
    if a.shape != b.shape:
        return float("inf")
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def _inputs(world_size, config, tokens, skew, dtype, seed):
    """Every rank's hidden states and loss probe (same draws on every rank), and the skew direction."""
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(config.hidden_size, generator=generator, dtype=torch.float64)
    direction = direction / direction.norm()
    xs, probes = [], []
    for rank in range(world_size):
        x = torch.randn(tokens[rank], config.hidden_size, generator=generator, dtype=torch.float64)
        xs.append((x + skew * direction).to(dtype))  # [T_r, H]
        probes.append(torch.randn(tokens[rank], config.hidden_size, generator=generator, dtype=torch.float64).to(dtype))
    return xs, probes, direction


def compare_layer(rank, world_size, config: MoEConfig, backend: str, tokens, *, skew=0.0, training=False,
                  dtype=torch.float64, seed=0, batched=False) -> dict:
    """One case: `ExpertParallelMoE` on this rank's tokens against the full layer (see the module docstring)."""
    moe = SparseMoE(config, "grouped_mm", dtype=dtype, seed=seed)
    xs, probes, direction = _inputs(world_size, config, tokens, skew, dtype, seed + 1)
    if skew:  # the first two experts (rank 0's) attract every token: other ranks may receive nothing
        with torch.no_grad():
            moe.router.weight[:2] += (skew / 2) * direction.to(dtype)
    moe.train(training)
    layer = ExpertParallelMoE(moe, group=None)
    layer.set_experts_implementation(backend)  # through SparseMoE's API: the local experts switch
    moe.set_experts_implementation(backend)

    x = xs[rank].clone().requires_grad_(True)
    shaped = x.view(2, -1, config.hidden_size) if batched else x  # [B, S, H] too
    output, routing = layer(shaped, return_router_output=True)
    (output.reshape(x.shape) * probes[rank]).sum().backward()

    global_batch = not (training and config.capacity_factor is not None)  # dropless: one call on every token
    ref_xs = [xi.clone().requires_grad_(True) for xi in xs]
    if global_batch:
        ref_out, ref_routing = moe(torch.cat(ref_xs), return_router_output=True)  # [sum T, H]
        (ref_out * torch.cat(probes)).sum().backward()
        start = sum(tokens[:rank])
        ref_out, ref_index = ref_out[start:start + tokens[rank]], ref_routing.top_k_index[start:start + tokens[rank]]
        ref_weights = ref_routing.top_k_weights[start:start + tokens[rank]]
        ref_dropped = ref_routing.dropped[start:start + tokens[rank]]
    else:  # capacity: each rank's call drops on its own tokens
        for q in range(world_size):
            out_q, routing_q = moe(ref_xs[q], return_router_output=True)
            (out_q * probes[q]).sum().backward()
            if q == rank:
                ref_out, ref_index = out_q, routing_q.top_k_index
                ref_weights, ref_dropped = routing_q.top_k_weights, routing_q.dropped

    L = config.num_experts // world_size
    mine = slice(rank * L, (rank + 1) * L)
    replicated = {name: (param, moe.get_parameter(name).grad) for name, param in layer.named_parameters()
                  if name == "router.weight" or name.startswith("shared_expert")}
    diffs = {
        "output": _max_diff(output.reshape(x.shape), ref_out),
        "top_k_index": _max_diff(routing.top_k_index, ref_index),
        "top_k_weights": _max_diff(routing.top_k_weights, ref_weights),
        "dropped": _max_diff(routing.dropped, ref_dropped),
        "grad hidden_states": _max_diff(x.grad, ref_xs[rank].grad),
        "grad gate_up_proj": _max_diff(layer.experts.gate_up_proj.grad, moe.experts.gate_up_proj.grad[mine]),
        "grad down_proj": _max_diff(layer.experts.down_proj.grad, moe.experts.down_proj.grad[mine]),
    }
    for name, (param, ref_grad) in replicated.items():  # each rank has its tokens' share: summed, as DDP would
        total = torch.zeros_like(param) if param.grad is None else param.grad.clone()  # every rank all-reduces
        dist.all_reduce(total)
        diffs[f"grad {name} (all-reduced)"] = _max_diff(total, ref_grad) if param.grad is not None else float("inf")
    kept = ~routing.dropped
    counts = torch.bincount(routing.top_k_index[kept], minlength=config.num_experts)  # [E]
    everyone = [torch.empty_like(counts) for _ in range(world_size)]
    dist.all_gather(everyone, counts)
    received = int(torch.stack(everyone)[:, mine].sum())  # rows this rank's experts received
    return {"diffs": diffs, "tokens": tokens[rank], "received": received, "sent": int(kept.sum()),
            "dropped": int(routing.dropped.sum()), "local_experts": L, "top_k": config.top_k}


def expected_error(rank, world_size, case: str) -> dict:
    """A bad setup: returns the ValueError this rank raised (None if it raised nothing)."""
    if case == "not_divisible":
        moe = SparseMoE(MoEConfig(hidden_size=8, intermediate_size=4, num_experts=2 * world_size + 1, top_k=2), seed=0)
    else:  # "mismatch": rank 0 was given other weights than its peers
        moe = SparseMoE(MoEConfig(hidden_size=8, intermediate_size=4, num_experts=2 * world_size, top_k=2),
                        seed=1 if rank == 0 else 0)
    try:
        ExpertParallelMoE(moe)
    except ValueError as error:
        return {"error": str(error)}
    return {"error": None}


def compare_model(rank, world_size, backend: str = "grouped_mm", seed: int = 0) -> dict:
    """`expert_parallel` on a tiny MoEForCausalLM: the logits of this rank's sequences against the full model."""
    moe = MoEConfig(hidden_size=16, intermediate_size=8, num_experts=2 * world_size, top_k=2)
    config = MoEModelConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, moe=moe)
    model = MoEForCausalLM(config, backend, dtype=torch.float64, seed=seed)
    reference = copy.deepcopy(model)
    expert_parallel(model)
    layers = model.moe_layers()
    model.set_experts_implementation("eager")  # the model's own selection reaches the swapped layers
    model.set_experts_implementation(backend)
    input_ids = torch.randint(0, 32, (world_size, 2, 6), generator=torch.Generator().manual_seed(seed))[rank]
    diff = _max_diff(model(input_ids).logits, reference(input_ids).logits)
    return {"diffs": {"logits": diff}, "ep_layers": sum(isinstance(m, ExpertParallelMoE) for m in layers.values()),
            "layers": len(layers), "backends": sorted({m.get_experts_implementation() for m in layers.values()})}


def inspect_and_reset(rank, world_size, backend: str = "grouped_mm") -> dict:
    """`moelab.inspect` on the layer (it is a SparseMoE: hooked, its EP steps and its backend's steps recorded), and
    `reset_parameters(seed)`, which must give this rank's slice of the full layer's init under that seed."""
    config = MoEConfig(hidden_size=16, intermediate_size=8, num_experts=2 * world_size, top_k=2)
    layer = ExpertParallelMoE(SparseMoE(config, backend, dtype=torch.float64, seed=0))
    with inspect(layer) as trace:
        layer(torch.randn(5 + rank, 16, dtype=torch.float64))
    layer.reset_parameters(seed=3)
    fresh = SparseMoE(config, backend, dtype=torch.float64, seed=3)
    L = layer.num_local_experts
    mine = slice(rank * L, (rank + 1) * L)
    diffs = {"reset router.weight": _max_diff(layer.router.weight, fresh.router.weight),
             "reset gate_up_proj": _max_diff(layer.experts.gate_up_proj, fresh.experts.gate_up_proj[mine]),
             "reset down_proj": _max_diff(layer.experts.down_proj, fresh.experts.down_proj[mine])}
    return {"diffs": diffs, "calls": len(trace.calls), "steps": [step.name for step in trace.steps]}


def fail_on_rank(rank, bad_rank: int) -> None:
    """The launcher's failure check: rank `bad_rank` raises, the others wait for it in a barrier."""
    if rank == bad_rank:
        raise ValueError(f"rank {rank} fails on purpose")
    dist.barrier()


def hang(rank) -> None:
    """The launcher's timeout check: never returns (the launcher must kill it)."""
    while True:
        time.sleep(1.0)


def default_cases(world_size: int) -> dict[str, tuple]:
    """name -> (function, kwargs): every backend on uneven, skewed, empty-rank and capacity routings, then a
    shared expert with top_k > E / ep and a [B, S, H] input, float32, a model, and the bad setups."""
    E = 2 * world_size
    plain = MoEConfig(hidden_size=16, intermediate_size=8, num_experts=E, top_k=2)
    dropping = MoEConfig(hidden_size=16, intermediate_size=8, num_experts=E, top_k=2, capacity_factor=1.0)
    shared = MoEConfig(hidden_size=16, intermediate_size=8, num_experts=E, top_k=3, shared_expert_intermediate_size=8)
    uneven = [3 + 4 * r for r in range(world_size)]  # [3, 7, 11, 15]
    empty = [0 if r == 1 else 6 + r for r in range(world_size)]  # rank 1 has no tokens
    cases = {}
    for backend in BACKENDS:
        cases[f"uneven/{backend}"] = (compare_layer, dict(config=plain, backend=backend, tokens=uneven))
        cases[f"skewed/{backend}"] = (compare_layer, dict(config=plain, backend=backend, tokens=uneven, skew=6.0))
        cases[f"empty_rank/{backend}"] = (compare_layer, dict(config=plain, backend=backend, tokens=empty))
        cases[f"capacity_drops/{backend}"] = (compare_layer, dict(config=dropping, backend=backend, tokens=uneven,
                                                                  skew=1.5, training=True))
        cases[f"shared_topk_gt_local/{backend}"] = (compare_layer, dict(config=shared, backend=backend,
                                                                        tokens=[8] * world_size, batched=True))
    cases["float32/grouped_mm"] = (compare_layer, dict(config=plain, backend="grouped_mm", tokens=uneven,
                                                       dtype=torch.float32))
    cases["model/grouped_mm"] = (compare_model, dict(backend="grouped_mm"))
    cases["inspect_reset/grouped_mm"] = (inspect_and_reset, dict(backend="grouped_mm"))
    cases["error/not_divisible"] = (expected_error, dict(case="not_divisible"))
    cases["error/mismatch"] = (expected_error, dict(case="mismatch"))
    return cases


def run_checks(rank: int, names: list[str] | None = None) -> dict[str, dict]:
    """Run the named cases of `default_cases` (all by default) in order on this rank; returns name -> result."""
    return run_cases(rank, default_cases(dist.get_world_size()), names)


def run_cases(rank: int, cases: dict, names: list[str] | None = None) -> dict[str, dict]:
    """Run the named `cases` ({name: (fn, kwargs)}, all by default) in order on this rank, each timed."""
    world_size = dist.get_world_size()
    names = list(cases) if names is None else names
    unknown = [name for name in names if name not in cases]
    if unknown:
        raise ValueError(f"unknown check(s) {unknown}; valid names are {list(cases)}")
    results = {}
    for name in names:
        fn, kwargs = cases[name]
        start = time.perf_counter()
        results[name] = fn(rank, world_size, **kwargs)
        results[name]["seconds"] = time.perf_counter() - start
    return results
