"""Watching expert parallelism: N ranks on this machine, each traced with `moelab.inspect`, brought back as one table.

    watch = trace_ranks(config, world_size=2, num_tokens=[48, 80], seed=0)
    watch.frame          # one row per (rank, phase): start_s, seconds, rows and bytes sent / received
    watch.send_matrix    # [ep, ep]: pair rows rank i sends to rank j (the diagonal stays on its rank)
    watch.exactness      # per rank: max |EP output - single-process output| on the same tokens
    watch.plot_send_matrix(); watch.plot_timeline()

Each rank (a spawned process, `run_ranks`) builds the same `SparseMoE` from `seed`, makes it expert-parallel, runs
one forward (and, with `backward=True`, one backward) of its own tokens under `moelab.inspect`, and returns what
its steps recorded: `ExpertParallelMoE` times its phases and counts its rows and bytes only while an inspection
listens. The send matrix is assembled here from every rank's row (its send counts), so the forward needs no extra
collective; each rank's column (what it received) is checked against it. The per-rank worker is a module-level
function because a function defined in a notebook cell cannot be spawned.

Times: every rank reads `time.perf_counter` (CLOCK_MONOTONIC on Linux, one clock for all processes of a machine), so
the phases of all ranks line up on one time axis, from the earliest start. A dispatch or combine includes the wait
for the slowest peer to arrive: a rank that finished its experts early waits in the combine. The experts phase also
holds the recording of the backend's own steps, and a recording backend skips its workspace: these times show
where a forward goes, `python -m moelab ep` (`moelab.parallel.bench`, timed without an inspection) how long it takes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from ..core.config import MoEConfig
from ..core.dtypes import dtype_name, parse_dtype
from ..inspection import inspect
from ..layer.moe import SparseMoE
from .launch import run_ranks
from .layer import ExpertParallelMoE
from .plots import plot_send_matrix, plot_timeline

# the phases of one EP forward, in order, and the step that records each (see ExpertParallelMoE)
PHASES = {"permute": "ep_permute", "dispatch": "ep_dispatch", "experts": "ep_experts", "combine": "ep_combine",
          "unpermute": "ep_unpermute"}
COMMUNICATION = ("dispatch", "combine")
FRAME_COLUMNS = ["rank", "phase", "start_s", "seconds", "rows_sent", "rows_received", "bytes_sent",
                 "bytes_received"]


def _config(config) -> MoEConfig:
    if isinstance(config, MoEConfig):
        return config
    if isinstance(config, dict):
        return MoEConfig.from_dict(config)
    raise ValueError(f"config must be a moelab.MoEConfig or a dict of its fields, got {type(config).__name__}")


def _tokens(num_tokens, world_size: int) -> list[int]:
    """num_tokens: an int (every rank) or one int per rank -> [T_0, ..., T_{ep-1}]."""
    values = [num_tokens] * world_size if isinstance(num_tokens, int) and not isinstance(num_tokens, bool) \
        else list(num_tokens) if isinstance(num_tokens, (list, tuple)) else None
    if values is None or len(values) != world_size or any(
            isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in values):
        raise ValueError(f"num_tokens must be an int >= 0 or a list of {world_size} ints >= 0 (one per rank), "
                         f"got {num_tokens!r}")
    return values


def rank_inputs(config: MoEConfig, tokens: list[int], seed: int, dtype=torch.float32,
                skew: float = 0.0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every rank's hidden states [T_r, H], drawn in rank order from `seed + 1` (the same on every rank and in
    the caller), and the unit direction [H] that `skew` pushes them (and the router's first two experts) along."""
    generator = torch.Generator().manual_seed(seed + 1)
    direction = torch.randn(config.hidden_size, generator=generator, dtype=torch.float64)
    direction = direction / direction.norm()  # [H]
    xs = [(torch.randn(t, config.hidden_size, generator=generator, dtype=torch.float64) + skew * direction)
          .to(parse_dtype(dtype)) for t in tokens]
    return xs, direction


def build_layer(config: MoEConfig, backend: str, dtype, seed: int, skew: float, direction: torch.Tensor) -> SparseMoE:
    """The full single-process layer every rank builds (the same weights from `seed`); with `skew`, the first two
    experts (rank 0's) attract the tokens pushed along `direction`, so the send matrix leans towards rank 0."""
    moe = SparseMoE(config, backend, dtype=parse_dtype(dtype), seed=seed)
    if skew:
        with torch.no_grad():
            moe.router.weight[:2] += (skew / 2) * direction.to(moe.router.weight.dtype)
    return moe


