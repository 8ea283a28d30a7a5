"""`waste_table`: what each experts layout spends beyond the useful work, for one routing, one row per backend.

A routing of T tokens to k experts each is S = T * k (token, expert) pairs, of which Sk are kept (S - Sk dropped
by a capacity factor, the router's decision: every layout gets the same mask). The useful work is Sk rows through
each expert's gated MLP, 6 * H * I FLOPs a row (2*H*2I up, 2*I*H down). What each layout computes instead:

| backend | rows computed | why more than Sk |
| --- | --- | --- |
| eager | Sk | - (one matmul per expert hit, a Python loop) |
| batched_mm | S | the dropped pairs are computed, weighed by 0 (static shapes) |
| grouped_mm | Sk | - |
| capacity | E * C | every expert has C rows; the ones no pair fills are padding |
| block_aligned | sum(ceil(n_e / M) * M) | each group padded up to a multiple of M; its buffer has the static bound S + E*(M-1) |

Columns (bytes are ints, FLOPs in GFLOP):

- `pairs` S, `useful_pairs` Sk, `dropped_pairs` S - Sk (no layout adds or removes drops);
- `rows_computed`, `padding_rows` (computed rows that hold no pair), `dropped_rows_computed` (rows of dropped pairs
  computed anyway), `rows_allocated` (the matmul buffers' rows: block_aligned's static bound);
  `computed_over_useful` = rows_computed / Sk;
- `gflop_done`, `gflop_useful`: 6*H*I FLOPs per computed row and per useful pair;
- `extra_memory_analytic`: `analytic(...).extra_peak_bytes` of one `Experts` call with this routing (no router,
  no_grad); `extra_memory_measured`: `measure`'s peak of that call on CPU (with `measure=True`; NaN otherwise, or
  when skipped, with why in `note`);
- `weight_bytes_moved`, `activation_bytes_moved`, `bytes_moved`: an analytic traffic model (every tensor written
  once and read once per use; no cache reuse, no fusion): weights read by the matmuls (eager, grouped_mm and
  block_aligned read each expert hit once, capacity reads all E, batched_mm reads the parameters once per pair to
  copy them, writes the copies and reads them again: 3 * S * 3HI*b), plus activations: the layout's input buffer
  written (rows_allocated * H, zeros included; eager and grouped_mm gather Sk rows, batched_mm repeats S), each
  computed row through the MLP (read H, write 2I, read 2I, write I, read I, write H), and the pair outputs read
  back (S rows of H; eager and grouped_mm read only the Sk kept);
- `static_shapes`: whether every shape is known before the data (what CUDA graphs and `fullgraph=True` need);
  `cuda_graphs`: "not measured here" on a machine without CUDA: a replay's cost is never guessed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd
import torch

from ..backends.auto import choose
from ..backends.block_aligned import BLOCK_SIZE, padded_rows_bound
from ..backends.capacity import expert_capacity
from ..core.dtypes import parse_dtype
from ..core.machine import available_memory
from ..layer.moe import SparseMoE
from .estimate import MODELLED_BACKENDS, analytic, capacity_factor_of
from .measurement import measure as measure_peak
from .records import format_bytes

MEASURE_FRACTION = 0.5  # measure a backend only if its analytic peak fits in this share of the free memory
COLUMNS = [
    "backend", "pairs", "useful_pairs", "dropped_pairs", "rows_computed", "padding_rows", "dropped_rows_computed",
    "rows_allocated", "computed_over_useful", "gflop_done", "gflop_useful", "extra_memory_analytic",
    "extra_memory_measured", "weight_bytes_moved", "activation_bytes_moved", "bytes_moved", "static_shapes",
    "cuda_graphs", "note",
]


def _check_routing(config, top_k_index, dropped):
    num_experts, top_k = int(config.num_experts), int(config.top_k)
    if not isinstance(top_k_index, torch.Tensor) or top_k_index.dim() != 2 or top_k_index.shape[1] != top_k:
        got = list(top_k_index.shape) if isinstance(top_k_index, torch.Tensor) else type(top_k_index).__name__
        raise ValueError(f"top_k_index must be an integer tensor [T, k] with k = config.top_k = {top_k}, got {got}")
    if top_k_index.is_floating_point() or top_k_index.dtype == torch.bool:
        raise ValueError(f"top_k_index must hold integer expert ids, got dtype {top_k_index.dtype}")
    if top_k_index.numel() and (int(top_k_index.min()) < 0 or int(top_k_index.max()) >= num_experts):
        raise ValueError(f"top_k_index must hold expert ids in [0, {num_experts}), got values in "
                         f"[{int(top_k_index.min())}, {int(top_k_index.max())}]")
    if dropped is not None and (not isinstance(dropped, torch.Tensor) or dropped.dtype != torch.bool
                                or dropped.shape != top_k_index.shape):
        got = (f"{dropped.dtype} {list(dropped.shape)}" if isinstance(dropped, torch.Tensor)
               else type(dropped).__name__)
        raise ValueError(f"dropped must be None or a bool tensor shaped like top_k_index {list(top_k_index.shape)}, "
                         f"got {got}")
    return top_k_index.to(torch.long).cpu(), None if dropped is None else dropped.cpu()


def _rows(backend, counts, num_pairs, num_experts, capacity, block_size) -> tuple[int, int, int]:
    """(rows_computed, padding_rows, rows_allocated) of a layout; counts: kept pairs per expert [E]."""
    kept = sum(counts)
    if backend == "batched_mm":
        return num_pairs, 0, num_pairs
    if backend == "capacity":
        return num_experts * capacity, num_experts * capacity - kept, num_experts * capacity
    if backend == "block_aligned":
        padded = sum(math.ceil(n / block_size) * block_size for n in counts)
        return padded, padded - kept, padded_rows_bound(num_pairs, num_experts, block_size)
    return kept, 0, kept  # eager, grouped_mm: the kept pairs only


def _weight_bytes(backend, counts, num_pairs, num_experts, expert_bytes) -> int:
    hit = sum(1 for n in counts if n)
    if backend == "batched_mm":
        return 3 * num_pairs * expert_bytes  # read to copy, write the copy, read it in the bmm
    if backend == "capacity":
        return num_experts * expert_bytes  # bmm over all E, empty experts included
    return hit * expert_bytes


def _capacity(config, counts, num_tokens, dropped, training) -> int:
    """C of capacity's buffer, as `capacity_experts` takes it (see its docstring)."""
    factor = capacity_factor_of(config, training) if dropped is not None else None
    if factor is None:
        return max(counts, default=0)
    capacity = min(expert_capacity(factor, num_tokens, int(config.top_k), int(config.num_experts)), num_tokens)
    if max(counts, default=0) > capacity:
        raise ValueError(f"an expert keeps {max(counts)} pairs but capacity_factor = {factor} gives C = {capacity}: "
                         "pass the dropped mask of that capacity (moelab.layer.drop_pairs), or training= the mode "
                         "whose capacity factor made it")
    return capacity


