"""Experts backends: three ways to run the same expert matmuls, behind one registry.

Dimension letters, used in every shape comment of this package:
    T  tokens                    H  hidden size (token width)
    E  experts                   I  intermediate size (one expert's inner width)
    k  experts per token         S  = T * k, the (token, expert) pairs

Every backend has the signature
    fn(experts, hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]
and reads `experts.gate_up_proj [E, 2I, H]` (gate rows first, then up), `experts.down_proj [E, H, I]` and
`experts.act_fn`. `eager` is the readable reference; the other two are the fast paths; `auto` picks one of
the three per call.
"""

from ..core.registry import ExpertsInterface
from .eager import eager_experts
from .batched_mm import batched_mm_experts
from .grouped_mm import grouped_mm_experts
from .grouped_matmul import force_fallback, grouped_linear, matmul_path, PATH_COUNTS
from .cpu.workspace import release_workspace, use_workspace, workspace_bytes
from .auto import auto_experts, CrossoverTable, DEFAULT_CROSSOVERS

ExpertsInterface.register("eager", eager_experts, overwrite=True)
ExpertsInterface.register("batched_mm", batched_mm_experts, overwrite=True)
ExpertsInterface.register("grouped_mm", grouped_mm_experts, overwrite=True)
ExpertsInterface.register("auto", auto_experts, overwrite=True)

__all__ = [
    "ExpertsInterface", "eager_experts", "batched_mm_experts", "grouped_mm_experts",
    "force_fallback", "grouped_linear", "matmul_path", "PATH_COUNTS",
    "auto_experts", "CrossoverTable", "DEFAULT_CROSSOVERS", "release_workspace", "use_workspace", "workspace_bytes",
]