def _watch_rank(rank: int, config_dict: dict, tokens: list[int], seed: int, backend: str, dtype: str,
                backward: bool, skew: float, warmup: int) -> dict:
    """One rank of `trace_ranks` (spawned): build, warm up, one inspected forward (+ backward), the reference."""
    config = MoEConfig.from_dict(config_dict)
    xs, direction = rank_inputs(config, tokens, seed, dtype, skew)
    moe = build_layer(config, backend, dtype, seed, skew, direction)
    layer = ExpertParallelMoE(moe)
    x = xs[rank].clone().requires_grad_(backward)
    with torch.no_grad():
        for _ in range(warmup):  # first calls allocate and warm caches: not what the trace should time
            layer(x)
    dist.barrier()  # every rank starts the traced forward together, so the timeline compares like with like
    with inspect(layer) as trace:
        output = layer(x)
    phases = []
    for phase, step_name in PHASES.items():
        step = trace.calls[0][step_name]
        info = step.info
        phases.append({"phase": phase, "start": info["start"], "seconds": info["seconds"],
                       "rows_sent": info.get("rows_sent"), "rows_received": info.get("rows_received"),
                       "bytes_sent": info.get("bytes_sent", 0), "bytes_received": info.get("bytes_received", 0)})
    permute = trace.calls[0]["ep_permute"]
    dispatch = trace.calls[0]["ep_dispatch"]
    result = {"tokens": tokens[rank], "counts": permute.tensors["counts"].tolist(),  # [E] this rank's kept pairs
              "send_row": dispatch.info["rows_sent"], "received_column": dispatch.info["rows_received"],
              "received_counts": dispatch.tensors["received_counts"].tolist(),  # [ep, L]
              "row_bytes": config.hidden_size * x.element_size(), "steps": trace.to_frame()}
    probe = torch.randn(output.shape, generator=torch.Generator().manual_seed(seed + 2 + rank), dtype=output.dtype)
    if backward:
        dist.barrier()
        start = time.perf_counter()
        (output * probe).sum().backward()  # the reverse exchanges (combine's, then dispatch's gradient) inside
        # the backward runs both exchanges again with the splits swapped: the same rows and bytes, the other way
        comm = [p for p in phases if p["phase"] in COMMUNICATION]
        phases.append({"phase": "backward", "start": start, "seconds": time.perf_counter() - start,
                       "rows_sent": None, "rows_received": None,
                       "bytes_sent": sum(p["bytes_received"] for p in comm),
                       "bytes_received": sum(p["bytes_sent"] for p in comm)})
    reference_x = xs[rank].clone().requires_grad_(backward)
    reference = moe(reference_x)  # the single-process layer on the same tokens
    result["max_abs_diff"] = _max_abs(output, reference)
    if backward:
        (reference * probe).sum().backward()
        result["grad_max_abs_diff"] = _max_abs(x.grad, reference_x.grad)
    result["phases"] = phases
    return result


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


@dataclass
class EPWatch:
    """What `trace_ranks` brings back (see the module docstring for each field's meaning).

    frame: one row per (rank, phase), columns `FRAME_COLUMNS`; start_s is seconds from the earliest start of any
    rank, rows_* are per peer rank (lists, self included), bytes_* count only what leaves or reaches the rank.
    send_matrix [ep, ep]: pair rows rank i sends to rank j. tokens_per_expert [E]: kept pairs of all ranks.
    exactness: per rank, tokens and max_abs_diff (and grad_max_abs_diff with backward) against the single-process
    layer. steps: every rank's `Trace.to_frame()`, with a rank column.
    """

    config: MoEConfig
    world_size: int
    tokens: list[int]
    backend: str
    dtype: str
    row_bytes: int
    frame: pd.DataFrame
    send_matrix: np.ndarray
    tokens_per_expert: np.ndarray
    exactness: pd.DataFrame
    steps: pd.DataFrame
    raw: list[dict] = field(repr=False, default_factory=list)

    def bytes_frame(self) -> pd.DataFrame:
        """Per rank: bytes sent and received in the dispatch and the combine (rows that leave or reach it)."""
        comm = self.frame[self.frame["phase"].isin(COMMUNICATION)]
        wide = comm.pivot_table(index="rank", columns="phase", values=["bytes_sent", "bytes_received"])
        wide.columns = [f"{phase}_{what}" for what, phase in wide.columns]
        return wide[[f"{p}_{w}" for p in COMMUNICATION for w in ("bytes_sent", "bytes_received")]].reset_index()

    def phase_seconds(self) -> pd.DataFrame:
        """[rank x phase] seconds, phases in order."""
        table = self.frame.pivot_table(index="rank", columns="phase", values="seconds")
        return table[[p for p in [*PHASES, "backward"] if p in table.columns]]

    def plot_send_matrix(self, ax=None):
        """The send matrix as an annotated heatmap (`moelab.parallel.plots.plot_send_matrix`)."""
        return plot_send_matrix(self.send_matrix, row_bytes=self.row_bytes, ax=ax)

    def plot_timeline(self, ax=None):
        """The phases of every rank on one time axis (`moelab.parallel.plots.plot_timeline`)."""
        return plot_timeline(self.frame, ax=ax)