def waste_table(config, top_k_index: torch.Tensor, dropped: torch.Tensor | None = None, dtype=torch.float32, *,
                backends: Sequence[str] | None = None, block_size: int = BLOCK_SIZE, training: bool = False,
                measure: bool = False, top_k_weights: torch.Tensor | None = None, seed: int = 0) -> pd.DataFrame:
    """The waste of every layout on one routing, a row per backend (columns and formulas: the module docstring).

    config: a `MoEConfig` (E, H, I, k; its capacity factor in the mode `training` sizes capacity's C when
    `dropped` is given, else C is the largest group); top_k_index [T, k]: the routing; dropped: None or bool
    [T, k], the pairs the router dropped (e.g. `moelab.layer.drop_pairs`). backends: default
    `MODELLED_BACKENDS`; "auto" is reported as the backend it picks ("auto -> grouped_mm"). block_size:
    block_aligned's M. measure: also run one `Experts` call per backend (seeded weights, seeded inputs of
    `dtype`) under `torch.no_grad()` and record `moelab.memory.measure`'s peak beside the analytic one; a backend
    whose analytic peak does not fit in `MEASURE_FRACTION` of the free memory is not run (NaN, and the note says
    why). top_k_weights: the weights of the measured call (default 1/k each; the waste does not depend on them).
    """
    dtype = parse_dtype(dtype)
    top_k_index, dropped = _check_routing(config, top_k_index, dropped)
    backends = list(MODELLED_BACKENDS if backends is None else backends)
    for name in backends:
        if name not in MODELLED_BACKENDS and name != "auto":
            raise ValueError(f"backends: no waste model for {name!r}; choose from {list(MODELLED_BACKENDS)} "
                             "and 'auto'")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1 (rows per block, M), got {block_size!r}")
    num_tokens, top_k = top_k_index.shape
    num_experts, hidden, inter = int(config.num_experts), int(config.hidden_size), int(config.intermediate_size)
    num_pairs = num_tokens * top_k
    kept_ids = top_k_index[~dropped] if dropped is not None else top_k_index.reshape(-1)
    counts = torch.bincount(kept_ids, minlength=num_experts).tolist()  # [E]: kept pairs per expert
    useful = sum(counts)
    itemsize = dtype.itemsize
    flops_per_row = 6 * hidden * inter
    expert_bytes = 3 * hidden * inter * itemsize  # gate_up_proj [2I, H] + down_proj [H, I] of one expert
    if measure:
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(num_tokens, hidden, generator=generator).to(dtype)  # [T, H]
        weights = (torch.full((num_tokens, top_k), 1.0 / top_k, dtype=dtype) if top_k_weights is None
                   else top_k_weights)
        budget = MEASURE_FRACTION * available_memory()

    rows = []
    for requested in backends:
        backend = requested
        if requested == "auto":
            backend = choose(num_pairs, dtype, "cpu", compiled=False, num_experts=num_experts,
                             drops=dropped is not None)[0]
        capacity = _capacity(config, counts, num_tokens, dropped, training) if backend == "capacity" else 0
        computed, padding, allocated = _rows(backend, counts, num_pairs, num_experts, capacity, block_size)
        dropped_computed = num_pairs - useful if backend == "batched_mm" else 0
        estimate = analytic(config, num_tokens, backend, dtype, tokens_per_expert=counts, router=False,
                            training=training, drops=dropped is not None, block_size=block_size,
                            capacity=capacity if backend == "capacity" else None)
        read_back = useful if backend in ("eager", "grouped_mm") else num_pairs
        activation = (allocated * hidden + computed * (2 * hidden + 6 * inter) + read_back * hidden) * itemsize
        weight = _weight_bytes(backend, counts, num_pairs, num_experts, expert_bytes)
        static = backend in ("batched_mm", "block_aligned") or (
            backend == "grouped_mm" and dropped is None) or (
            backend == "capacity" and dropped is not None and capacity_factor_of(config, training) is not None)
        measured, note = float("nan"), ""
        if measure:
            measured, note = _measured(config, backend, dtype, seed, training, x, top_k_index, weights, dropped,
                                       estimate, budget, block_size)
        rows.append({
            "backend": requested if requested == backend else f"{requested} -> {backend}",
            "pairs": num_pairs, "useful_pairs": useful, "dropped_pairs": num_pairs - useful,
            "rows_computed": computed, "padding_rows": padding, "dropped_rows_computed": dropped_computed,
            "rows_allocated": allocated, "computed_over_useful": computed / useful if useful else float("nan"),
            "gflop_done": computed * flops_per_row / 1e9, "gflop_useful": useful * flops_per_row / 1e9,
            "extra_memory_analytic": estimate.extra_peak_bytes, "extra_memory_measured": measured,
            "weight_bytes_moved": weight, "activation_bytes_moved": activation, "bytes_moved": weight + activation,
            "static_shapes": static,
            "cuda_graphs": "not measured here" if not torch.cuda.is_available() else "not measured by waste_table",
            "note": note,
        })
    table = pd.DataFrame(rows, columns=COLUMNS)
    table.attrs.update({"num_tokens": num_tokens, "top_k": top_k, "num_experts": num_experts, "dtype": str(dtype),
                        "block_size": block_size, "tokens_per_expert": counts})
    return table


