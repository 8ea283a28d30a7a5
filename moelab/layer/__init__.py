"""moelab.layer: one MoE layer as modules: `TopKRouter` (scores, top-k, the balancing loss), `Experts` (the E
gated MLPs as 3D parameters, dispatching to a backend by name) and `SparseMoE` (router + experts + an optional
shared expert). Imports `moelab.core` and `moelab.backends` only.
"""

from .experts import Experts
from .moe import SharedExpert, SparseMoE
from .router import RouterOutput, TopKRouter, load_balancing_loss

__all__ = ["Experts", "SharedExpert", "SparseMoE", "RouterOutput", "TopKRouter", "load_balancing_loss"]