def trace_ranks(config, world_size: int = 2, num_tokens=64, seed: int = 0, backend: str = "grouped_mm", *,
                dtype="float32", backward: bool = False, skew: float = 0.0, warmup: int = 1,
                timeout: float = 180.0, threads: int = 1) -> EPWatch:
    """Run `world_size` gloo ranks on 127.0.0.1, each one inspected forward of the expert-parallel layer; returns
    an `EPWatch` (one DataFrame for all ranks, the send matrix, the exactness check).

    config: a `MoEConfig` or a dict of its fields; num_tokens: tokens per rank, an int or one int per rank; seed:
    weights (and inputs, from seed + 1); backend: the local experts' backend; backward: also one backward (timed as
    one phase); skew > 0 pushes tokens towards rank 0's experts; warmup: untimed forwards first; timeout, threads:
    as in `run_ranks`.
    """
    config = _config(config)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if config.num_experts % world_size:
        raise ValueError(f"config.num_experts = {config.num_experts} is not divisible by world_size = {world_size}")
    tokens = _tokens(num_tokens, world_size)
    dtype = dtype_name(parse_dtype(dtype))
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    raw = run_ranks(_watch_rank, world_size, config.to_dict(), tokens, seed, backend, dtype, bool(backward),
                    float(skew), warmup, timeout=timeout, threads=threads)
    return assemble(config, tokens, backend, dtype, raw)


def assemble(config: MoEConfig, tokens: list[int], backend: str, dtype: str, raw: list[dict]) -> EPWatch:
    """Every rank's records -> one `EPWatch`: the matrix from the rows, checked against every rank's column."""
    world_size = len(raw)
    send_matrix = np.array([r["send_row"] for r in raw], dtype=np.int64).reshape(world_size, world_size)
    for j, r in enumerate(raw):  # what rank j received from each rank is column j of what they all sent
        if list(send_matrix[:, j]) != list(r["received_column"]):
            raise RuntimeError(f"rank {j} received {r['received_column']} rows, but the ranks' send rows say "
                               f"{send_matrix[:, j].tolist()}: the two exchanges disagree")
    origin = min(p["start"] for r in raw for p in r["phases"])
    rows = [{"rank": rank, "phase": p["phase"], "start_s": p["start"] - origin, "seconds": p["seconds"],
             "rows_sent": p["rows_sent"], "rows_received": p["rows_received"], "bytes_sent": int(p["bytes_sent"]),
             "bytes_received": int(p["bytes_received"])} for rank, r in enumerate(raw) for p in r["phases"]]
    exactness = pd.DataFrame([{"rank": rank, "tokens": r["tokens"], "max_abs_diff": r["max_abs_diff"],
                               **({"grad_max_abs_diff": r["grad_max_abs_diff"]} if "grad_max_abs_diff" in r else {})}
                              for rank, r in enumerate(raw)])
    steps = pd.concat([r["steps"].assign(rank=rank) for rank, r in enumerate(raw)], ignore_index=True)
    return EPWatch(config=config, world_size=world_size, tokens=list(tokens), backend=backend, dtype=dtype,
                   row_bytes=raw[0]["row_bytes"], frame=pd.DataFrame(rows, columns=FRAME_COLUMNS),
                   send_matrix=send_matrix, tokens_per_expert=np.sum([r["counts"] for r in raw], axis=0),
                   exactness=exactness, steps=steps, raw=raw)