def _measured(config, backend, dtype, seed, training, x, top_k_index, weights, dropped, estimate, budget,
              block_size) -> tuple[float, str]:
    """One no_grad `Experts` call of `backend` measured after a warm-up; (NaN, why) when it is not run."""
    if backend == "block_aligned" and block_size != BLOCK_SIZE:
        return float("nan"), f"measured only at the registered block_aligned's M = {BLOCK_SIZE}"
    if estimate.peak_bytes > budget:
        return float("nan"), (f"not measured: its analytic peak ({estimate.peak_bytes} bytes) is over "
                              f"{MEASURE_FRACTION:.0%} of the free memory")
    experts = SparseMoE(config, backend, dtype=dtype, seed=seed).experts.train(training)
    with torch.no_grad():
        experts(x, top_k_index, weights, dropped)  # warm-up: first-call paths, grouped_mm's workspace
        peak = measure_peak(lambda: experts(x, top_k_index, weights, dropped)).peak_bytes
    return float(peak), ""


def format_waste(table: pd.DataFrame) -> pd.DataFrame:
    """`waste_table`'s figures for reading: rows as "computed / useful", bytes in KiB/MiB, FLOPs in GFLOP."""
    def size(value):
        return "n/a" if pd.isna(value) else format_bytes(value)

    return pd.DataFrame({
        "backend": table["backend"],
        "rows computed": table["rows_computed"],
        "useful pairs": table["useful_pairs"],
        "padding rows": table["padding_rows"],
        "dropped (computed)": [f"{d} ({c})" for d, c in zip(table["dropped_pairs"], table["dropped_rows_computed"])],
        "computed / useful": table["computed_over_useful"].map("{:.2f}x".format),
        "GFLOP done / useful": [f"{d:.3g} / {u:.3g}" for d, u in zip(table["gflop_done"], table["gflop_useful"])],
        "extra memory (analytic)": table["extra_memory_analytic"].map(size),
        "extra memory (measured)": table["extra_memory_measured"].map(size),
        "bytes moved (analytic)": table["bytes_moved"].map(size),
        "static shapes": table["static_shapes"].map({True: "yes", False: "no"}),
        "CUDA graphs": table["cuda_graphs"],
    })
