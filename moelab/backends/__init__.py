"""moelab.backends: five ways to lay out and run the same expert matmuls, behind one registry, plus `auto`.

Imports `moelab.core` only. Dimension letters, used in every shape comment of this package:
    T  tokens                    H  hidden size (token width)
    E  experts                   I  intermediate size (one expert's inner width)
    k  experts per token         S  = T * k, the (token, expert) pairs

Every backend has the signature
    fn(experts, hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]
and reads `experts.gate_up_proj [E, 2I, H]` (gate rows first, then up), `experts.down_proj [E, H, I]` and
`experts.act_fn`. One idea a module: `eager` (the readable reference), `batched_mm`, `grouped_mm` (the plain
algorithm; its steps on pairs in `pairs`, its grouped matmul in `grouped_matmul`), `capacity` (a static [E, C, H]
buffer, GShard's layout), `block_aligned` (grouped_mm with every group padded to a multiple of M rows, vLLM's
layout), `cpu` (grouped_mm's CPU inference fast path, its reusable workspace, its compiled op), `auto` (the
choice per call) and `calibration` (the crossover tables it chooses by).
"""

from ..core.registry import ExpertsInterface
from .eager import eager_experts, eager_memory
from .batched_mm import batched_mm_experts, batched_mm_memory
from .grouped_mm import grouped_mm_experts, grouped_mm_memory
from .capacity import capacity_experts, capacity_memory, expert_capacity
from .block_aligned import BLOCK_SIZE, block_aligned_experts, block_aligned_memory
from .grouped_matmul import force_fallback, grouped_linear, matmul_path, PATH_COUNTS
from .cpu.workspace import release_workspace, use_workspace, workspace_bytes
from .calibration import (AUTO_CANDIDATES, REFERENCE_BACKENDS, CrossoverTable, DEFAULT_CROSSOVERS,
                          calibration_path, crossovers, machine_key, reload_crossovers, set_crossovers,
                          use_crossovers)
from .auto import auto_experts, choose

# memory_estimate: the bytes of each backend's big intermediates, which `Experts` checks before calling
ExpertsInterface.register("eager", eager_experts, overwrite=True, accepts_dropped=True, memory_estimate=eager_memory)
ExpertsInterface.register("batched_mm", batched_mm_experts, overwrite=True, memory_estimate=batched_mm_memory)
ExpertsInterface.register("grouped_mm", grouped_mm_experts, overwrite=True, accepts_dropped=True,
                          memory_estimate=grouped_mm_memory)
ExpertsInterface.register("capacity", capacity_experts, overwrite=True, accepts_dropped=True,
                          memory_estimate=capacity_memory)
ExpertsInterface.register("block_aligned", block_aligned_experts, overwrite=True, accepts_dropped=True,
                          memory_estimate=block_aligned_memory)
ExpertsInterface.register("auto", auto_experts, overwrite=True, accepts_dropped=True)

__all__ = [
    "ExpertsInterface", "eager_experts", "batched_mm_experts", "grouped_mm_experts", "capacity_experts",
    "block_aligned_experts", "BLOCK_SIZE", "expert_capacity",
    "force_fallback", "grouped_linear", "matmul_path", "PATH_COUNTS",
    "auto_experts", "choose", "CrossoverTable", "DEFAULT_CROSSOVERS", "AUTO_CANDIDATES", "REFERENCE_BACKENDS",
    "crossovers",
    "set_crossovers", "use_crossovers", "reload_crossovers", "calibration_path", "machine_key",
    "release_workspace", "use_workspace", "workspace_bytes",
]
